"""Put fastbert kernels into Hugging Face BERT models, and load HF BERT weights into fastbert models.

``apply_fastbert(model)`` swaps, in place, the LayerNorms (residual add fused in), the intermediate
``dense -> GELU`` (bias fused into the activation) and, for ``BertForMaskedLM``, the loss (only labelled
rows reach the vocabulary projection) of a Hugging Face BERT-family model. Parameters are shared, not
copied, so the state dict and any optimizer built before or after are unchanged. Attention stays HF's.

``from_hf(hf_model_or_state_dict)`` builds the classic-BERT fastbert model (learned positions, GELU MLP,
padded SDPA attention, unpadded vocabulary) holding the same weights; it reproduces HF's outputs.
"""
from __future__ import annotations

import re
import types
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert import nn as fnn
from fastbert import ops as _ops
from fastbert.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel, BertPreTrainedModel
from fastbert.models.config import BertConfig

# HF ``hidden_act`` -> fastbert GELU ``approximate``; other activations are left alone.
_HF_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


# ----------------------------------------------------------------------------------------------
# replacement modules (same attribute names as the HF modules they replace, so state dicts match)
# ----------------------------------------------------------------------------------------------
class FastDenseAddNorm(nn.Module):
    """Replaces ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + input_tensor)`` with
    the add fused into the LayerNorm op. Keeps ``dense``, ``dropout``, ``LayerNorm`` (shared parameters)."""

    def __init__(self, old: nn.Module):
        super().__init__()
        self.dense = old.dense
        self.dropout = old.dropout
        ln = old.LayerNorm
        self.LayerNorm = ln if isinstance(ln, fnn.LayerNorm) else fnn.LayerNorm.from_torch(ln)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(h, residual=input_tensor)[0]


class FastDenseGELU(nn.Module):
    """Replaces ``BertIntermediate``: ``gelu(x @ W.T + b)`` with the bias fused into the GELU op."""

    def __init__(self, dense: nn.Linear, approximate: str):
        super().__init__()
        self.dense = dense
        self.act = fnn.BiasGELU(approximate)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.act(F.linear(hidden_states, self.dense.weight), self.dense.bias)


class FastHeadTransform(nn.Module):
    """Replaces ``BertPredictionHeadTransform``: ``LayerNorm(gelu(dense(h)))`` (bias fused into GELU)."""

    def __init__(self, old: nn.Module, approximate: str):
        super().__init__()
        self.dense = old.dense
        self.act = fnn.BiasGELU(approximate)
        ln = old.LayerNorm
        self.LayerNorm = ln if isinstance(ln, fnn.LayerNorm) else fnn.LayerNorm.from_torch(ln)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(self.act(F.linear(hidden_states, self.dense.weight), self.dense.bias))


def _sparse_mlm_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                        inputs_embeds=None, labels=None, **kwargs):
    """``BertForMaskedLM.forward`` with fastbert's sparse MLM loss.

    Without labels: HF's behaviour (full ``logits`` ``[B, S, V]``). With labels: ``loss`` (fp32) from the
    labelled rows only and ``logits=None`` (the full logits are exactly what the sparse loss avoids).
    """
    from transformers.modeling_outputs import MaskedLMOutput

    kwargs.pop("return_dict", None)
    out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
    seq = out[0]
    if labels is None:
        return MaskedLMOutput(logits=self.cls(seq), hidden_states=out.hidden_states, attentions=out.attentions)
    preds = self.cls.predictions
    flat = labels.reshape(-1)
    rows = torch.nonzero(flat != -100).flatten()
    h = preds.transform(seq.reshape(-1, seq.shape[-1]).index_select(0, rows))
    bias = preds.decoder.bias if preds.decoder.bias is not None else preds.bias
    weight = preds.decoder.weight
    if weight.dtype != h.dtype:  # autocast: HF's Linear would run in the autocast dtype too
        weight, bias = weight.to(h.dtype), bias.to(h.dtype)
    loss = _ops.sparse_mlm_loss(h, flat.index_select(0, rows), weight, bias, ignore_index=-100)
    return MaskedLMOutput(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)


def _hf_approximate(model: nn.Module) -> Tuple[Optional[str], str]:
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if isinstance(act, str) and act in _HF_GELU:
        return _HF_GELU[act], act
    return None, repr(act)


