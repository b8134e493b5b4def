"""Put fastbert kernels into Hugging Face encoders, and load HF weights into fastbert models.

``apply_fastbert(model)`` swaps, in place: the LayerNorms (residual add fused in where the HF block does
``LayerNorm(dense(h) + residual)``), the MLP activation (bias fused into GELU; ModernBERT's GeGLU through
``ops.geglu``), the MLM head transform, attention (``attn_implementation="fastbert"``, see ``fastbert.hf``)
and the MLM loss of a ``*ForMaskedLM`` (only labelled rows reach the vocabulary projection, see
``fastbert.hf_unpad``). ``unpad=True`` (BERT, RoBERTa, XLM-RoBERTa, ELECTRA) also makes the encoder unpad
once after the embeddings and run every layer on the real tokens. Parameters are shared, not copied, and
keep their names, so state dicts, ``save_pretrained`` / ``from_pretrained`` and optimizers built before
patching keep working.

``from_hf(hf_model_or_state_dict)`` builds the classic-BERT fastbert model (learned positions, GELU MLP,
padded SDPA attention, unpadded vocabulary) holding the same weights; it reproduces HF's outputs. Every
HF weight is either used or named in an error (``strict=False`` lists the dropped ones instead).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert import hf_unpad
from fastbert import nn as fnn
from fastbert import ops as _ops
from fastbert.hf_unpad import HF_GELU as _HF_GELU
from fastbert.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel, BertPreTrainedModel
from fastbert.models.config import BertConfig


# ----------------------------------------------------------------------------------------------
# replacement modules (same attribute names as the HF modules they replace, so state dicts match)
# ----------------------------------------------------------------------------------------------
def _fast_ln(ln: nn.Module) -> nn.Module:
    return ln if isinstance(ln, fnn.LayerNorm) else fnn.LayerNorm.from_torch(ln)


class FastDenseAddNorm(nn.Module):
    """Replaces ``BertSelfOutput`` / ``BertOutput`` (and their RoBERTa / ELECTRA copies):
    ``LayerNorm(dropout(dense(h)) + input_tensor)`` with the add fused into the LayerNorm op."""

    def __init__(self, old: nn.Module):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = old.dense, old.dropout, _fast_ln(old.LayerNorm)

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
    """Replaces an MLM head transform ``norm(gelu(dense(h)))`` (``BertPredictionHeadTransform``, ELECTRA's
    ``ElectraGeneratorPredictions``, ``ModernBertPredictionHead``); the LayerNorm keeps its name ``norm``."""

    def __init__(self, old: nn.Module, approximate: str, norm: str = "LayerNorm"):
        super().__init__()
        self.dense = old.dense
        self.act = fnn.BiasGELU(approximate)
        self._norm = norm
        setattr(self, norm, _fast_ln(getattr(old, norm)))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return getattr(self, self._norm)(self.act(F.linear(hidden_states, self.dense.weight), self.dense.bias))


class FastFFN(nn.Module):
    """Replaces DistilBERT's ``FFN``: ``dropout(lin2(gelu(lin1(x))))`` with lin1's bias fused into the GELU."""

    def __init__(self, old: nn.Module, approximate: str):
        super().__init__()
        self.lin1, self.lin2, self.dropout = old.lin1, old.lin2, old.dropout
        self.act = fnn.BiasGELU(approximate)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.lin2(self.act(F.linear(x, self.lin1.weight), self.lin1.bias)))


class FastGeGLU(nn.Module):
    """Replaces ``ModernBertMLP``: ``Wo(drop(act(a) * g))`` with ``a, g = Wi(x).chunk(2)`` through ``ops.geglu``
    (Wi's bias, if any, fused in)."""

    def __init__(self, old: nn.Module, approximate: str):
        super().__init__()
        self.Wi, self.Wo, self.drop = old.Wi, old.Wo, old.drop
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.Wo(self.drop(_ops.geglu(F.linear(x, self.Wi.weight), self.Wi.bias, self.approximate)))


# ----------------------------------------------------------------------------------------------
# apply_fastbert
# ----------------------------------------------------------------------------------------------
# model_type -> config key of the MLP activation; fixed activations of heads that ignore the config.
_ACT_KEY = {"distilbert": "activation", "modernbert": "hidden_activation"}
_HEAD_ACT = {"electra": "gelu", "modernbert": None}  # None: config.classifier_activation
_RESIDUAL_NOT_FUSED = {"distilbert": "TransformerBlock", "modernbert": "ModernBertEncoderLayer"}
_HEAD_NORM = {"PredictionHeadTransform": "LayerNorm", "ElectraGeneratorPredictions": "LayerNorm",
              "ModernBertPredictionHead": "norm"}  # MLM head transforms: class-name suffix -> LayerNorm name


def _approx(cfg, key: str) -> Tuple[Optional[str], str]:
    act = getattr(cfg, key, None)
    return (_HF_GELU[act], act) if isinstance(act, str) and act in _HF_GELU else (None, repr(act))


def _swap(cls: str, mod: nn.Module, family: str, cfg, layer_norm: bool, mlp: bool) -> Optional[Tuple[str, nn.Module]]:
    """``(summary key, replacement)`` for a module apply_fastbert replaces, else None."""
    if (layer_norm and cls.endswith("Output") and isinstance(getattr(mod, "LayerNorm", None), nn.LayerNorm)
            and isinstance(getattr(mod, "dense", None), nn.Linear) and hasattr(mod, "dropout")):
        return "add_norm", FastDenseAddNorm(mod)
    if not mlp:
        return None
    approx = _approx(cfg, _ACT_KEY.get(family, "hidden_act"))[0]
    if approx is not None:
        if cls.endswith("Intermediate") and isinstance(getattr(mod, "dense", None), nn.Linear):
            return "dense_gelu", FastDenseGELU(mod.dense, approx)
        if cls == "FFN" and family == "distilbert":
            return "dense_gelu", FastFFN(mod, approx)
        if cls == "ModernBertMLP":
            return "geglu", FastGeGLU(mod, approx)
    norm = next((n for suffix, n in _HEAD_NORM.items() if cls.endswith(suffix)), None)
    if norm is None or not layer_norm or not isinstance(getattr(mod, norm, None), nn.LayerNorm):
        return None
    head_act = _HEAD_ACT.get(family, getattr(cfg, "hidden_act", None))
    head_approx = _HF_GELU.get(head_act) if head_act else _approx(cfg, "classifier_activation")[0]
    return ("head_transform", FastHeadTransform(mod, head_approx, norm)) if head_approx is not None else None


def apply_fastbert(model: nn.Module, layer_norm: bool = True, mlp: bool = True, mlm_loss: bool = True,
                   attention: bool = True, unpad: bool = False, mlm_logits: str = "labelled",
                   return_summary: bool = False):
    """Swap fastbert ops into a Hugging Face encoder (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT,
    ModernBERT, and models with the same module layout), in place.

    Args:
        layer_norm: every ``nn.LayerNorm`` -> ``fastbert.nn.LayerNorm``; in BERT-family ``*Output`` blocks
            with the residual add fused in.
        mlp: the MLP activation with its bias fused (``*Intermediate``, DistilBERT ``FFN``: GELU;
            ``ModernBertMLP``: GeGLU) and the MLM head transform, when the activation is ``gelu``,
            ``gelu_new`` or ``gelu_pytorch_tanh`` (others are left alone and listed as skipped).
        mlm_loss: a ``*ForMaskedLM``'s loss through ``sparse_mlm_loss``; ``mlm_logits`` ("labelled",
            "full" or "none") says what ``logits`` holds when labels are given (see ``fastbert.hf_unpad``).
        attention: ``model.set_attn_implementation("fastbert")`` (see ``fastbert.hf``).
        unpad: BERT / RoBERTa / XLM-RoBERTa / ELECTRA only: unpad once after the embeddings and run every
            layer on the real tokens (outputs repadded with zeros at pads). Needs attention dropout 0 in
            training and a head dim the kernels take.
    Returns the model, or ``(model, summary)`` with ``return_summary``; the summary (also
    ``model.fastbert_patch``) counts what was replaced and lists what was not, and why.
    Raises ValueError for a non-module, or ``unpad=True`` on a family it does not support.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a Hugging Face encoder), got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None) or "unknown"
    if unpad:
        hf_unpad.check_unpad_supported(model, family)  # fail before changing anything
    summary: Dict[str, Any] = {"family": family, "attention": "unchanged", "unpad": False, "add_norm": 0,
                               "layer_norm": 0, "dense_gelu": 0, "geglu": 0, "head_transform": 0,
                               "mlm_loss": False, "skipped": []}
    approx, act_name = _approx(cfg, _ACT_KEY.get(family, "hidden_act"))
    if mlp and approx is None:
        summary["skipped"].append(f"MLP activation fusion: activation {act_name} is not one of {sorted(_HF_GELU)}")
    if layer_norm and family in _RESIDUAL_NOT_FUSED:
        summary["skipped"].append(f"residual add not fused into LayerNorm: {_RESIDUAL_NOT_FUSED[family]} adds it in "
                                  "its own forward, which is kept (its LayerNorms are swapped unfused)")
    # Collect first, then replace: mutating while iterating named_modules is fragile.
    for full, mod in [(n, m) for n, m in model.named_modules() if n]:
        new = _swap(type(mod).__name__, mod, family, cfg, layer_norm, mlp)
        if new is not None:
            parent_name, _, attr = full.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new[1])
            summary[new[0]] += 1
    if layer_norm:  # whatever LayerNorm is left (embeddings, pre-LN blocks, heads not recognised above)
        for full, mod in list(model.named_modules()):
            if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
                parent_name, _, attr = full.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, fnn.LayerNorm.from_torch(mod))
                summary["layer_norm"] += 1
    if attention:
        _set_attention(model, summary)
    if unpad:
        hf_unpad.patch_unpadded_encoder(model, family)
        summary["unpad"] = True
    if mlm_loss and type(model).__name__.endswith("ForMaskedLM"):
        if family in hf_unpad.MLM_HEADS:
            hf_unpad.patch_mlm_loss(model, family, mlm_logits, unpadded=unpad)
            summary["mlm_loss"] = True
        else:
            summary["skipped"].append(f"MLM loss: no head layout known for model type {family!r} "
                                      f"(known: {sorted(hf_unpad.MLM_HEADS)})")
    model.fastbert_patch = summary
    return (model, summary) if return_summary else model


def _set_attention(model: nn.Module, summary: Dict[str, Any]) -> None:
    from fastbert import hf

    can = getattr(model, "_can_set_attn_implementation", None)
    if can is None or not can():
        summary["skipped"].append(f"attention: {type(model).__name__} does not dispatch through transformers' "
                                  "AttentionInterface")
        return
    model.set_attn_implementation(hf.register())
    summary["attention"] = hf.NAME


# ----------------------------------------------------------------------------------------------
# Hugging Face weights -> fastbert classic baseline
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    """Where a family keeps what fastbert's classic BERT needs. Encoder layer keys are the same in all."""
    prefix: str
    classes: Tuple[str, ...]                 # HF classes from_hf takes
    head: Dict[str, str]                     # HF key -> fastbert key (MLM transform, classifier)
    decoder: str                             # HF MLM decoder weight
    decoder_bias: Tuple[str, ...]            # HF keys holding the MLM bias (all must agree)
    head_act: Optional[str] = None           # activation the HF MLM head uses whatever hidden_act says
    position_offset: bool = False            # RoBERTa numbers positions from padding_idx + 1
    extra_top: Dict[str, str] = field(default_factory=dict)


_BERT = _Family("bert.", ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
                {"cls.predictions.transform.dense.weight": "head.dense.weight",
                 "cls.predictions.transform.dense.bias": "head.dense.bias",
                 "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
                 "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
                 "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
                "cls.predictions.decoder.weight", ("cls.predictions.decoder.bias", "cls.predictions.bias"))
_ROBERTA_HEAD = {"lm_head.dense.weight": "head.dense.weight", "lm_head.dense.bias": "head.dense.bias",
                 "lm_head.layer_norm.weight": "head.norm.weight", "lm_head.layer_norm.bias": "head.norm.bias",
                 # RobertaClassificationHead: tanh(dense(h_cls)) -> out_proj, fastbert's pooler + classifier
                 "classifier.dense.weight": "bert.pooler.dense.weight", "classifier.dense.bias": "bert.pooler.dense.bias",
                 "classifier.out_proj.weight": "classifier.weight", "classifier.out_proj.bias": "classifier.bias"}
_FAMILIES = {
    "bert": _BERT,
    "roberta": _Family("roberta.", ("RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification"),
                       _ROBERTA_HEAD, "lm_head.decoder.weight", ("lm_head.decoder.bias", "lm_head.bias"),
                       head_act="gelu", position_offset=True),
    "xlm-roberta": _Family("roberta.", ("XLMRobertaModel", "XLMRobertaForMaskedLM",
                                        "XLMRobertaForSequenceClassification"),
                           _ROBERTA_HEAD, "lm_head.decoder.weight", ("lm_head.decoder.bias", "lm_head.bias"),
                           head_act="gelu", position_offset=True),
    "electra": _Family("electra.", ("ElectraModel", "ElectraForMaskedLM"),
                       {"generator_predictions.dense.weight": "head.dense.weight",
                        "generator_predictions.dense.bias": "head.dense.bias",
                        "generator_predictions.LayerNorm.weight": "head.norm.weight",
                        "generator_predictions.LayerNorm.bias": "head.norm.bias"},
                       "generator_lm_head.weight", ("generator_lm_head.bias",), head_act="gelu"),
}


def _unsupported(what: str) -> ValueError:
    classes = ", ".join(c for f in _FAMILIES.values() for c in f.classes)
    return ValueError(f"{what} is not supported by from_hf; supported model types {sorted(_FAMILIES)} "
                      f"(classes: {classes}). Other encoders: use apply_fastbert(model) on the HF model instead.")


def _family_of(hf_config) -> _Family:
    mt = getattr(hf_config, "model_type", None)
    if mt not in _FAMILIES:
        raise _unsupported(f"model type {mt!r}")
    return _FAMILIES[mt]


def config_from_hf(hf_config, **overrides) -> BertConfig:
    """The fastbert baseline config equivalent to a Hugging Face BERT / RoBERTa / XLM-RoBERTa / ELECTRA config
    (learned positions, GELU MLP, padded SDPA attention, no vocabulary padding). ``overrides`` replace fields,
    e.g. ``attention_impl="unpadded", attention_probs_dropout_prob=0.0`` to run the HF weights unpadded."""
    fam = _family_of(hf_config)
    pet = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pet != "absolute":
        raise ValueError(f"hf_config: position_embedding_type {pet!r} is not supported (only 'absolute')")
    act = hf_config.hidden_act
    if act not in _HF_GELU:
        raise ValueError(f"hf_config: hidden_act {act!r} is not supported; expected one of {sorted(_HF_GELU)}")
    if fam.head_act and _HF_GELU[act] != _HF_GELU[fam.head_act]:
        raise ValueError(f"hf_config: hidden_act {act!r} differs from the {fam.head_act!r} of the "
                         f"{hf_config.model_type} MLM head; fastbert's head uses hidden_act")
    emb = getattr(hf_config, "embedding_size", hf_config.hidden_size)
    if emb != hf_config.hidden_size:
        raise ValueError(f"hf_config: embedding_size {emb} != hidden_size {hf_config.hidden_size} (ELECTRA's "
                         "embeddings_project) is not supported by fastbert's encoder")
    pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    offset = pad + 1 if fam.position_offset else 0
    kw = dict(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
              num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
              intermediate_size=hf_config.intermediate_size,
              hidden_act="gelu" if _HF_GELU[act] == "none" else "gelu_tanh",
              hidden_dropout_prob=hf_config.hidden_dropout_prob,
              attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
              max_position_embeddings=hf_config.max_position_embeddings - offset,
              type_vocab_size=hf_config.type_vocab_size,
              initializer_range=hf_config.initializer_range, layer_norm_eps=hf_config.layer_norm_eps,
              pad_token_id=pad, position_embedding_type="learned", mlp_type="mlp", attention_impl="padded_sdpa",
              pad_vocab_size_multiple=1, classifier_dropout=getattr(hf_config, "classifier_dropout", None),
              num_labels=getattr(hf_config, "num_labels", 2),
              tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
              extra={"position_offset": offset} if offset else {})
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
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf_state_dict(state: Dict[str, Tensor], config: BertConfig, family: str = "bert",
                          strict: bool = True) -> Dict[str, Tensor]:
    """Map a Hugging Face BERT / RoBERTa / XLM-RoBERTa / ELECTRA state dict onto fastbert names.

    q/k/v are concatenated into ``Wqkv`` (rows ``[q; k; v]``); the word embedding, MLM bias and an untied
    decoder are zero-padded to ``config.padded_vocab_size``; RoBERTa's position table drops its first
    ``padding_idx + 1`` rows (its positions start there). The MLM decoder is loaded as ``head.decoder``
    when ``config.tie_word_embeddings`` is False; when True it must equal the word embedding. Only the
    ``position_ids`` / ``token_type_ids`` buffers (constants HF rebuilds) are dropped. Any other key without
    a fastbert counterpart raises ValueError naming it (``strict=False``: it is kept under its HF name, so
    the loader lists it as unexpected and drops it with a warning).
    """
    fam = _FAMILIES.get(family)
    if fam is None:
        raise _unsupported(f"family {family!r}")
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[int, str], Dict[str, Tensor]] = {}
    unused: List[str] = []
    for key, v in state.items():
        k = key[len(fam.prefix):] if key.startswith(fam.prefix) else key
        if k.endswith(("position_ids", "token_type_ids")) or key == fam.decoder or key in fam.decoder_bias:
            continue  # buffers; the decoder and its bias are checked below
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = v
            continue
        if key in fam.head:
            out[fam.head[key]] = v
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
        unused.append(key)
        out[key] = v
    if unused and strict:
        raise ValueError(f"state: {len(unused)} weight(s) have no place in a fastbert model and would be dropped: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''} (pass strict=False to drop them; they are "
                         "then listed in model.loading_info['unexpected_keys'])")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"state: layer {i} has only {sorted(parts)} of query/key/value {kind}")
        out[f"bert.layers.{i}.attention.Wqkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    _convert_decoder(state, fam, config, out)
    offset = int(config.extra.get("position_offset", 0))
    pos = "bert.embeddings.position_embeddings.weight"
    if offset and pos in out:
        out[pos] = out[pos][offset:]
    Vp = config.padded_vocab_size
    for name in ("bert.embeddings.word_embeddings.weight", "head.bias", "head.decoder.weight"):
        if name in out and out[name].shape[0] < Vp:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros((Vp - t.shape[0],) + tuple(t.shape[1:]))], 0)
    return out


