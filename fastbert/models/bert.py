"""MosaicBERT-style encoder and heads, built on ``fastbert.nn``; the same code builds the classic BERT baseline.

Data flow (``attention_impl="unpadded"``, the default): embeddings ``[B, S, H]`` -> ``unpad_input`` once ->
every layer works on the ``[T, H]`` real tokens with ``cu_seqlens`` / ``max_seqlen`` -> the MLM head takes
only the labelled rows (``labels != -100``) -> ``sparse_mlm_loss``. A padded ``[B, S, ...]`` tensor is built
only when a caller asks for one (``BertModel.forward``'s ``last_hidden_state``, MLM logits without labels).
With ``attention_impl="padded_sdpa"`` the layers run on ``[B, S, H]`` and the real tokens are gathered at the
end, so the heads are shared.

Layer (post-LN, as BERT and MosaicBERT): ``x = LN(x + drop(attn(x)))``, ``x = LN(x + drop(mlp(x)))``, the
residual add fused into the LayerNorm op. Pre-LN (``config.layer_norm_position="pre"``, 24hBERT / Cramming):
``x = x + drop(attn(LN(x)))``, ``x = x + drop(mlp(LN(x)))`` and one more LayerNorm after the last layer.

State-dict layout (``fastbert.patch`` maps Hugging Face BERT names onto it)::

    bert.embeddings.{word_embeddings, token_type_embeddings, position_embeddings (learned only), norm}
    bert.layers.{i}.attention.{Wqkv, out_proj}   bert.layers.{i}.attention_norm
    bert.layers.{i}.mlp.{wi, wo}                  bert.layers.{i}.mlp_norm
    bert.final_norm (pre-LN only)                 bert.embeddings.position_scale (sinusoidal only)
    bert.pooler.dense (classification)            head.{dense, norm, bias} (MLM; decoder tied to word_embeddings,
                                                  or head.decoder when config.tie_word_embeddings is False)
    classifier (classification)
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert import nn as fnn
from fastbert import ops as _ops
from fastbert.models.config import BertConfig
from fastbert.models.components import make_layer_norm, sinusoidal_positions

logger = logging.getLogger("fastbert")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class BertModelOutput:
    """``last_hidden_state`` ``[B, S, H]`` (zeros at pads); ``pooler_output`` ``[B, H]`` or None."""
    last_hidden_state: Tensor
    pooler_output: Optional[Tensor] = None


@dataclass
class MaskedLMOutput:
    """Output of ``BertForMaskedLM``.

    Without labels: ``logits`` ``[B, S, vocab_size]`` over real tokens, zeros at pads; ``loss`` None.
    With labels: ``loss`` fp32 scalar (mean over labelled rows; 0 when there are none); ``n_masked`` (int)
    labelled rows; ``masked_labels`` ``[n_masked]`` int64, the labels of those rows in row-major ``[B, S]``
    order. When logits are requested (``return_logits``, default: in eval mode) ``logits`` is
    ``[n_masked, vocab_size]`` for those rows only and ``n_correct`` a 0-d int64 tensor (argmax hits);
    otherwise both are None (training pays for no extra vocab projection).

    The loss normalises over ``padded_vocab_size`` columns (MosaicBERT: the padding rows of the tied
    embedding are real, never-correct classes); returned logits and argmax use the real ``vocab_size``.
    """
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    n_masked: int = 0
    n_correct: Optional[Tensor] = None
    masked_labels: Optional[Tensor] = None

    @property
    def masked_accuracy(self) -> Optional[float]:
        """``n_correct / n_masked`` as a float (a host sync), None when unknown or nothing was masked."""
        if self.n_correct is None or self.n_masked == 0:
            return None
        return float(self.n_correct) / self.n_masked


@dataclass
class SequenceClassifierOutput:
    """``logits`` ``[B, num_labels]``; ``loss`` fp32 scalar (MSE when num_labels == 1, else cross-entropy)
    or None without labels."""
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


@dataclass
class _Encoded:
    """The encoder's output in unpadded form: ``x`` ``[T, H]`` and what is needed to repad it."""
    x: Tensor
    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch: int
    seqlen: int


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _check_2d_like(name: str, t: Optional[Tensor], shape, allow_float: bool = False):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (like input_ids), got {tuple(t.shape)}")
    ok = t.dtype in _INT_DTYPES or t.dtype == torch.bool or (allow_float and t.is_floating_point())
    if not ok:
        raise ValueError(f"{name}: expected an integer{' / bool / float' if allow_float else ''} tensor, got {t.dtype}")


