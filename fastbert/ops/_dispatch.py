"""The link between a registered custom op and the backend table.

A public op resolves its backend (``fastbert.registry.resolve``) in Python, before the custom op is
called, and passes the name as a string argument. Under ``torch.compile`` that happens at trace time,
so the compiled graph records which implementation runs; eagerly it happens per call.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastbert import registry as _backends

_EMPTY_SHAPE = (0,)


def pick(primitive: str, device: torch.device, dtype: Optional[torch.dtype], *args) -> str:
    return _backends.resolve(primitive, device, args, dtype)


def run(primitive: str, backend: str, *args):
    return _backends.implementation(primitive, backend)(*args)


def opt_out(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent optional output travels as an empty tensor."""
    return like.new_empty(_EMPTY_SHAPE) if t is None else t


def opt_in(t: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t.numel() == 0 and t.shape == _EMPTY_SHAPE else t
