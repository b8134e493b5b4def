"""Hugging Face encoders on the real tokens only, and their MLM loss through ``sparse_mlm_loss``.

Used by ``fastbert.patch.apply_fastbert``; two pieces, each a replaced ``forward`` bound to one model
instance (the modules, parameters and state-dict names stay HF's):

* :func:`patch_unpadded_encoder` (``apply_fastbert(model, unpad=True)``, BERT / RoBERTa / XLM-RoBERTa /
  ELECTRA): the base model unpads once after the embeddings, runs every layer on ``[T, H]`` (fused QKV
  projection, ``flash_attn_varlen_alibi``, and whatever fused modules ``apply_fastbert`` swapped in), and
  repads only what the caller gets back: ``last_hidden_state`` and, when asked, ``hidden_states``
  (zeros at pads). The pooler reads the repadded first token, as HF's does.
* :func:`patch_mlm_loss` (every ``*ForMaskedLM`` of BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT,
  ModernBERT): only the labelled rows reach the head transform and ``sparse_mlm_loss``. With labels,
  ``logits`` follows ``mlm_logits``: ``"labelled"`` (default) ``[n, vocab]`` for the labelled rows in
  row-major ``[B, S]`` order, i.e. HF's ``logits[labels != -100]`` (as ModernBERT's own
  ``sparse_prediction``); ``"full"`` HF's ``[B, S, vocab]``; ``"none"`` no logits (the cheapest training
  step; the tuple output is then ``(loss,)``). Without labels: ``[B, S, vocab]`` as HF.

Both honour ``return_dict`` (tuple outputs as HF builds them) and ``output_hidden_states``.
``output_attentions``, decoder use, cross-attention and caches are refused with a ValueError.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from fastbert import ops as _ops
from fastbert.hf import Varlen, varlen_from_kwargs, varlen_from_position_ids
from fastbert.ops import _checks

# model_type -> GELU ``approximate`` of an HF activation name; other activations keep the model's module.
HF_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
UNPAD_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")


def dense_act(dense: nn.Linear, approximate: Optional[str], act: Optional[Callable] = None) -> Callable:
    """``h -> act(dense(h))`` with the bias fused into fastbert's GELU when ``approximate`` is set."""
    if approximate is None:
        return lambda h: act(dense(h))
    return lambda h: _ops.bias_gelu(F.linear(h, dense.weight), dense.bias, approximate)


# ----------------------------------------------------------------------------------------------
# MLM heads: where each family keeps its encoder, head transform and decoder
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLMHead:
    base: str                                           # attribute holding the encoder
    transform: Callable[[nn.Module], Callable]         # model -> (h [N, H] -> [N, H])
    decoder: Callable[[nn.Module], nn.Linear]           # model -> decoder Linear (weight [V, H], bias [V] or None)
    ignore_index: Callable[[nn.Module], int] = lambda m: -100


def _roberta_transform(m):
    head = m.lm_head
    act = dense_act(head.dense, "none")  # RobertaLMHead applies the erf GELU whatever hidden_act says
    return lambda h: head.layer_norm(act(h))


def _distilbert_transform(m):
    act = dense_act(m.vocab_transform, HF_GELU.get(m.config.activation), m.activation)
    return lambda h: m.vocab_layer_norm(act(h))


MLM_HEADS = {
    "bert": MLMHead("bert", lambda m: m.cls.predictions.transform, lambda m: m.cls.predictions.decoder),
    "roberta": MLMHead("roberta", _roberta_transform, lambda m: m.lm_head.decoder),
    "xlm-roberta": MLMHead("roberta", _roberta_transform, lambda m: m.lm_head.decoder),
    "electra": MLMHead("electra", lambda m: m.generator_predictions, lambda m: m.generator_lm_head),
    "distilbert": MLMHead("distilbert", _distilbert_transform, lambda m: m.vocab_projector),
    "modernbert": MLMHead("model", lambda m: m.head, lambda m: m.decoder,
                          lambda m: m.config.sparse_pred_ignore_index),
}
MLM_LOGITS = ("labelled", "full", "none")


