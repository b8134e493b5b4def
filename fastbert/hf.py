"""fastbert as a Hugging Face transformers attention implementation: ``attn_implementation="fastbert"``.

Importing this module (or calling :func:`register`) registers two functions under the name ``"fastbert"``:

* the attention function (``transformers.AttentionInterface``), which runs ``flash_attn_varlen_alibi`` on the
  real tokens only: a padded batch is unpadded, attended and repadded (zeros at pads); a padding-free batch
  (``DataCollatorWithFlattening``: one row of concatenated sequences whose ``position_ids`` restart, or the
  ``cu_seq_lens_q`` / ``max_length_q`` kwargs) runs with no padding at all;
* the matching mask function (``AttentionMaskInterface``). Without it transformers builds no mask for an
  unknown implementation and hands ``attention_mask=None`` to every layer, so pads would be attended.
  It returns the ``[B, S]`` bool padding mask (None when nothing is padded), as for FlashAttention.

Then ``AutoModel.from_pretrained(path, attn_implementation="fastbert")`` or
``model.set_attn_implementation("fastbert")`` works for every model that dispatches attention through
``AttentionInterface`` (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ModernBERT, ...).

What the kernel cannot do is never silently wrong:

* refused with ``ValueError``: causal / decoder attention, cross-attention, a KV cache, custom mask patterns
  (``or_mask_function`` / ``and_mask_function``, flex ``BlockMask``);
* handed to PyTorch SDPA with a one-time warning naming why: attention dropout while training, head dims
  the kernels lack, a 4-D custom mask, different key/value head counts;
* handed to the model's eager attention with a one-time warning: ``output_attentions=True`` (only eager
  forms the attention probabilities).
"""
from __future__ import annotations

import logging
import sys
import weakref
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from fastbert import ops as _ops
from fastbert.ops import _checks

logger = logging.getLogger("fastbert")

NAME = "fastbert"


# ----------------------------------------------------------------------------------------------
# how the rows of a batch map to packed sequences
# ----------------------------------------------------------------------------------------------
class Varlen(NamedTuple):
    """The packed layout of a ``[B, S]`` batch.

    ``indices``: ``[T]`` int64 positions of the real tokens in the flattened ``[B * S]`` batch, or None when
    every position is a token (no padding: full rows, or a padding-free packed row). ``cu_seqlens``:
    ``[n + 1]`` int32 sequence boundaries in the packed ``[T]`` order. ``max_seqlen``: the longest sequence.
    """
    indices: Optional[Tensor]
    cu_seqlens: Tensor
    max_seqlen: int
    batch: int
    seqlen: int

    def gather(self, t: Tensor) -> Tensor:
        """``[B, S, ...]`` -> ``[T, ...]`` (the real tokens, in row-major order)."""
        flat = t.reshape((self.batch * self.seqlen,) + tuple(t.shape[2:]))
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def scatter(self, x: Tensor) -> Tensor:
        """``[T, ...]`` -> ``[B, S, ...]`` with zeros at the pads."""
        if self.indices is None:
            return x.reshape((self.batch, self.seqlen) + tuple(x.shape[1:]))
        return _ops.pad_input(x, self.indices, self.batch, self.seqlen)


class _LastTensorCache:
    """Remembers the value computed for the last tensor seen (same object, same version): every layer of a
    forward gets the same mask / position_ids tensor, so the layout (one host sync) is computed once."""

    def __init__(self):
        self._ref, self._version, self._value = None, -1, None

    def get(self, t: Tensor, compute: Callable[[Tensor], Varlen]) -> Varlen:
        if torch.compiler.is_compiling() or t.is_inference():  # inference tensors have no version counter
            return compute(t)
        if self._ref is not None and self._ref() is t and t._version == self._version:
            return self._value
        value = compute(t)
        self._ref, self._version, self._value = weakref.ref(t), t._version, value
        return value


_mask_cache, _pos_cache = _LastTensorCache(), _LastTensorCache()


def _full(batch: int, seqlen: int, device) -> Varlen:
    cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
    return Varlen(None, cu, seqlen, batch, seqlen)


def varlen_from_mask(mask: Tensor) -> Varlen:
    """Layout of a padded batch from its ``[B, S]`` mask (nonzero = real token)."""
    def compute(m):
        indices, cu, max_seqlen = _ops.unpad_indices(m)
        return Varlen(indices, cu, max_seqlen, m.shape[0], m.shape[1])
    return _mask_cache.get(mask, compute)