def _check_inputs(config: BertConfig, input_ids, attention_mask, token_type_ids, labels=None):
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an integer tensor [B, S], got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected dtype int64 or int32, got {input_ids.dtype}")
    S = input_ids.shape[1]
    if config.position_embedding_type == "learned" and S > config.max_position_embeddings:
        raise ValueError(f"input_ids: sequence length {S} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings} of this learned-position model (ALiBi models have no limit)")
    _check_2d_like("attention_mask", attention_mask, input_ids.shape, allow_float=True)
    _check_2d_like("token_type_ids", token_type_ids, input_ids.shape)
    if labels is not None and not isinstance(labels, Tensor):
        raise ValueError(f"labels: expected a tensor, got {type(labels).__name__}")


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + token type (+ learned position) embeddings, LayerNorm, dropout: ``[B, S]`` ids -> ``[B, S, H]``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, H, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.position_embeddings = None  # ALiBi: position enters as an attention bias
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        elif config.position_embedding_type == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(config.max_position_embeddings, H), persistent=False)
            self.position_scale = nn.Parameter(torch.tensor([H ** -0.5]))
        self.norm = make_layer_norm(config) if config.embedding_layer_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """``[B, S]`` ids -> ``[B, S, H]`` (positions 0..S-1), or ``[T]`` ids of unpadded tokens with their
        ``position_ids`` ``[T]`` (used by learned and sinusoidal positions) -> ``[T, H]``."""
        emb = self.word_embeddings(input_ids)
        if token_type_ids is None:
            emb = emb + self.token_type_embeddings.weight[0]
        else:
            emb = emb + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            emb = emb + (self.position_embeddings.weight[: input_ids.shape[1]] if position_ids is None
                         else self.position_embeddings(position_ids))
        elif hasattr(self, "position_scale"):
            table = self.sinusoid[: input_ids.shape[1]] if position_ids is None else self.sinusoid[position_ids]
            emb = emb + self.position_scale * table
        return self.dropout(emb if self.norm is None else self.norm(emb))


class BertLayer(nn.Module):
    """One encoder layer, post-LN (default) or pre-LN (``config.layer_norm_position``).

    ``forward(x [T, H], cu_seqlens, max_seqlen)`` (unpadded) or ``forward(x [B, S, H], attention_mask=m)``
    (padded SDPA) -> same shape as x. ``attention_norm`` / ``mlp_norm`` follow their sublayer (post-LN) or
    precede it (pre-LN).
    """

    def __init__(self, config: BertConfig, layer_idx: int = 0):
        super().__init__()
        H = config.hidden_size
        self.pre_ln = config.layer_norm_position == "pre"
        self.attention = fnn.AlibiSelfAttention(H, config.num_attention_heads,
                                                alibi=config.position_embedding_type == "alibi",
                                                attention_dropout=config.attention_probs_dropout_prob,
                                                bias=config.linear_bias,
                                                window_size=config.attention_window(layer_idx))
        self.attention_norm = make_layer_norm(config)
        self.mlp = fnn.GatedMLP(H, config.intermediate_size, gated=config.mlp_type == "glu",
                                approximate=config.gelu_approximate, bias=config.linear_bias)
        self.mlp_norm = make_layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _attend(self, x: Tensor, cu_seqlens, max_seqlen, attention_mask) -> Tensor:
        if attention_mask is not None:
            return self.attention.forward_padded(x, attention_mask)
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("cu_seqlens and max_seqlen are required for unpadded input (or pass attention_mask)")
        return self.attention(x, cu_seqlens, max_seqlen)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        if self.pre_ln:
            h = self._attend(self.attention_norm(x), cu_seqlens, max_seqlen, attention_mask)
            y, x = self.mlp_norm(self.dropout(h), residual=x)  # y = LN(x + h) feeds the MLP, x the stream
            return x + self.dropout(self.mlp(y))
        h = self._attend(x, cu_seqlens, max_seqlen, attention_mask)
        x = self.attention_norm(self.dropout(h), residual=x)[0]
        x = self.mlp_norm(self.dropout(self.mlp(x)), residual=x)[0]
        return x


