"""The link between a registered custom op and the backend table.

Eagerly, a public op resolves its backend (``fastbert.registry.resolve``) before calling the custom op
and passes the name as a string argument, so the backward runs on the same backend as the forward and
a forced backend that cannot run fails at the call. While ``torch.compile`` traces, the name is left
empty and the op resolves it when it runs (the registry's Python state is not traceable), so compiled
graphs honour ``use_backend`` at run time, per call. The same empty name tells an op's real
implementation that the public function's value checks were skipped while tracing, so it runs them
itself (``traced``) before any kernel sees the data.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastbert import registry as _registry

_EMPTY_SHAPE = (0,)


def pick(primitive: str, device: torch.device, dtype: Optional[torch.dtype], *args) -> str:
    if torch.compiler.is_compiling():
        return ""
    return _registry.resolve(primitive, device, args, dtype)


def traced(backend: str) -> bool:
    """True when the op was called from a ``torch.compile`` graph (the public op's value checks did not run)."""
    return not backend


def run(primitive: str, backend: str, *args):
    if not backend:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        backend = _registry.resolve(primitive, tensors[0].device, args, floats[0] if floats else None)
    return _registry.implementation(primitive, backend)(*args)


def opt_out(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent optional output travels as an empty tensor."""
    return like.new_empty(_EMPTY_SHAPE) if t is None else t


def opt_in(t: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t.numel() == 0 and t.shape == _EMPTY_SHAPE else t