def varlen_from_position_ids(position_ids: Tensor, batch: int) -> Varlen:
    """Layout of rows that may hold several sequences back to back (``DataCollatorWithFlattening``): a new
    sequence starts at each row start and wherever a position id is not its predecessor's plus one (so
    RoBERTa-style ids starting at ``padding_idx + 1`` work too). No padding."""
    def compute(pos):
        pos = pos.expand(batch, -1)
        B, S = pos.shape
        start = torch.ones_like(pos, dtype=torch.bool)
        start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        first = torch.nonzero(start.flatten()).flatten().to(torch.int32)
        cu = torch.cat([first, first.new_tensor([B * S])])
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if B * S else 0
        return Varlen(None, cu, max_seqlen, B, S)
    return _pos_cache.get(position_ids, compute)


def varlen_from_kwargs(kwargs: dict, batch: int, seqlen: int) -> Optional[Varlen]:
    """Layout from FlashAttention's padding-free kwargs (``cu_seq_lens_q``, ``max_length_q``), or None."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        return None
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError("cu_seq_lens_k: differs from cu_seq_lens_q; attn_implementation='fastbert' is "
                         "self-attention only (the same sequences for queries and keys)")
    if batch != 1:
        raise ValueError(f"cu_seq_lens_q: a padding-free batch has one row of concatenated sequences, got {batch} rows")
    cu = cu_q.to(torch.int32).contiguous()
    max_len = kwargs.get("max_length_q")
    max_seqlen = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    return Varlen(None, cu, max_seqlen, 1, seqlen)


def varlen_for(attention_mask: Optional[Tensor], batch: int, seqlen: int, device, kwargs: dict) -> Varlen:
    """The layout of an attention call: padding-free kwargs, else the padding mask, else restarting
    ``position_ids``, else full rows."""
    layout = varlen_from_kwargs(kwargs, batch, seqlen)
    if layout is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask: a padding-free batch (cu_seq_lens_q) must not also carry a padding mask")
        return layout
    if attention_mask is not None:
        return varlen_from_mask(attention_mask)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == seqlen:
        return varlen_from_position_ids(position_ids, batch)
    return _full(batch, seqlen, device)


# ----------------------------------------------------------------------------------------------
# what the kernel cannot do
# ----------------------------------------------------------------------------------------------
_warned = set()


def _warn_once(reason: str, target: str) -> None:
    if (reason, target) not in _warned:
        _warned.add((reason, target))
        logger.warning("attn_implementation='fastbert': %s; these calls run on %s instead", reason, target)


def _refusal(module, query: Tensor, key: Tensor, attention_mask, is_causal, kwargs) -> Optional[str]:
    if is_causal if is_causal is not None else getattr(module, "is_causal", False):
        return ("causal (decoder) attention is not supported: the fastbert kernels are bidirectional "
                "(encoder) attention; use attn_implementation='sdpa' for is_decoder models")
    if "Cross" in type(module).__name__ or query.shape[2] != key.shape[2]:
        return (f"cross-attention ({type(module).__name__}, {query.shape[2]} queries, {key.shape[2]} keys) is not "
                "supported: fastbert attention is self-attention over one packed batch")
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return "a KV cache (incremental decoding) is not supported by the encoder-only fastbert attention"
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        return (f"attention_mask of type {type(attention_mask).__name__} (a flex BlockMask?) is not supported; "
                "fastbert takes a [batch, seq] padding mask")
    return None


def _handoff(query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float, kwargs) -> Optional[tuple]:
    """``(target, reason)`` when this call must run elsewhere, else None."""
    if kwargs.get("output_attentions"):
        return "eager", "output_attentions=True needs the attention probabilities, which flash attention never forms"
    if dropout > 0:
        return "sdpa", (f"attention dropout {dropout} in training (the fastbert kernels have none; set the config's "
                        "attention dropout to 0 to train on them, as MosaicBERT does)")
    if attention_mask is not None and attention_mask.dim() != 2:
        return "sdpa", f"a {attention_mask.dim()}-D custom attention mask (fastbert takes a [batch, seq] padding mask)"
    D = query.shape[-1]
    if D not in _checks.HEAD_DIMS or value.shape[-1] != D:
        return "sdpa", f"head dim {D} (value {value.shape[-1]}); the kernels take {_checks.HEAD_DIMS}"
    if key.shape[1] != query.shape[1]:
        return "sdpa", f"{query.shape[1]} query heads with {key.shape[1]} key/value heads"
    if query.dtype not in _checks.FLOAT_DTYPES:
        return "sdpa", f"dtype {query.dtype}"
    return None


def _dense_mask(layout: Varlen, window: Optional[int], dtype: torch.dtype, device) -> Optional[Tensor]:
    """The additive mask (0 = attend, dtype min = not) that makes SDPA / eager attention compute what the
    varlen call would: ``[B, 1, 1, S]`` for plain padding, ``[B, 1, S, S]`` with packed sequences or a window."""
    B, S = layout.batch, layout.seqlen
    if layout.indices is not None:
        real = torch.zeros(B * S, dtype=torch.bool, device=device)
        real[layout.indices] = True
        real = real.view(B, S)
        if window is None:
            return torch.zeros((B, 1, 1, S), dtype=dtype, device=device).masked_fill(~real[:, None, None, :],
                                                                                      torch.finfo(dtype).min)
        seq = torch.where(real, torch.arange(B, device=device)[:, None], -1)
        pos = real.long().cumsum(1) - 1
    elif layout.cu_seqlens.numel() == B + 1 and layout.max_seqlen == S:
        if window is None:
            return None  # full rows, one sequence each: nothing to mask
        seq = torch.arange(B, device=device)[:, None].expand(B, S)
        pos = torch.arange(S, device=device).expand(B, S)
    else:  # packed sequences (no padding): token t of the flattened batch is in sequence seq[t]
        cu = layout.cu_seqlens.long()
        t = torch.arange(B * S, device=device)
        sid = torch.searchsorted(cu, t, right=True) - 1
        seq, pos = sid.view(B, S), (t - cu[sid]).view(B, S)
    ok = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] >= 0)
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]).abs() <= window
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, torch.finfo(dtype).min)[:, None]


def _run_elsewhere(target: str, module, query, key, value, layout: Optional[Varlen], attention_mask, window,
                   dropout, scaling, kwargs):
    if layout is not None:
        mask = _dense_mask(layout, window, query.dtype, query.device)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:  # a 4-D bool mask: True = attend
        mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    else:
        mask = attention_mask
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                           "max_length_k", "position_ids")}
    if target == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            from transformers.models.bert.modeling_bert import eager_attention_forward as eager
        return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# the attention and mask functions
# ----------------------------------------------------------------------------------------------
def fastbert_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                               is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function.

    Args:
        query, key, value: ``[B, heads, S, D]`` (transformers' layout); fp32/bf16/fp16 (fp64 on the reference).
        attention_mask: ``[B, S]`` bool (True = real token) from :func:`fastbert_mask`, or None.
        dropout: attention dropout probability (non-zero only in training: handed to SDPA).
        scaling: softmax scale (default ``D ** -0.5``).
        sliding_window: FlashAttention's convention: keys within ``sliding_window - 1`` positions either side
            (ModernBERT's local layers), the op's ``window_size``.
        kwargs: ``position_ids`` / ``cu_seq_lens_q`` / ``max_length_q`` for padding-free batches.
    Returns:
        ``(out [B, S, heads, D] in query.dtype (zeros at pads), None)``; the model's eager function's output
        for ``output_attentions=True``.
    Raises:
        ValueError for causal, cross or cached attention, and custom mask objects.
    """
    reason = _refusal(module, query, key, attention_mask, is_causal, kwargs)
    if reason:
        raise ValueError(f"attn_implementation='fastbert': {reason}")
    B, H, S, D = query.shape
    window = sliding_window - 1 if sliding_window is not None else None
    handoff = _handoff(query, key, value, attention_mask, dropout, kwargs)
    custom_mask = attention_mask is not None and attention_mask.dim() != 2  # (always handed off)
    layout = None if custom_mask else varlen_for(attention_mask, B, S, query.device, kwargs)
    if window is not None and layout is not None and layout.max_seqlen <= window + 1:
        window = None  # every key of every sequence is inside the window
    if handoff is not None:
        _warn_once(handoff[1], handoff[0])
        return _run_elsewhere(handoff[0], module, query, key, value, layout, attention_mask, window, dropout,
                              scaling, kwargs)
    q, k, v = (layout.gather(t.transpose(1, 2)) for t in (query, key, value))  # [T, heads, D]
    out = _ops.flash_attn_varlen_alibi(q, k, v, layout.cu_seqlens, layout.max_seqlen, softmax_scale=scaling,
                                       window_size=(window, window) if window is not None else (-1, -1))
    return layout.scatter(out), None


def fastbert_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers mask function: the ``[B, kv_length]`` bool padding mask, or None when nothing is padded.

    Raises ValueError for a custom mask pattern (``or_mask_function`` / ``and_mask_function``), which a
    padding mask cannot express. Causal and sliding-window patterns are applied by the attention function
    (which refuses causal attention)."""
    if kwargs.get("use_vmap"):
        raise ValueError("attn_implementation='fastbert': this model adds a custom mask pattern "
                         "(or_mask_function / and_mask_function) that a padding mask cannot express; use 'sdpa'")
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def register(name: str = NAME) -> str:
    """Register :func:`fastbert_attention_forward` and :func:`fastbert_mask` with transformers under
    ``name`` (idempotent). Returns the name, for ``attn_implementation=``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastbert_attention_forward)
    AttentionMaskInterface.register(name, fastbert_mask)
    return name


register()

__all__ = ["register", "fastbert_attention_forward", "fastbert_mask", "Varlen", "varlen_for", "NAME"]