class BertPooler(nn.Module):
    """``tanh(dense(h_cls))``: ``[B, H]`` -> ``[B, H]``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h))


class BertMLMHead(nn.Module):
    """The MLM prediction head: ``dense -> GELU (bias fused) -> LayerNorm`` on ``[N, H]`` rows, then the
    decoder tied to the word embedding (passed in, never copied) with its own ``bias`` ``[padded_vocab]``.
    ``config.mlm_head_transform=False`` drops the transform (``dense``/``norm`` are None, rows go to the
    decoder as they are); ``config.mlm_decoder_bias=False`` drops ``bias`` (None). With
    ``config.tie_word_embeddings=False`` the head owns ``decoder`` (``Linear(H, padded_vocab)``, no bias)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = self.act = self.norm = None
        if config.mlm_head_transform:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.act = fnn.BiasGELU(config.gelu_approximate)
            self.norm = make_layer_norm(config)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size)) if config.mlm_decoder_bias else None
        self.decoder = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False))
        self.loss_fn = fnn.SparseMLMLoss(ignore_index=-100)

    def transform(self, h: Tensor) -> Tensor:
        if self.dense is None:
            return h
        return self.norm(self.act(F.linear(h, self.dense.weight), self.dense.bias))

    def logits(self, h: Tensor, weight: Tensor, vocab_size: int) -> Tensor:
        """``[N, H]`` transformed rows -> ``[N, vocab_size]`` (the padding columns are dropped)."""
        w = weight[:vocab_size]
        return F.linear(h, w.to(h.dtype), None if self.bias is None else self.bias[:vocab_size].to(h.dtype))

    def dense_loss(self, h: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """Classic BERT's loss: logits ``[N, padded_vocab]`` for every row of ``h`` ``[N, H]`` (labelled or
        not), then fp32 cross-entropy over the rows whose label is not -100 (0 when there are none)."""
        logits = F.linear(h, weight.to(h.dtype), None if self.bias is None else self.bias.to(h.dtype))
        ignore = self.loss_fn.ignore_index
        total = F.cross_entropy(logits.float(), labels, ignore_index=ignore, reduction="sum")
        return total / (labels != ignore).sum().clamp(min=1)  # no host sync; no labels -> 0, not NaN


# ----------------------------------------------------------------------------------------------
# checkpoint I/O and initialisation shared by all models
# ----------------------------------------------------------------------------------------------
class BertPreTrainedModel(nn.Module):
    """Initialisation (BERT's: normal(0, initializer_range), zero biases, unit LayerNorm), parameter
    counting and ``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``)."""

    #: state-dict prefixes a checkpoint may lack (a head new to this task); anything else missing is an error.
    _new_head_prefixes: Tuple[str, ...] = ()

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise ValueError(f"config: expected a fastbert BertConfig, got {type(config).__name__}")
        self.config = config
        self.loading_info: Optional[Dict[str, List[str]]] = None

    def _init_module(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, (fnn.LayerNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BertMLMHead) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings) and hasattr(module, "position_scale"):
            nn.init.constant_(module.position_scale, self.config.hidden_size ** -0.5)

    def init_weights(self):
        self.apply(self._init_module)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (the tied decoder is the word embedding, counted once)."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embeddings." in name):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def compile_layers(self, **kwargs):
        """``torch.compile`` every encoder layer in place with ``fullgraph=True`` (the fastbert ops are
        custom ops, so a layer traces whole); unpadding and the selection of labelled rows, which are
        data-dependent, stay eager. ``kwargs`` go to ``torch.compile`` (e.g. ``backend``, ``mode``). Returns self."""
        encoder = self if isinstance(self, BertModel) else self.bert
        for layer in encoder.layers:
            layer.compile(fullgraph=True, **kwargs)
        return self

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors`` (each via a temp file + rename,
        so a crash never leaves a half-written file under the final name)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        cfg_path = os.path.join(directory, CONFIG_NAME)
        d = dict(self.config.to_dict(), architecture=type(self).__name__)  # for readers; from_dict ignores it
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(cfg_path + ".tmp", cfg_path)
        # The tied decoder is not a separate tensor, so no shared storage reaches safetensors.
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        w_path = os.path.join(directory, WEIGHTS_NAME)
        save_file(sd, w_path + ".tmp", metadata={"format": "pt"})
        os.replace(w_path + ".tmp", w_path)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, *, device="cpu", **overrides):
        """Load a model saved by ``save_pretrained``; ``overrides`` replace config fields (e.g.
        ``num_labels=3``, ``attention_impl="padded_sdpa"``, ``hidden_dropout_prob=0.0``).

        The checkpoint may come from another head on the same encoder (an MLM checkpoint into
        ``BertForSequenceClassification``, or a bare ``BertModel``): parameters under
        ``_new_head_prefixes`` that it lacks are freshly initialised and logged; keys this model does not
        have are dropped and logged; both lists are kept in ``model.loading_info``. A missing encoder
        parameter or a shape mismatch raises ValueError naming the key.
        """
        from safetensors.torch import load_file

        cfg_path = os.path.join(directory, CONFIG_NAME)
        w_path = os.path.join(directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"directory: {directory!r} has no {os.path.basename(p)} (expected a directory "
                                 f"written by save_pretrained)")
        config = BertConfig.load(cfg_path, **overrides)
        model = cls(config)
        state = load_file(w_path, device=str(device))
        model.load_checkpoint_state(state, source=directory)
        return model.to(device)

    def load_checkpoint_state(self, state: Dict[str, Tensor], source: str = "state_dict") -> Dict[str, List[str]]:
        """Load a (possibly other-head) state dict as described in ``from_pretrained``; returns
        ``{"missing_keys", "unexpected_keys"}`` (also stored in ``self.loading_info``)."""
        own = self.state_dict()
        state = _adapt_prefix(state, own)
        for k, v in state.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"checkpoint {source}: parameter {k!r} has shape {tuple(v.shape)} but the model "
                                 f"expects {tuple(own[k].shape)} (check the config, e.g. num_labels / vocab_size)")
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        fatal = [k for k in missing if not k.startswith(self._new_head_prefixes)]
        if fatal:
            raise ValueError(f"checkpoint {source}: missing encoder parameters {fatal[:8]}"
                             f"{' ...' if len(fatal) > 8 else ''} (does the config match the checkpoint?)")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if missing:
            logger.warning("%s: newly initialised from %s (not in the checkpoint): %s", type(self).__name__,
                           source, missing)
        if unexpected:
            logger.warning("%s: checkpoint %s has parameters this model does not use (dropped): %s",
                           type(self).__name__, source, unexpected)
        self.loading_info = {"missing_keys": missing, "unexpected_keys": unexpected}
        return self.loading_info


