"""The test infrastructure itself (fastbert/testing.py): the tolerance rule's floor (issue 22.6) and the
test-only Triton interpreter patch that rounds bf16 conversions to nearest even."""
import os

import numpy as np
import pytest
import torch

from fastbert.testing import FLOOR_ULPS, _rne_f32_to_bf16_bits, assert_close, tolerance

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def test_floor_absorbs_a_lucky_peer_but_not_a_real_error():
    """The flake of issue 22.6: PyTorch's own fp32 error happened to be ~1 ulp, the kernel's (another valid
    summation order) ~4 ulps: not a bug. A floor of a few ulps of max|ref| passes it; a real error does not."""
    torch.manual_seed(0)
    ref = torch.randn(40, dtype=torch.float64) * 20
    ulp = torch.finfo(torch.float32).eps * ref.abs().max()
    peer = ref.float()  # rounding only: < 0.5 ulp
    good = (ref + 4 * ulp * torch.sign(torch.randn(40))).float()
    assert_close(good, ref, peer=peer, factor=3)
    for bad in ((ref + (FLOOR_ULPS[torch.float32] + 2) * ulp).float(), (ref * (1 + 1e-5)).float()):
        with pytest.raises(AssertionError, match="exceeds tolerance"):
            assert_close(bad, ref, peer=peer, factor=3)
    # low precision: the final rounding is in the peer's error already; 3 ulps (2.3%) at the max is outside
    ref16 = torch.randn(1000, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close((ref16 * 1.023).to(torch.bfloat16), ref16, peer=ref16.to(torch.bfloat16))
    assert_close(ref16.to(torch.bfloat16), ref16, peer=ref16.to(torch.bfloat16))


def test_tolerance_shape_and_empty():
    ref = torch.randn(3, 5, dtype=torch.float64)
    assert tolerance(ref, ref.float(), torch.float32).shape == ref.shape
    assert tolerance(ref, None, torch.bfloat16).shape == ref.shape
    assert_close(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.float64), peer=torch.zeros(0, 4))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.float64), peer=torch.zeros(1))


def test_rne_bits_match_torch():
    """Round-to-nearest-even fp32 -> bf16 on the bit pattern, against torch's conversion: random patterns,
    ties, the overflow boundary, infinities, subnormals; NaN stays NaN."""
    rng = np.random.default_rng(0)
    special = np.array([0, 0x80000000, 1, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7F7FFF, 0x7F7F8000,
                        0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF],
                       dtype=np.uint32)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32), special])
    x = bits.view(np.float32)
    mine = _rne_f32_to_bf16_bits(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert (mine[~nan] == ref[~nan]).all()
    back = torch.from_numpy(mine.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.isnan(back[nan]).all()


@pytest.mark.skipif(not INTERPRET, reason="checks the CPU interpreter's conversions (TRITON_INTERPRET=1)")
def test_interpreter_bf16_conversions_round_to_nearest_even():
    """Stores, casts, constants and the bf16 -> fp32 / int conversions of the patched interpreter agree with
    torch (the GPU's cvt.rn); an explicit round-toward-zero cast still truncates."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, Y, Z, I, T, N: tl.constexpr):
        o = tl.arange(0, N)
        x = tl.load(X + o)
        tl.store(Y + o, x)  # implicit fp32 -> bf16
        yb = tl.load(Y + o)
        tl.store(Z + o, yb.to(tl.float32) + tl.full([N], 0.5, tl.bfloat16).to(tl.float32))
        tl.store(I + o, yb.to(tl.int32))
        tl.store(T + o, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))

    x = torch.tensor([3.0, 2.99595, 1.00390625, 1.01171875, -7.51, 3.3e38, 1e-40, -0.3], dtype=torch.float32)
    y = torch.empty(8, dtype=torch.bfloat16)
    z = torch.empty(8)
    i = torch.empty(8, dtype=torch.int32)
    t = torch.empty(8, dtype=torch.bfloat16)
    kernel[(1,)](x, y, z, i, t, N=8)
    assert torch.equal(y, x.to(torch.bfloat16))
    assert torch.equal(z, x.to(torch.bfloat16).float() + 0.5)
    assert torch.equal(i, x.to(torch.bfloat16).float().to(torch.int32))
    trunc = torch.from_numpy((x.numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(t, trunc)


def test_non_finite_reference_or_output_fails():
    """A NaN/Inf on either side fails unless the reference holds the same non-finite value there: a NaN
    reference used to pass any output (every comparison with NaN is False), a NaN peer made the rule vacuous."""
    nan, inf = float("nan"), float("inf")
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = ref.float()
    for r, o in (([nan, 2.0, 3.0], [1.0, 2.0, 3.0]),    # reference NaN, output finite
                 ([inf, 2.0, 3.0], [1.0, 2.0, 3.0]),    # reference Inf, output finite
                 ([1.0, 2.0, 3.0], [1.0, inf, 3.0]),    # output Inf, reference finite
                 ([inf, 2.0, 3.0], [-inf, 2.0, 3.0]),   # opposite infinities
                 ([nan, 2.0, 3.0], [inf, 2.0, 3.0])):   # NaN against Inf
        with pytest.raises(AssertionError, match="non-finite"):
            assert_close(torch.tensor(o), torch.tensor(r, dtype=torch.float64), peer=torch.tensor(o))
    # the same non-finite value at the same positions passes; the finite rest is still checked
    r = torch.tensor([nan, -inf, 3.0], dtype=torch.float64)
    assert_close(torch.tensor([nan, -inf, 3.0]), r, peer=torch.tensor([nan, -inf, 3.0]))
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        assert_close(torch.tensor([nan, -inf, 3.1]), r, peer=torch.tensor([nan, -inf, 3.0]))
    # PyTorch's own result overflowing does not turn the bound into inf/NaN
    for p in (nan, inf):
        with pytest.raises(AssertionError, match="exceeds tolerance"):
            assert_close(torch.tensor([1.0, 2.0, 3.5]), ref, peer=torch.tensor([p, 2.0, 3.0]))
    assert_close(out, ref, peer=torch.tensor([nan, 2.0, 3.0]))
