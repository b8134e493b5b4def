"""Input validation for the public ops: every error names the argument and says what was expected.

Shape/dtype/device checks are metadata only. Value checks on ``cu_seqlens``/``max_seqlen``, ``labels``
and gather/scatter ``indices`` need the data (one small host sync each). Eagerly they run in the public
op, before anything is launched. While ``torch.compile`` traces they cannot (the values do not exist
yet), so the traced op carries an empty backend name, and its real implementation, which runs eagerly
inside the compiled graph (custom ops are opaque), runs the same ``*_values`` check before any kernel:
a wrong ``max_seqlen`` hint or a bad ``cu_seqlens``/label/index raises the same ValueError under compile
as eagerly, on every backend, instead of a kernel leaving rows unwritten or reading out of bounds.

Why a host check and not kernels that tolerate a wrong hint (a grid-stride loop over query blocks past
``max_seqlen``) or a device-side assert: the hint is only one of four facts about ``cu_seqlens``, and a
wrong first/last entry or a decreasing one sends every kernel out of bounds however it loops; a device
assert kills the CUDA context and says nothing on CPU backends. The host check costs one sync of a
``[B+1]`` tensor per distinct ``cu_seqlens`` per step: a tensor whose values were already checked (same
tensor object, same version, same sizes) is not checked again, so a 12-layer model pays once for
forward and backward together, and ``unpad_input`` marks the tensors it builds as checked. In a
compiled model that one sync comes right after unpadding's own (the token count), when the GPU queue
is nearly empty. While a CUDA graph is being captured nothing is read back (the checks are skipped).

Sizes may be ``torch.SymInt`` while tracing (``max_seqlen`` and the token count of an unpadded batch
are data-dependent, unbacked): size checks then go through ``torch._check_with``, which proves them from
the value ranges or defers them to a runtime assert in the graph.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (32, 64, 128)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def is_int(v) -> bool:
    """A Python int or a traced ``torch.SymInt`` (never a bool)."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def require(cond, message, traced_message: str) -> None:
    """Raise ``ValueError(message())`` unless ``cond``. While tracing ``cond`` may be a ``SymBool``: it is then
    proven from the value ranges or kept in the graph as a runtime assert raising ``traced_message``
    (a constant: the symbolic values have no text yet)."""
    if isinstance(cond, torch.SymBool) or _compiling():
        torch._check_with(ValueError, cond, lambda: traced_message)
    elif not cond:
        raise ValueError(message())


def size_arg(name: str, v, minimum: int = 0) -> None:
    """``v``: an int (or SymInt while tracing) >= ``minimum``."""
    if not is_int(v):
        raise TypeError(f"{name}: expected a Python int, got {type(v).__name__}")
    what = f"{name}: expected a non-negative int" if minimum == 0 else f"{name}: expected an int >= {minimum}"
    require(v >= minimum, lambda: f"{what}, got {v}", what)


def flat2d(t: torch.Tensor, lead: int = -1) -> torch.Tensor:
    """``t`` as a contiguous 2-D ``[rows, cols]`` tensor, ``lead`` leading dims folded into the rows (-1: all
    but the last). Unlike ``reshape(-1, n)`` this is unambiguous when a dim is 0."""
    shape = tuple(t.shape)
    lead = len(shape) - 1 if lead < 0 else lead
    return t.reshape(math.prod(shape[:lead]), math.prod(shape[lead:])).contiguous()


def tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None, dim: Optional[int] = None,
           min_dim: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the other inputs), got {t.device}")


def optional_vector(name: str, t, n: int, device: torch.device) -> None:
    """A ``[n]`` floating tensor on ``device``, or None."""
    if t is None:
        return
    tensor(name, t, dtypes=FLOAT_DTYPES, dim=1, device=device)
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match the last dim of the input, got {tuple(t.shape)}")


def same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(t.shape)}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def approximate(value: str) -> None:
    if value not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' (erf GELU) or 'tanh', got {value!r}")


# (kind, id(tensor)) -> (weakref to the tensor, its version, the sizes it was checked against)
_checked = {}
_MAX_CHECKED = 16


