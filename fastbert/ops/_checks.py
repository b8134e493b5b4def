"""Input validation for the public ops: every error names the argument and says what was expected.

Shape/dtype/device checks are metadata only. Value checks on ``cu_seqlens`` and ``labels`` need the
data: they run eagerly (one small host sync) and are skipped while ``torch.compile`` traces; a
``cu_seqlens`` tensor that was already checked (same storage, same version) is not checked again, so a
12-layer model pays for it once per step.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (32, 64, 128)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


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


_validated_cu = {}


def cu_seqlens(cu: torch.Tensor, total: int, max_seqlen: int, device: torch.device) -> None:
    """cu_seqlens: int32 ``[B+1]`` contiguous on ``device``, 0 first, non-decreasing, ``total`` last, and
    no sequence longer than ``max_seqlen``."""
    tensor("cu_seqlens", cu, dtypes=(torch.int32,), dim=1, device=device)
    if cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape [batch + 1] with batch >= 1, got {tuple(cu.shape)}")
    if not cu.is_contiguous():
        raise ValueError("cu_seqlens: expected a contiguous tensor")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"max_seqlen: expected a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected a non-negative int, got {max_seqlen}")
    if _compiling():
        return
    # Inference tensors (torch.inference_mode) have no version counter: they are checked every call.
    key = None if cu.is_inference() else (cu.data_ptr(), cu._version, cu.shape[0], total, max_seqlen)
    if key is not None and _validated_cu.get(cu.device.type) == key:
        return
    c = cu.long()
    lens = c[1:] - c[:-1]
    # one host sync for all four facts
    first, last, min_len, max_len = torch.stack([c[0], c[-1], lens.min(), lens.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
    if min_len < 0:
        raise ValueError("cu_seqlens: expected non-decreasing values (sequence lengths >= 0)")
    if last != total:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == {total} (the number of tokens), got {last}")
    if max_len > max_seqlen:
        raise ValueError(f"max_seqlen: expected at least the longest sequence ({max_len}), got {max_seqlen}")
    if key is not None:
        _validated_cu[cu.device.type] = key


def labels(lab: torch.Tensor, n_rows: int, vocab: int, ignore_index: int, device: torch.device) -> None:
    tensor("labels", lab, dtypes=(torch.int64, torch.int32), dim=1, device=device)
    if lab.shape[0] != n_rows:
        raise ValueError(f"labels: expected shape ({n_rows},) (one label per row of hidden), got {tuple(lab.shape)}")
    if _compiling() or lab.numel() == 0:
        return
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= vocab))
    if bool(bad.any()):
        v = int(lab[bad][0])
        raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, found {v}")


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