def replace_forward(model: nn.Module, impl: Callable) -> None:
    """``model.forward = impl`` bound to this instance. The bound method reports the signature of the class's
    own ``forward`` (callers such as sentence-transformers read it to choose the arguments they pass), and a
    ``copy.deepcopy`` of the model is bound to the copy."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # without self
    names = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
        for name in names[:len(args)]:
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
        return impl(self, **dict(zip(names, args)), **kwargs)  # arguments by name: the class's own order
    forward.__doc__ = impl.__doc__
    model.forward = types.MethodType(forward, model)


def _flag(model: nn.Module, kw: dict, name: str, default=False):
    v = kw.pop(name, None)
    return getattr(model.config, name, default) if v is None else v


def _mlm_forward(self, **kw):
    """``*ForMaskedLM.forward`` with the sparse MLM loss (see the module docstring for ``logits``)."""
    from transformers.modeling_outputs import MaskedLMOutput

    head, mode, unpadded = self._fastbert_mlm
    labels = kw.pop("labels", None)
    return_dict = _flag(self, kw, "return_dict", True)
    base = getattr(self, head.base)
    if unpadded:
        want_hidden = bool(_flag(base, kw, "output_hidden_states"))
        enc = encode(base, want_hidden=want_hidden, **kw)
        x, layout = enc.x, enc.layout
        hidden_states, attentions = enc.padded_hidden_states(), None
    else:
        out = base(**kw, return_dict=True)
        seq = out[0]
        layout = Varlen(None, seq.new_empty(0, dtype=torch.int32), seq.shape[1], seq.shape[0], seq.shape[1])
        x = seq.reshape(-1, seq.shape[-1])
        hidden_states, attentions = out.hidden_states, out.attentions
    transform, decoder = head.transform(self), head.decoder(self)
    loss, logits = None, None
    if labels is None or mode == "full":
        logits = layout.scatter(decoder(transform(x)))
    if labels is not None:
        ignore = head.ignore_index(self)
        flat = labels.to(x.device).reshape(-1).long()
        if layout.indices is not None:
            flat_real = flat.index_select(0, layout.indices)
            if not torch.compiler.is_compiling() and bool((flat != ignore).sum() != (flat_real != ignore).sum()):
                raise ValueError("labels: some labelled positions are padding (attention_mask == 0); the unpadded "
                                 "encoder computes no output there")
            flat = flat_real
        rows = torch.nonzero(flat != ignore).flatten()
        h = transform(x.index_select(0, rows))
        weight, bias = decoder.weight, decoder.bias
        if weight.dtype != h.dtype:  # autocast: HF's Linear would run in the autocast dtype too
            weight, bias = weight.to(h.dtype), (bias.to(h.dtype) if bias is not None else None)
        loss = _ops.sparse_mlm_loss(h, flat.index_select(0, rows), weight, bias, ignore_index=ignore)
        if mode == "labelled":
            logits = F.linear(h, weight, bias)
    out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
    return out if return_dict else out.to_tuple()


def patch_mlm_loss(model: nn.Module, family: str, mlm_logits: str = "labelled", unpadded: bool = False) -> None:
    """Replace ``model.forward`` (a ``*ForMaskedLM`` of ``family``) by the sparse-loss forward."""
    if mlm_logits not in MLM_LOGITS:
        raise ValueError(f"mlm_logits: expected one of {MLM_LOGITS}, got {mlm_logits!r}")
    model._fastbert_mlm = (MLM_HEADS[family], mlm_logits, unpadded)
    replace_forward(model, _mlm_forward)


# ----------------------------------------------------------------------------------------------
# the unpadded encoder (BERT-family layer layout: attention.self.{query,key,value}, attention.output,
# intermediate, output)
# ----------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Encoder output on the real tokens: ``x`` ``[T, H]``, the ``layout`` to repad it, and (when asked) the
    input of every layer plus the output of the last, unpadded."""
    x: Tensor
    layout: Varlen
    hidden: Optional[List[Tensor]] = None

    def padded_hidden_states(self):
        return None if self.hidden is None else tuple(self.layout.scatter(h) for h in self.hidden)


def check_unpad_supported(model: nn.Module, family: str) -> nn.Module:
    """The base model of ``model`` if its encoder can run unpadded, else a ValueError saying why."""
    if family not in UNPAD_FAMILIES:
        raise ValueError(f"model: unpad=True supports model types {UNPAD_FAMILIES}, got {family!r} "
                         f"({type(model).__name__}); use apply_fastbert(model) (padded, attn_implementation="
                         "'fastbert') for it")
    base = model.base_model
    cfg = base.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("model: unpad=True is for encoders; this config has is_decoder/add_cross_attention set")
    pet = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    if pet != "absolute":
        raise ValueError(f"model: unpad=True supports absolute position embeddings, got {pet!r}")
    d = cfg.hidden_size // cfg.num_attention_heads
    if d not in _checks.HEAD_DIMS:
        raise ValueError(f"model: head dim {d} is not one the fastbert attention kernels take {_checks.HEAD_DIMS}")
    return base


