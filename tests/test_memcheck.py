"""fastbert.memcheck: guard zones around tensors (cuda_host) and the address-checked Triton interpreter.

The Triton check is shown on temporary copies of fastbert's own kernels with one mask dropped: the load
then runs one row (or more) past the tensor, which the interpreter would read without complaint, and
the values are masked away afterwards, so only the address check can fail the test. The clean kernels
run under the same check in every Triton test (tests/conftest.py applies it).
Races and uninitialised shared memory do not apply to Triton code (no explicit shared memory or
barriers in the language); those checks live in the CUDA emulation (tests/test_cuda_host_memcheck.py).
"""
import ctypes
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from fastbert import memcheck
from fastbert.testing import assert_close

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


# ------------------------------------------------------------------------------------------------
# guard zones
# ------------------------------------------------------------------------------------------------
def test_guarded_allocations_are_poisoned_aligned_and_named():
    pool = memcheck.GuardPool()
    x = pool.put(torch.arange(10, dtype=torch.float32), "x")
    with pool.allocations():
        y = torch.empty(3, 5, dtype=torch.bfloat16)
        z = torch.empty_like(x)
    assert torch.equal(x, torch.arange(10, dtype=torch.float32))
    assert y.isnan().all() and z.isnan().all() and y.shape == (3, 5) and y.is_contiguous()
    assert all(t.data_ptr() % 64 == 0 for t in (x, y, z))
    zones = [zz for g in pool.items for zz in g.zones()]
    assert len(zones) == 6 and any("'x' [10] torch.float32" in zz.what for zz in zones)
    assert memcheck.active_guard_zones() == []  # only inside allocations()


@pytest.mark.parametrize("where", ["after", "before"])
def test_guard_zone_write_is_reported_naming_the_tensor(where):
    """A planted out-of-bounds write (as a kernel would do through a raw pointer) fails the context."""
    with pytest.raises(memcheck.OutOfBounds) as e:
        with memcheck.guarded() as g:
            out = torch.empty(4, 6, dtype=torch.float16)
            g.check()  # clean so far
            addr = out.data_ptr() + (out.numel() * 2 + 6 if where == "after" else -2)
            ctypes.memmove(addr, (ctypes.c_char * 2)(b"\x00", b"\x00"), 2)
    msg = str(e.value)
    side = "past the end" if where == "after" else "before the start"
    assert f"{side} of a tensor allocated at test_memcheck.py:" in msg and "[4, 6] torch.float16" in msg, msg


def test_guard_fill_reads_as_nan():
    """A stray read of a guard shows as NaN in any build (the fast cuda_host build included)."""
    pool = memcheck.GuardPool()
    x = pool.put(torch.ones(8, dtype=torch.bfloat16), "x")
    past = torch.empty(0, dtype=torch.bfloat16).set_(x.untyped_storage(), x.storage_offset() + 8, (4,))
    assert past.isnan().all()


# ------------------------------------------------------------------------------------------------
# address-checked Triton interpreter
# ------------------------------------------------------------------------------------------------
def _planted_module(tmp_path, name, anchor, replacement):
    """A temporary copy of kernels/<name>.py with `anchor` replaced (a missing anchor means the kernel
    changed: move the plant to the equivalent line)."""
    src = (KERNELS / f"{name}.py").read_text()
    assert src.count(anchor) >= 1, f"plant anchor not found in kernels/{name}.py; update the test"
    src = src.replace(anchor, replacement, 1).replace("from ._common import", "from fastbert.kernels._common import")
    path = tmp_path / f"planted_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"planted_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def _line_of(path, text):
    return next(i for i, t in enumerate(path.read_text().splitlines(), 1) if text in t)


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the address check patches the Triton interpreter (TRITON_INTERPRET=1, set when no GPU)")


@pytest.mark.parametrize("kind", ["load", "store"])
def test_triton_unmasked_row_past_the_tensor_is_an_error(interpreter, tmp_path, kind):
    """LayerNorm forward with the row mask dropped from the x load (or the y store): the last program's
    rows past M run past the tensor, an error whatever that memory holds."""
    if kind == "load":
        anchor = "    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)\n"
        planted = "    h = tl.load(X + offs, mask=cmask[None, :], other=0.0).to(tl.float32)  # PLANT\n"
        arg, op = "'X'", "tl.load"
    else:
        anchor = "    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)\n"
        planted = "    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=cmask[None, :])  # PLANT\n"
        arg, op = "'Y'", "tl.store"
    mod, path = _planted_module(tmp_path, "layer_norm", anchor, planted)
    M, N = 7, 64  # BLOCK_M > 1 rows per program: the last one runs past row 6
    x = torch.randn(M, N)
    with pytest.raises(Exception, match="out of bounds") as e:
        mod.layer_norm_fwd(x, None, None, None, 1e-5)
    msg = str(e.value)
    print(msg)
    assert f"{op} out of bounds in Triton kernel _ln_fwd_kernel at planted_layer_norm.py:" \
           f"{_line_of(path, '# PLANT')}" in msg, msg
    assert re.search(rf"ends \d+ bytes past the end of {arg} \[7, 64\] torch.float32", msg), msg


def test_triton_attention_unmasked_key_tile_is_an_error(interpreter, tmp_path):
    """The attention forward with the key-tile mask dropped: the last sequence's last key tile reads past
    K, a view of a fused QKV buffer, so the check holds K to its own extent, not the buffer's."""
    anchor = "        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)\n"  # the masked (edge-tile) path
    planted = "        k = tl.load(k_ptrs)  # PLANT\n"
    mod, path = _planted_module(tmp_path, "attention", anchor, planted)
    T, H, D = 20, 2, 32
    qkv = torch.randn(T, 3, H, D)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    with pytest.raises(Exception, match="out of bounds") as e:
        mod.flash_attn_fwd(q, k, v, cu, 11, None, None)
    msg = str(e.value)
    print(msg)
    # (raised inside a nested @jit function, the interpreter re-raises it with its repr: quotes escaped)
    assert f"at planted_attention.py:{_line_of(path, '# PLANT')}" in msg, msg
    assert re.search(r"past the end of \\?'K\\?'", msg), msg


def test_triton_clean_kernel_passes_the_check(interpreter, tmp_path):
    """The same copy mechanism with nothing planted runs clean and matches the reference (the check
    itself has no false positives on masked tails)."""
    mod, _ = _planted_module(tmp_path, "layer_norm", "import torch\n", "import torch\n")
    x = torch.randn(7, 64)
    y, _, _, _ = mod.layer_norm_fwd(x, None, None, None, 1e-5)
    ref = torch.nn.functional.layer_norm(x.double(), (64,), eps=1e-5)
    assert_close(y, ref, peer=torch.nn.functional.layer_norm(x, (64,), eps=1e-5))