def _already_checked(kind: str, t: torch.Tensor, sizes: tuple) -> bool:
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return True  # a CUDA graph being captured cannot read values back (replays run no Python anyway)
    if t.is_inference():
        return False  # torch.inference_mode tensors have no version counter: never taken as unchanged
    hit = _checked.get((kind, id(t)))
    return hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == sizes


def mark_checked(kind: str, t: torch.Tensor, sizes: tuple) -> None:
    """Record that ``t``'s values passed the ``kind`` check against ``sizes`` (until ``t`` changes or dies)."""
    if _compiling() or t.is_inference():
        return
    key = (kind, id(t))
    if len(_checked) >= _MAX_CHECKED:
        _checked.pop(next(iter(_checked)))
    _checked[key] = (weakref.ref(t, lambda _, k=key: _checked.pop(k, None)), t._version, sizes)


def cu_seqlens(cu: torch.Tensor, total: int, max_seqlen: int, device: torch.device) -> None:
    """cu_seqlens: int32 ``[B+1]`` contiguous on ``device``, 0 first, non-decreasing, ``total`` last, and
    no sequence longer than ``max_seqlen``."""
    tensor("cu_seqlens", cu, dtypes=(torch.int32,), dim=1, device=device)
    if cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected shape [batch + 1] (at least the leading 0), got {tuple(cu.shape)}")
    if not cu.is_contiguous():
        raise ValueError("cu_seqlens: expected a contiguous tensor")
    size_arg("max_seqlen", max_seqlen)
    if not _compiling():
        cu_seqlens_values(cu, total, max_seqlen)


def cu_seqlens_values(cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    """The value half of ``cu_seqlens`` (a host sync unless this tensor was already checked)."""
    sizes = (int(total), int(max_seqlen))
    if _already_checked("cu_seqlens", cu, sizes):
        return
    if cu.shape[0] == 1:  # no sequences: the one entry is cu_seqlens[0] == cu_seqlens[-1]
        first = last = int(cu[0])
        min_len = max_len = 0
    else:
        c = cu.long()
        lens = c[1:] - c[:-1]
        # one host sync for all four facts
        first, last, min_len, max_len = torch.stack([c[0], c[-1], lens.min(), lens.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
    if min_len < 0:
        raise ValueError("cu_seqlens: expected non-decreasing values (sequence lengths >= 0)")
    if last != sizes[0]:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == {sizes[0]} (the number of tokens), got {last}")
    if max_len > sizes[1]:
        raise ValueError(f"max_seqlen: expected at least the longest sequence ({max_len}), got {sizes[1]}")
    mark_checked("cu_seqlens", cu, sizes)


def indices_values(name: str, idx: torch.Tensor, num_rows: int) -> None:
    """Gather/scatter row indices: every value in ``[0, num_rows)`` (a host sync unless already checked)."""
    sizes = (int(num_rows),)
    if idx.numel() == 0 or _already_checked("indices", idx, sizes):
        return
    lo, hi = torch.stack([idx.min(), idx.max()]).tolist()
    if lo < 0 or hi >= num_rows:
        raise ValueError(f"{name}: expected row indices in [0, {num_rows}), found {lo if lo < 0 else hi}")
    mark_checked("indices", idx, sizes)


def labels(lab: torch.Tensor, n_rows: int, vocab: int, ignore_index: int, device: torch.device) -> None:
    tensor("labels", lab, dtypes=(torch.int64, torch.int32), dim=1, device=device)
    if lab.shape[0] != n_rows:
        raise ValueError(f"labels: expected shape ({n_rows},) (one label per row of hidden), got {tuple(lab.shape)}")
    if not _compiling():
        labels_values(lab, vocab, ignore_index)


def labels_values(lab: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ``ignore_index`` or in ``[0, vocab)`` (one host sync)."""
    if lab.numel() == 0 or _already_checked("labels", lab, (int(vocab), int(ignore_index))):
        return
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= vocab))
    if bool(bad.any()):
        v = int(lab[bad][0])
        raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, found {v}")
    mark_checked("labels", lab, (int(vocab), int(ignore_index)))


def same_device(named: Iterable) -> torch.device:
    """The common device of (name, tensor) pairs (None tensors skipped)."""
    dev = None
    first = None
    for name, t in named:
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev} (the device of {first}), got {t.device}")
    return dev