def apply_fastbert(model: nn.Module, layer_norm: bool = True, mlp: bool = True, mlm_loss: bool = True,
                   return_summary: bool = False):
    """Swap fastbert ops into a Hugging Face BERT-family model, in place.

    Replaced (each switchable): every ``nn.LayerNorm`` (``*SelfOutput`` / ``*Output`` blocks get the
    residual add fused in), every ``*Intermediate`` and ``*PredictionHeadTransform`` dense+GELU (when
    ``config.hidden_act`` is ``gelu``, ``gelu_new`` or ``gelu_pytorch_tanh``), and the MLM loss of a
    ``*ForMaskedLM`` (see ``_sparse_mlm_forward``: with labels, ``logits`` is None).

    Returns the model, or ``(model, summary)`` with ``return_summary``; the summary (also stored as
    ``model.fastbert_patch``) counts what was replaced and says what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a Hugging Face BERT model), got {type(model).__name__}")
    approx, act_name = _hf_approximate(model)
    summary: Dict[str, Any] = {"add_norm": 0, "layer_norm": 0, "dense_gelu": 0, "head_transform": 0,
                               "mlm_loss": False, "skipped": []}
    if mlp and approx is None:
        summary["skipped"].append(f"GELU fusion: hidden_act {act_name} is not one of {sorted(_HF_GELU)}")

    def swap(parent: nn.Module, name: str, new: nn.Module):
        setattr(parent, name, new)

    # Collect first, then replace: mutating while iterating named_modules is fragile.
    targets = [(n, m) for n, m in model.named_modules() if n]
    parents = dict(model.named_modules())
    for full, mod in targets:
        parent_name, _, attr = full.rpartition(".")
        parent = parents[parent_name] if parent_name else model
        cls = type(mod).__name__
        if (layer_norm and cls.endswith("Output") and isinstance(getattr(mod, "LayerNorm", None), nn.LayerNorm)
                and isinstance(getattr(mod, "dense", None), nn.Linear) and hasattr(mod, "dropout")):
            swap(parent, attr, FastDenseAddNorm(mod))
            summary["add_norm"] += 1
        elif mlp and approx is not None and cls.endswith("Intermediate") and isinstance(getattr(mod, "dense", None), nn.Linear):
            swap(parent, attr, FastDenseGELU(mod.dense, approx))
            summary["dense_gelu"] += 1
        elif (cls.endswith("PredictionHeadTransform") and mlp and approx is not None and layer_norm
              and isinstance(getattr(mod, "LayerNorm", None), nn.LayerNorm)):
            swap(parent, attr, FastHeadTransform(mod, approx))
            summary["head_transform"] += 1
    if layer_norm:  # whatever LayerNorm is left (embeddings, or blocks not recognised above)
        for full, mod in list(model.named_modules()):
            if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
                parent_name, _, attr = full.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                swap(parent, attr, fnn.LayerNorm.from_torch(mod))
                summary["layer_norm"] += 1
    if mlm_loss:
        preds = getattr(getattr(model, "cls", None), "predictions", None)
        if hasattr(model, "bert") and preds is not None and hasattr(preds, "decoder") and hasattr(preds, "transform"):
            model.forward = types.MethodType(_sparse_mlm_forward, model)
            summary["mlm_loss"] = True
        elif type(model).__name__.endswith("ForMaskedLM"):
            summary["skipped"].append(f"MLM loss: {type(model).__name__} does not have BERT's bert/cls.predictions layout")
    model.fastbert_patch = summary
    return (model, summary) if return_summary else model


# ----------------------------------------------------------------------------------------------
# Hugging Face weights -> fastbert classic baseline
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf_config, **overrides) -> BertConfig:
    """The fastbert baseline config equivalent to a Hugging Face ``BertConfig`` (learned positions, GELU
    MLP, padded SDPA attention, no vocabulary padding). ``overrides`` replace fields, e.g.
    ``attention_impl="unpadded", attention_probs_dropout_prob=0.0`` to run the HF weights unpadded."""
    pet = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pet != "absolute":
        raise ValueError(f"hf_config: position_embedding_type {pet!r} is not supported (only 'absolute')")
    act = hf_config.hidden_act
    if act not in _HF_GELU:
        raise ValueError(f"hf_config: hidden_act {act!r} is not supported; expected one of {sorted(_HF_GELU)}")
    kw = dict(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
              num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
              intermediate_size=hf_config.intermediate_size,
              hidden_act="gelu" if _HF_GELU[act] == "none" else "gelu_tanh",
              hidden_dropout_prob=hf_config.hidden_dropout_prob,
              attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
              max_position_embeddings=hf_config.max_position_embeddings, type_vocab_size=hf_config.type_vocab_size,
              initializer_range=hf_config.initializer_range, layer_norm_eps=hf_config.layer_norm_eps,
              pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
              position_embedding_type="learned", mlp_type="mlp", attention_impl="padded_sdpa",
              pad_vocab_size_multiple=1, classifier_dropout=getattr(hf_config, "classifier_dropout", None),
              num_labels=getattr(hf_config, "num_labels", 2))
    kw.update(overrides)
    return BertConfig(**kw)


_LAYER_MAP = {
    "attention.output.dense": "attention.out_proj",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "mlp.wi",
    "output.dense": "mlp.wo",
    "output.LayerNorm": "mlp_norm",
}
_TOP_MAP = {
    "embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "bert.embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "bert.embeddings.norm.bias",
    "pooler.dense.weight": "bert.pooler.dense.weight",
    "pooler.dense.bias": "bert.pooler.dense.bias",
}
_HEAD_MAP = {
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf_state_dict(state: Dict[str, Tensor], config: BertConfig) -> Dict[str, Tensor]:
    """Map a Hugging Face BERT state dict (``BertModel`` or a ``Bert*`` head model) onto fastbert names.

    q/k/v are concatenated into ``Wqkv`` (rows ``[q; k; v]``, matching the ``[T, 3, heads, head_dim]``
    view); the word embedding and MLM bias are zero-padded to ``config.padded_vocab_size``. The tied
    decoder (``cls.predictions.decoder.*``) and position-id buffers are dropped; keys that have no fastbert
    counterpart are kept under their HF names so that loading reports them as unexpected.
    """
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[int, str], Dict[str, Tensor]] = {}
    for key, v in state.items():
        k = key[len("bert."):] if key.startswith("bert.") else key
        if k.endswith(("position_ids", "token_type_ids")) or k.startswith("cls.predictions.decoder."):
            continue
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = v
            continue
        if key in _HEAD_MAP:
            out[_HEAD_MAP[key]] = v
            continue
        m = _LAYER_RE.match(k)
        if m:
            i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
            if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault((i, kind), {})[sub.rsplit(".", 1)[1]] = v
                continue
            if sub in _LAYER_MAP:
                out[f"bert.layers.{i}.{_LAYER_MAP[sub]}.{kind}"] = v
                continue
        out[key] = v  # unknown: reported as unexpected by the loader
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"state: layer {i} has only {sorted(parts)} of query/key/value {kind}")
        out[f"bert.layers.{i}.attention.Wqkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    Vp = config.padded_vocab_size
    for name in ("bert.embeddings.word_embeddings.weight", "head.bias"):
        if name in out and out[name].shape[0] < Vp:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros((Vp - t.shape[0],) + tuple(t.shape[1:]))], 0)
    return out


def from_hf(source: Union[nn.Module, Dict[str, Tensor]], config: Optional[Union[BertConfig, Any]] = None,
            model_class: Optional[type] = None, **overrides) -> BertPreTrainedModel:
    """A fastbert model with the weights of a Hugging Face BERT model.

    Args:
        source: an HF ``BertModel`` / ``BertForMaskedLM`` / ``BertForSequenceClassification`` (its
            ``config`` is used), or its ``state_dict()`` (then ``config`` is required).
        config: a fastbert ``BertConfig`` or an HF config (converted by ``config_from_hf``).
        model_class: fastbert class to build; default from the keys (MLM head -> ``BertForMaskedLM``,
            ``classifier`` -> ``BertForSequenceClassification``, else ``BertModel``).
        overrides: config fields to replace (e.g. ``attention_impl="unpadded"``,
            ``attention_probs_dropout_prob=0.0``).
    Returns the model in eval mode if ``source`` was in eval mode (a state dict: eval mode); its
    ``loading_info`` lists keys that were not used.
    """
    training = False
    if isinstance(source, nn.Module):
        if config is None:
            config = getattr(source, "config", None)
        training = source.training
        state = source.state_dict()
    elif isinstance(source, dict):
        state = source
    else:
        raise ValueError(f"source: expected a Hugging Face model or a state dict, got {type(source).__name__}")
    if config is None:
        raise ValueError("config: required when source is a state dict (a fastbert BertConfig or an HF config)")
    if isinstance(config, BertConfig):
        config = BertConfig.from_dict(config.to_dict(), **overrides) if overrides else config
    else:
        config = config_from_hf(config, **overrides)
    if model_class is None:
        if "cls.predictions.transform.dense.weight" in state:
            model_class = BertForMaskedLM
        elif "classifier.weight" in state:
            model_class = BertForSequenceClassification
            config = BertConfig.from_dict(config.to_dict(), num_labels=state["classifier.weight"].shape[0])
        else:
            model_class = BertModel
    if model_class is BertModel:
        model = BertModel(config, add_pooling_layer=any(k.startswith(("pooler.", "bert.pooler.")) for k in state))
    else:
        model = model_class(config)
    with torch.no_grad():
        model.load_checkpoint_state(convert_hf_state_dict(state, config), source="hugging face state dict")
    return model.train(training)


__all__ = ["apply_fastbert", "from_hf", "config_from_hf", "convert_hf_state_dict", "FastDenseAddNorm",
           "FastDenseGELU", "FastHeadTransform"]