def _adapt_prefix(state: Dict[str, Tensor], own: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Move between a bare ``BertModel`` state dict and a head model's (``bert.`` prefix)."""
    own_prefixed = any(k.startswith("bert.") for k in own)
    src_prefixed = any(k.startswith("bert.") for k in state)
    if own_prefixed and not src_prefixed:
        return {("bert." + k if k.split(".")[0] in ("embeddings", "layers", "pooler") else k): v
                for k, v in state.items()}
    if src_prefixed and not own_prefixed:
        return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
    return dict(state)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class BertModel(BertPreTrainedModel):
    """The encoder: ``forward(input_ids [B, S], attention_mask [B, S] = None, token_type_ids = None)`` ->
    ``BertModelOutput`` (padded hidden states, zeros at pads; pooled [CLS] when ``add_pooling_layer``).
    Heads call ``encode`` and stay unpadded."""

    _new_head_prefixes = ("pooler.",)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False, _init: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        # Pre-LN leaves the residual stream unnormalised: the last layer's output needs its own LayerNorm.
        self.final_norm = make_layer_norm(config) if config.layer_norm_position == "pre" else None
        self.pooler = BertPooler(config) if add_pooling_layer else None
        if _init:
            self.init_weights()

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None) -> _Encoded:
        """Run embeddings and layers; returns the real tokens ``[T, H]`` with ``indices`` / ``cu_seqlens``."""
        _check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones((B, S), dtype=torch.bool, device=input_ids.device)
        mask = attention_mask.bool()
        if self.config.attention_impl == "unpadded":
            # Unpad the ids, not the embeddings: the embedding sum, its LayerNorm and dropout (and their
            # backward) then run on real tokens only.
            indices, cu_seqlens, max_seqlen = _ops.unpad_indices(mask)  # host sync: T and max_seqlen
            ids, types = (None if t is None else t.reshape(-1).index_select(0, indices)
                          for t in (input_ids, token_type_ids))
            x = self.embeddings(ids, types, position_ids=indices % S)
            for layer in self.layers:
                x = layer(x, cu_seqlens, max_seqlen)
        else:
            h = self.embeddings(input_ids, token_type_ids)
            for layer in self.layers:
                h = layer(h, attention_mask=mask)
            x, indices, cu_seqlens, max_seqlen = _ops.unpad_input(h, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return _Encoded(x, indices, cu_seqlens, max_seqlen, B, S)

    @staticmethod
    def mean_tokens(enc: _Encoded) -> Tensor:
        """``[B, H]``: the mean of each sequence's real tokens (fp32 sums, returned in ``enc.x.dtype``); an
        empty sequence gets zeros."""
        x = enc.x
        seq = torch.div(enc.indices, enc.seqlen, rounding_mode="floor")  # [T]: which sequence a token is in
        sums = torch.zeros(enc.batch, x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, seq, x.float())
        counts = (enc.cu_seqlens[1:] - enc.cu_seqlens[:-1]).clamp(min=1).unsqueeze(1)  # static shape [B, 1]
        return (sums / counts).to(x.dtype)

    @staticmethod
    def first_tokens(enc: _Encoded) -> Tensor:
        """``[B, H]``: each sequence's first real token ([CLS] for right-padded batches). An empty sequence
        gets a neighbour's row (finite, meaningless)."""
        T = enc.x.shape[0]
        empty = "attention_mask: every sequence is empty; there is no [CLS] token to pool"
        if torch.compiler.is_compiling():  # T is data-dependent: an assert in the graph, no guard
            torch._assert_async(enc.cu_seqlens[-1] > 0, empty)
        elif T == 0:
            raise ValueError(empty)
        start = enc.cu_seqlens[:-1].long().clamp(max=T - 1)
        return enc.x.index_select(0, start)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> BertModelOutput:
        enc = self.encode(input_ids, attention_mask, token_type_ids)
        hidden = _ops.pad_input(enc.x, enc.indices, enc.batch, enc.seqlen)
        pooled = self.pooler(self.first_tokens(enc)) if self.pooler is not None else None
        return BertModelOutput(hidden, pooled)


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the MLM head; the decoder weight is the word embedding (tied, one tensor) unless
    ``config.tie_word_embeddings`` is False.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, return_logits=None)`` ->
    ``MaskedLMOutput`` (see there for what ``logits`` holds with and without labels). ``labels`` ``[B, S]``
    int, -100 where not masked; a label on a padding position is an error. ``return_logits`` defaults to
    ``not self.training``.
    """

    _new_head_prefixes = ("head.",)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False, _init=False)
        self.head = BertMLMHead(config)
        self.init_weights()

    @property
    def decoder_weight(self) -> Tensor:
        if self.head.decoder is not None:
            return self.head.decoder.weight
        return self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                return_logits: Optional[bool] = None) -> MaskedLMOutput:
        if labels is not None and isinstance(input_ids, Tensor):  # (bad input_ids: encode says so)
            _check_2d_like("labels", labels, input_ids.shape)
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids)
        V = self.config.vocab_size
        if labels is None:
            logits = self.head.logits(self.head.transform(enc.x), self.decoder_weight, V)
            return MaskedLMOutput(logits=_ops.pad_input(logits, enc.indices, enc.batch, enc.seqlen))

        ignore = self.head.loss_fn.ignore_index
        labels_t = labels.reshape(-1).long().index_select(0, enc.indices)  # [T]
        rows = torch.nonzero(labels_t != ignore).flatten()
        n_masked = rows.numel()
        if attention_mask is not None:
            on_pads = "labels: some labelled positions are padding (attention_mask == 0)"
            if torch.compiler.is_compiling():  # data-dependent: an assert in the graph, no guard
                torch._assert_async((labels != ignore).sum() == n_masked, on_pads)
            elif n_masked != int((labels != ignore).sum()):
                raise ValueError(on_pads)
        masked_labels = labels_t.index_select(0, rows)
        if self.config.mlm_head == "dense":
            h, loss = self._dense_head(enc, labels, rows)
        else:
            h = self.head.transform(enc.x.index_select(0, rows))  # only the labelled rows reach the head
            loss = self.head.loss_fn(h, masked_labels, self.decoder_weight, self.head.bias,
                                     max_labelled=n_masked)  # every row is labelled: no host sync in the op
        if return_logits is None:
            return_logits = not self.training
        logits = n_correct = None
        if return_logits:
            logits = self.head.logits(h, self.decoder_weight, V)
            n_correct = (logits.argmax(-1) == masked_labels).sum()
        return MaskedLMOutput(loss=loss, logits=logits, n_masked=n_masked, n_correct=n_correct,
                              masked_labels=masked_labels)


    def _dense_head(self, enc: _Encoded, labels: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """The classic head: every position of the padded ``[B, S]`` batch goes through the transform and
        the vocabulary projection (pads included, as Hugging Face's BERT does). Returns the transformed
        labelled rows ``[n_masked, H]`` and the loss."""
        h_all = _ops.pad_input(enc.x, enc.indices, enc.batch, enc.seqlen).reshape(enc.batch * enc.seqlen, -1)
        h_all = self.head.transform(h_all)
        loss = self.head.dense_loss(h_all, labels.reshape(-1).long(), self.decoder_weight)
        return h_all.index_select(0, enc.indices.index_select(0, rows)), loss


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT + pooler on the first token (or the token mean: ``config.classifier_pooling``) + dropout +
    ``classifier = Linear(H, num_labels)``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)`` ->
    ``SequenceClassifierOutput``: ``logits`` ``[B, num_labels]``; with ``labels`` ``[B]``, ``loss`` is
    cross-entropy (int labels) or, when ``num_labels == 1``, MSE regression on float labels.
    ``from_pretrained(mlm_dir, num_labels=k)`` keeps the encoder of an MLM checkpoint and initialises the
    pooler and classifier (reported in ``loading_info``).
    """

    _new_head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config: BertConfig, num_labels: Optional[int] = None):
        if num_labels is not None and num_labels != config.num_labels:
            config = replace(config, num_labels=num_labels)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True, _init=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> SequenceClassifierOutput:
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids)
        pick = BertModel.mean_tokens if self.config.classifier_pooling == "mean" else BertModel.first_tokens
        pooled = self.bert.pooler(pick(enc))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            B = input_ids.shape[0]
            if not isinstance(labels, Tensor) or labels.reshape(-1).shape[0] != B:
                raise ValueError(f"labels: expected a tensor of {B} labels (one per sequence), got "
                                 f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
            if self.num_labels == 1:
                loss = F.mse_loss(logits.reshape(-1).float(), labels.reshape(-1).float())
            else:
                if labels.is_floating_point():
                    raise ValueError(f"labels: classification with num_labels={self.num_labels} needs integer "
                                     f"labels, got {labels.dtype}")
                loss = F.cross_entropy(logits.float(), labels.reshape(-1).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertModelOutput",
           "MaskedLMOutput", "SequenceClassifierOutput", "BertLayer", "BertEmbeddings", "BertPreTrainedModel"]
