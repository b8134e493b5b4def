"""Out-of-bounds checks for the CPU test backends, found by construction rather than by what the
neighbouring memory happens to hold. Test-only.

* :class:`GuardPool` / :func:`guarded` (cuda_host): tensors inside larger buffers with guard zones
  before and after them. ``pool.put(t)`` copies an input into a guarded buffer; every ``torch.empty`` /
  ``torch.empty_like`` inside ``pool.allocations()`` (the outputs and workspaces a primitive allocates)
  is guarded too, and poisoned like :func:`fastbert.testing.poisoned_allocations`. Guard bytes are 0xFF (NaN for
  every float dtype), so a stray read shows as NaN in any build. On exit, and on ``g.check()``, every
  guard is compared with its fill: a write outside a tensor raises :class:`OutOfBounds` naming the
  tensor. The checking build of cuda_host (``check_mode``) also receives the zones and reports any read
  or write into them at once, with the thread and source line.
* :func:`patch_triton_interpreter` (Triton under ``TRITON_INTERPRET=1``): every ``tl.load`` / ``tl.store``
  (and atomic) checks the addresses of its unmasked lanes against the memory of the tensor arguments
  of the launch (each tensor's own extent, not its storage: a view of a fused buffer is held to the
  view). An address outside all of them raises :class:`OutOfBounds` with the kernel, the source line,
  the argument it ran past and by how many bytes, even when that memory is readable.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch


class OutOfBounds(IndexError):
    """A kernel touched memory outside the tensors it was given."""


# ------------------------------------------------------------------------------------------------
# guard zones (cuda_host)
# ------------------------------------------------------------------------------------------------
GUARD_FILL = 0xFF
_MIN_GUARD, _MAX_GUARD = 4096, 65536  # bytes on each side: at least one row of any tensor in the tests


@dataclass
class GuardZone:
    lo: int  # byte addresses [lo, hi)
    hi: int
    after: bool  # the zone after the tensor (else before it)
    what: str  # the guarded tensor, e.g. "'q' [7, 3, 2, 64] torch.bfloat16"


class _Guarded:
    def __init__(self, buf: torch.Tensor, off: int, nbytes: int, what: str):
        self.buf, self.off, self.nbytes, self.what = buf, off, nbytes, what

    def zones(self) -> List[GuardZone]:
        base = self.buf.data_ptr()
        end = self.off + self.nbytes
        return [GuardZone(base, base + self.off, False, self.what),
                GuardZone(base + end, base + self.buf.numel(), True, self.what)]

    def damage(self) -> Optional[str]:
        before, after = self.buf[:self.off], self.buf[self.off + self.nbytes:]
        for zone, side in ((before, "before the start"), (after, "past the end")):
            bad = (zone != GUARD_FILL).nonzero()
            if bad.numel():
                i = int(bad[-1] if side.startswith("before") else bad[0])
                dist = self.off - i if side.startswith("before") else i
                return (f"out-of-bounds write: {bad.numel()} guard byte(s) {side} of {self.what} were modified "
                        f"(the nearest {dist} bytes {side})")
        return None


_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "pools"):
        _local.pools = []
    return _local.pools


def active_guard_zones() -> List[GuardZone]:
    """The guard zones of this thread's active :func:`guarded` contexts (handed to cuda_host's check build)."""
    return [z for pool in _stack() for g in pool.items for z in g.zones()]


def _caller() -> str:
    """file:line of the code that allocated (the innermost frame outside this module and torch)."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename != __file__ and "/torch/" not in fr.filename:
            return f"{Path(fr.filename).name}:{fr.lineno}"
    return "?"


