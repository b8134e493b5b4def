"""Small pieces of the recipe switches of ``BertConfig``: the sinusoidal position table (Cramming), the fp32
LayerNorm of the classic baseline, and the LayerNorm factory every module of the model uses."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert import nn as fnn
from fastbert.models.config import BertConfig


def sinusoidal_positions(n_positions: int, dim: int) -> Tensor:
    """``[n_positions, dim]`` fp32: ``sin(p * w_i)`` in even columns and ``cos(p * w_i)`` in odd ones,
    ``w_i = 10000^(-2i/dim)`` (Vaswani et al. 2017, section 3.5)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe.float()


class Fp32LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed and returned in fp32 whatever the input dtype, with the same
    ``forward(x)`` / ``forward(x, residual) -> (y, x + residual)`` interface as ``fastbert.nn.LayerNorm``.

    This is what classic BERT gets under autocast (layer_norm is on autocast's fp32 list), so the residual
    stream stays fp32: the baseline MosaicBERT's low-precision LayerNorm is compared with."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        z = x.float() if residual is None else x.float() + residual.float()
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(z, self.normalized_shape, w, b, self.eps)
        return y if residual is None else (y, z)


def make_layer_norm(config: BertConfig) -> nn.Module:
    """fastbert's low-precision LayerNorm, or :class:`Fp32LayerNorm` when ``config.fp32_layer_norm``."""
    cls = Fp32LayerNorm if config.fp32_layer_norm else fnn.LayerNorm
    return cls(config.hidden_size, eps=config.layer_norm_eps)