def _layer_forward(layer: nn.Module, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    sa = layer.attention.self
    if sa.training and sa.dropout.p > 0:
        raise ValueError(f"attention dropout {sa.dropout.p} in training: the unpadded fastbert attention has none; "
                         "set config.attention_probs_dropout_prob = 0 before building the model (MosaicBERT trains "
                         "without it), or patch with unpad=False (attention dropout then runs on SDPA)")
    T, nh, d = x.shape[0], sa.num_attention_heads, sa.attention_head_size
    w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
    b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]) if sa.query.bias is not None else None
    qkv = F.linear(x, w, b).view(T, 3, nh, d)  # one GEMM; q/k/v are strided views, no copy
    ctx = _ops.flash_attn_varlen_alibi(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen,
                                       softmax_scale=sa.scaling)
    a = layer.attention.output(ctx.reshape(T, nh * d), x)
    return layer.output(layer.intermediate(a), a)


def encode(base: nn.Module, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
           inputs_embeds=None, want_hidden: bool = False, **kwargs) -> Encoded:
    """Embeddings, unpad once, every layer on ``[T, H]``. ``kwargs`` may carry padding-free layout kwargs
    (``cu_seq_lens_q``, ``max_length_q``); what the unpadded path cannot honour raises ValueError."""
    for name in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by the unpadded fastbert encoder (encoder-only, no cache)")
    if kwargs.get("use_cache"):
        raise ValueError("use_cache: not supported by the unpadded fastbert encoder (encoder-only, no cache)")
    if _flag(base, dict(kwargs), "output_attentions"):
        raise ValueError("output_attentions: the unpadded fastbert encoder never forms attention probabilities; "
                         "run an unpatched model with attn_implementation='eager' to get them")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [batch, seq] (1 = token, 0 = pad), got shape "
                         f"{tuple(attention_mask.shape)}")
    emb = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                          inputs_embeds=inputs_embeds)
    if getattr(base, "embeddings_project", None) is not None:  # ELECTRA with embedding_size != hidden_size
        emb = base.embeddings_project(emb)
    B, S, H = emb.shape
    layout = varlen_from_kwargs(kwargs, B, S)
    if layout is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask: a padding-free batch (cu_seq_lens_q) must not also carry a padding mask")
        x = emb.reshape(B * S, H)
    elif attention_mask is not None:
        x, indices, cu, max_seqlen = _ops.unpad_input(emb, attention_mask != 0)  # the one host sync
        layout = Varlen(indices, cu, max_seqlen, B, S)
    else:
        if position_ids is not None and position_ids.dim() == 2:
            layout = varlen_from_position_ids(position_ids, B)
        else:
            layout = Varlen(None, torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=emb.device), S, B, S)
        x = emb.reshape(B * S, H)
    hidden = [x] if want_hidden else None
    for layer in base.encoder.layer:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_layer_forward, layer, x, layout.cu_seqlens, layout.max_seqlen,
                                                  use_reentrant=False)
        else:
            x = _layer_forward(layer, x, layout.cu_seqlens, layout.max_seqlen)
        if want_hidden:
            hidden.append(x)
    return Encoded(x, layout, hidden)


def _encoder_forward(self, **kw):
    """The base model's ``forward``, unpadded (see the module docstring)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    return_dict = _flag(self, kw, "return_dict", True)
    want_hidden = bool(_flag(self, kw, "output_hidden_states"))
    enc = encode(self, want_hidden=want_hidden, **kw)
    last = enc.layout.scatter(enc.x)
    pooler = getattr(self, "pooler", None)
    out = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=last, pooler_output=pooler(last) if pooler is not None else None,
        hidden_states=enc.padded_hidden_states())
    return out if return_dict else out.to_tuple()


def patch_unpadded_encoder(model: nn.Module, family: str) -> nn.Module:
    """Make the base model of ``model`` run unpadded (in place); returns the base model."""
    base = check_unpad_supported(model, family)
    replace_forward(base, _encoder_forward)
    return base


__all__ = ["patch_unpadded_encoder", "patch_mlm_loss", "encode", "Encoded", "MLM_HEADS", "MLM_LOGITS",
           "UNPAD_FAMILIES", "HF_GELU", "dense_act"]