class GuardPool:
    """Tensors with guard zones: inputs copied in with :meth:`put`, and everything ``torch.empty`` /
    ``torch.empty_like`` return inside :meth:`allocations` (poisoned when ``poison``)."""

    def __init__(self, poison: bool = True):
        self.items: List[_Guarded] = []
        self.poison = poison

    def alloc(self, shape, dtype: torch.dtype, what: str) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * _REAL["empty"]((), dtype=dtype).element_size()
        guard = (min(max(nbytes, _MIN_GUARD), _MAX_GUARD) + 63) // 64 * 64  # keeps the data 64-byte aligned
        buf = _REAL["empty"](guard + nbytes + guard, dtype=torch.uint8)
        buf.fill_(GUARD_FILL)
        t = buf[guard:guard + nbytes].view(dtype).view(tuple(int(d) for d in shape))
        self.items.append(_Guarded(buf, guard, nbytes, f"{what} {list(t.shape)} {dtype}"))
        return t

    def put(self, t: torch.Tensor, name: str = "input") -> torch.Tensor:
        """A contiguous copy of the CPU tensor ``t`` inside a guarded buffer."""
        out = self.alloc(t.shape, t.dtype, f"'{name}'")
        out.copy_(t)
        return out

    def check(self) -> None:
        """Raise :class:`OutOfBounds` if any guard of this pool was written."""
        for g in self.items:
            msg = g.damage()
            if msg:
                raise OutOfBounds(msg)

    @contextlib.contextmanager
    def allocations(self) -> Iterator["GuardPool"]:
        """Inside: CPU ``torch.empty``/``empty_like`` allocate guarded (and poisoned) tensors, and this
        pool's zones are the ones :func:`active_guard_zones` reports. On exit the guards are verified."""
        from fastbert.testing import poison_

        def empty(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            dev = kw.get("device")
            if (dev is not None and torch.device(dev).type != "cpu") or set(kw) - {"dtype", "device"}:
                t = _REAL["empty"](*size, **kw)
            else:
                t = self.alloc(shape, kw.get("dtype") or torch.get_default_dtype(), f"a tensor allocated at {_caller()}")
            return poison_(t) if self.poison else t

        def empty_like(x, **kw):
            if x.device.type != "cpu" or not x.is_contiguous() or set(kw) - {"dtype"}:
                t = _REAL["empty_like"](x, **kw)
            else:
                t = self.alloc(x.shape, kw.get("dtype") or x.dtype, f"a tensor allocated at {_caller()}")
            return poison_(t) if self.poison else t

        saved = torch.empty, torch.empty_like
        torch.empty, torch.empty_like = empty, empty_like
        _stack().append(self)
        try:
            yield self
        finally:
            _stack().remove(self)
            torch.empty, torch.empty_like = saved
        self.check()


_REAL = {"empty": torch.empty, "empty_like": torch.empty_like}


@contextlib.contextmanager
def guarded(poison: bool = True) -> Iterator[GuardPool]:
    """A fresh :class:`GuardPool` whose :meth:`~GuardPool.allocations` span the block."""
    pool = GuardPool(poison)
    with pool.allocations():
        yield pool


# ------------------------------------------------------------------------------------------------
# address-checked Triton interpreter
# ------------------------------------------------------------------------------------------------
@dataclass
class _Arg:
    name: str
    lo: int  # byte extent [lo, hi) of the elements
    hi: int
    desc: str
    base: int  # address of element 0
    esize: int
    dims: tuple  # (size, byte stride) of the dims that matter, by decreasing stride; () when dense


def _extent(name: str, t: torch.Tensor) -> Optional[_Arg]:
    """The tensor's elements as a checkable set: its byte extent, and for a strided view (a slice of a
    fused buffer) the dims that decide whether an address in the extent is one of its elements."""
    if t.numel() == 0:
        return None
    es = t.element_size()
    lo = sum(min(0, (s - 1) * st) for s, st in zip(t.shape, t.stride())) * es
    hi = (sum(max(0, (s - 1) * st) for s, st in zip(t.shape, t.stride())) + 1) * es
    base = t.data_ptr()
    dims = ()
    if not t.is_contiguous():
        d = sorted(((s, st * es) for s, st in zip(t.shape, t.stride()) if s > 1 and st != 0), key=lambda x: -x[1])
        # exact membership only for non-overlapping layouts with positive strides; else the extent
        if all(st > 0 for _, st in d) and all(d[i][1] >= d[i + 1][1] * d[i + 1][0] for i in range(len(d) - 1)):
            dims = tuple(d)
    return _Arg(name, base + lo, base + hi, f"'{name}' {list(t.shape)} {t.dtype}", base, es, dims)


def _members(g: _Arg, addr, nbytes: int):
    """Which addresses (uint64 array) start an access of nbytes that lies within one element of g."""
    import numpy as np

    ok = (addr >= np.uint64(g.lo)) & (addr <= np.uint64(max(g.lo, g.hi - nbytes)))
    if not g.dims or not ok.any():
        return ok
    rem = addr.astype(np.int64) - np.int64(g.base)
    for size, st in g.dims:
        i = rem // st
        ok &= (i >= 0) & (i < size)
        rem = rem - i * st
    return ok & (rem >= 0) & (rem + nbytes <= g.esize)


def _launch_args(names, args, kwargs) -> List[_Arg]:
    out = []

    def visit(name, a):
        if isinstance(a, (tuple, list)):
            for i, x in enumerate(a):
                visit(f"{name}[{i}]", x)
        elif isinstance(a, torch.Tensor):
            e = _extent(name, a)
            if e is not None:
                out.append(e)
        elif hasattr(a, "base") and isinstance(getattr(a, "base"), torch.Tensor):  # TensorWrapper / descriptor
            visit(name, a.base)

    for n, a in zip(names, args):
        visit(n, a)
    for n, a in kwargs.items():
        visit(n, a)
    return out


def _kernel_line(kernel_file: Optional[str]) -> str:
    f = sys._getframe(2)
    best = None
    while f is not None:
        fn = f.f_code.co_filename
        if kernel_file is not None and fn == kernel_file:
            return f"{Path(fn).name}:{f.f_lineno}"
        if best is None and "triton" not in fn and fn != __file__:
            best = f"{Path(fn).name}:{f.f_lineno}"
        f = f.f_back
    return best or "?"


def _check(kind: str, ptrs, mask) -> None:
    import numpy as np

    launches = getattr(_local, "launches", None)
    if not launches:
        return
    launch = launches[-1]
    addr = ptrs.data
    if mask is not None:
        m = np.broadcast_to(mask.data, addr.shape)
        addr = addr[m] if not m.all() else addr.reshape(-1)
    else:
        addr = addr.reshape(-1)
    if addr.size == 0:
        return
    nbytes = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    a_lo, a_hi = int(addr.min()), int(addr.max()) + nbytes
    args = launch["args"]
    for g in args:  # the common case: every lane on an element of one tensor
        if g.lo <= a_lo and a_hi <= g.hi and (not g.dims or _members(g, addr, nbytes).all()):
            return
    member = [_members(g, addr, nbytes) for g in args]
    ok = np.logical_or.reduce(member) if member else np.zeros(addr.shape, dtype=bool)
    if ok.all():
        return
    bad = addr[~ok]
    first = int(bad[0])
    counts = [int(mm.sum()) for mm in member]
    if counts and max(counts) > 0:  # the tensor the other lanes of this access hit
        g = args[counts.index(max(counts))]
    else:
        g = min(args, key=lambda a: first - a.hi if first >= a.hi else a.lo - first, default=None)
    if g is None:
        rel = "with no tensor argument at all"
    elif first + nbytes > g.hi:
        rel = f"ends {first + nbytes - g.hi} bytes past the end of {g.desc}"
    elif first < g.lo:
        rel = f"starts {g.lo - first} bytes before the start of {g.desc}"
    else:
        rel = f"falls between the elements of {g.desc} (a gap of its strided layout)"
    raise OutOfBounds(
        f"tl.{kind} out of bounds in Triton kernel {launch['kernel']} at {_kernel_line(launch['file'])}: "
        f"{bad.size} of {addr.size} unmasked lanes address memory outside every tensor argument; the first, "
        f"a {nbytes}-byte element at 0x{first:x}, {rel}")


def patch_triton_interpreter() -> bool:
    """TEST-ONLY: make the Triton interpreter check every load/store/atomic address of unmasked lanes
    against the tensor arguments of the launch (see the module docstring). Returns whether it applied."""
    try:
        import inspect

        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no triton, nothing to patch
        return False
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    if getattr(builder, "_fastbert_address_check", False):
        return True

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
    init_args, call = executor._init_args_hst, executor.__call__

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        _check("atomic", ptr, mask)
        return rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _check("atomic_cas", ptr, None)
        return cas(self, ptr, cmp, val, sem, scope)

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        if getattr(_local, "launches", None):
            _local.launches[-1]["args"] = _launch_args(self.arg_names, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def __call__(self, *args_dev, **kwargs):
        try:
            file = inspect.getsourcefile(self.fn)
        except (TypeError, OSError):
            file = None
        if not hasattr(_local, "launches"):
            _local.launches = []
        _local.launches.append({"kernel": getattr(self.fn, "__name__", "?"), "file": file, "args": []})
        try:
            return call(self, *args_dev, **kwargs)
        finally:
            _local.launches.pop()

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    executor._init_args_hst, executor.__call__ = _init_args_hst, __call__
    builder._fastbert_address_check = True
    return True