def _convert_decoder(state: Dict[str, Tensor], fam: _Family, config: BertConfig, out: Dict[str, Tensor]) -> None:
    biases = [(k, state[k]) for k in fam.decoder_bias if k in state]
    for k, b in biases[1:]:
        if not torch.equal(b, biases[0][1]):
            raise ValueError(f"state: MLM biases {biases[0][0]!r} and {k!r} differ; HF ties them, so one would be "
                             "silently ignored")
    if biases:
        out["head.bias"] = biases[0][1]
    dec = state.get(fam.decoder)
    if dec is None:
        return
    word = state.get(fam.prefix + "embeddings.word_embeddings.weight", state.get("embeddings.word_embeddings.weight"))
    if not config.tie_word_embeddings:
        out["head.decoder.weight"] = dec
    elif word is None or not (dec is word or torch.equal(dec, word)):
        raise ValueError(f"state: {fam.decoder!r} differs from the word embeddings but config.tie_word_embeddings is "
                         "True; build the fastbert config with tie_word_embeddings=False to load the untied decoder")


def from_hf(source: Union[nn.Module, Dict[str, Tensor]], config: Optional[Union[BertConfig, Any]] = None,
            model_class: Optional[type] = None, strict: bool = True, **overrides) -> BertPreTrainedModel:
    """A fastbert model with the weights of a Hugging Face BERT, RoBERTa, XLM-RoBERTa or ELECTRA model.

    Args:
        source: an HF model (``*Model``, ``*ForMaskedLM``, and for BERT / RoBERTa / XLM-R
            ``*ForSequenceClassification``; its ``config`` is used), or its ``state_dict()`` (then ``config``
            is required: the HF config, or a fastbert ``BertConfig`` for BERT-named weights).
        config: a fastbert ``BertConfig`` or an HF config (converted by ``config_from_hf``).
        model_class: fastbert class to build; default from the keys (MLM head -> ``BertForMaskedLM``,
            classifier -> ``BertForSequenceClassification``, else ``BertModel``).
        strict: a weight with no fastbert counterpart raises ValueError naming it (False: dropped, listed).
        overrides: config fields to replace (e.g. ``attention_impl="unpadded"``,
            ``attention_probs_dropout_prob=0.0``).
    Returns the model in eval mode if ``source`` was in eval mode (a state dict: eval mode); its
    ``loading_info`` lists keys that were not used. RoBERTa inputs must be right-padded (its positions
    count from the first token). RoBERTa's classifier applies one more dropout (before its dense layer)
    in training than fastbert's pooler path; outputs in eval mode are the same.
    Raises ValueError naming the model type for anything else, and for weights that would be dropped.
    """
    training = False
    if isinstance(source, nn.Module):
        if config is None:
            config = getattr(source, "config", None)
        mt = getattr(getattr(source, "config", None), "model_type", None)
        fam = _FAMILIES.get(mt)
        if fam is None or type(source).__name__ not in fam.classes:
            raise _unsupported(f"{type(source).__name__} (model type {mt!r})")
        training = source.training
        state = source.state_dict()
    elif isinstance(source, dict):
        state = source
    else:
        raise ValueError(f"source: expected a Hugging Face model or a state dict, got {type(source).__name__}")
    if config is None:
        raise ValueError("config: required when source is a state dict (a fastbert BertConfig or an HF config)")
    if isinstance(config, BertConfig):
        family = next((n for n, f in _FAMILIES.items() if any(k.startswith(f.prefix) for k in state)), "bert")
        config = BertConfig.from_dict(config.to_dict(), **overrides) if overrides else config
    else:
        family = getattr(config, "model_type", None)
        config = config_from_hf(config, **overrides)
    fam = _FAMILIES[family]
    if model_class is None:
        present = {v for k, v in fam.head.items() if k in state}
        if fam.decoder in state or any(v.startswith("head.") for v in present):
            model_class = BertForMaskedLM
        elif "classifier.weight" in present:
            model_class = BertForSequenceClassification
            w = next(state[k] for k, v in fam.head.items() if v == "classifier.weight")
            config = BertConfig.from_dict(config.to_dict(), num_labels=w.shape[0])
        else:
            model_class = BertModel
    if model_class is BertModel:
        pooled = any(k.startswith(("pooler.", fam.prefix + "pooler.")) for k in state)
        model = BertModel(config, add_pooling_layer=pooled)
    else:
        model = model_class(config)
    with torch.no_grad():
        info = model.load_checkpoint_state(convert_hf_state_dict(state, config, family, strict),
                                           source=f"hugging face {family} state dict")
    if strict and info["unexpected_keys"]:
        raise ValueError(f"state: {model_class.__name__} has no place for {info['unexpected_keys']} (pass "
                         "model_class= for a model that has, or strict=False to drop them)")
    return model.train(training)


__all__ = ["apply_fastbert", "from_hf", "config_from_hf", "convert_hf_state_dict", "FastDenseAddNorm",
           "FastDenseGELU", "FastHeadTransform", "FastFFN", "FastGeGLU"]
