"""``BertConfig``: one dataclass for the MosaicBERT recipe and the classic BERT baseline.

The defaults are MosaicBERT's: ALiBi instead of position embeddings, a GeGLU MLP, post-LN with fastbert's
LayerNorm (fp32 statistics in any input dtype), unpadding end to end, no attention dropout, the vocabulary
padded to a multiple of 64. Each feature has a switch, so the same model code builds the classic BERT
baseline (``position_embedding_type="learned"``, ``mlp_type="mlp"``, ``attention_impl="padded_sdpa"``,
attention dropout 0.1); the ``*-baseline`` presets set all of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

_POSITION_TYPES = ("alibi", "learned", "sinusoidal")
_MLP_TYPES = ("glu", "mlp")
_ATTENTION_IMPLS = ("unpadded", "padded_sdpa")
_ACTIVATIONS = ("gelu", "gelu_tanh")
_LN_POSITIONS = ("post", "pre")
_MLM_HEADS = ("sparse", "dense")
_POOLINGS = ("cls", "mean")

_SIZES: Dict[str, Dict[str, int]] = {
    # tiny/mini are for CPU runs and tests; base/large are MosaicBERT's / BERT's sizes.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# Classic BERT (Devlin et al.; Hugging Face's BertForMaskedLM, the baseline of the MosaicBERT paper): learned
# absolute positions, GELU MLP, padded attention with dropout, fp32 LayerNorm, the unpadded 30,522-row
# vocabulary and an MLM head that scores every position.
BASELINE_OVERRIDES: Dict[str, Any] = dict(position_embedding_type="learned", mlp_type="mlp",
                                          attention_impl="padded_sdpa", attention_probs_dropout_prob=0.1,
                                          fp32_layer_norm=True, pad_vocab_size_multiple=1, mlm_head="dense")


@dataclass
class BertConfig:
    """Hyper-parameters of a fastbert encoder (field names follow Hugging Face's ``BertConfig``).

    Fields beyond HF's:
        position_embedding_type: ``"alibi"`` (no position weights; runs at any length) or ``"learned"``
            (absolute embeddings, at most ``max_position_embeddings`` tokens).
        mlp_type: ``"glu"`` (GeGLU: ``wi`` maps H -> 2*intermediate_size, ``gelu(a) * g``) or ``"mlp"``
            (``wi`` maps H -> intermediate_size, GELU).
        attention_impl: ``"unpadded"`` (varlen flash attention on the real tokens only) or ``"padded_sdpa"``
            (``F.scaled_dot_product_attention`` on the padded batch with an additive mask; supports
            attention dropout).
        pad_vocab_size_multiple: the embedding / decoder has ``padded_vocab_size`` rows (vocab rounded up to
            this multiple, for matmul-friendly shapes); 1 disables padding (needed to reproduce HF losses).
        hidden_act: ``"gelu"`` (erf) or ``"gelu_tanh"``.
        tie_word_embeddings: the MLM decoder is the word embedding (default); False gives the head its own
            ``head.decoder`` weight (for converted checkpoints whose decoder is untied).
        local_attention_window: None (default: every layer attends globally, MosaicBERT) or the total width
            of the local attention window in tokens, ModernBERT's ``local_attention``: a local layer's
            query i sees keys ``i - w // 2 .. i + w // 2`` (``window_size = (w // 2, w // 2)``).
        global_attn_every_n_layers: with a window, layer ``i`` is global when ``i % n == 0`` and local
            otherwise (ModernBERT's rule; ModernBERT-base uses ``n = 3``, ``w = 128``). Must stay 1 (the
            default) without a window, and be > 1 with one (n = 1 would make every layer global).
        classifier_pooling: what ``BertForSequenceClassification``'s pooler reads: ``"cls"`` (the first
            token, BERT's choice) or ``"mean"`` (the mean over each sequence's real tokens, as ModernBERT
            offers). After a short MLM-only pretraining [CLS] carries little per-sentence signal (it is
            never a prediction target); the mean of the token states does.

    Switches for the recipes of other papers (defaults: MosaicBERT's):
        position_embedding_type ``"sinusoidal"``: fixed sine/cosine positions times one learned scalar
            (initialised to ``1/sqrt(hidden_size)``; Cramming's "scaled-sinusoidal").
        layer_norm_position: ``"post"`` (BERT, MosaicBERT: ``x = LN(x + f(x))``) or ``"pre"``
            (``x = x + f(LN(x))``, with a final LayerNorm after the last layer, ``bert.final_norm``;
            24hBERT and Cramming).
        linear_bias: biases on the attention (``Wqkv``, ``out_proj``) and MLP (``wi``, ``wo``) projections
            (False: Cramming's bias-free layers; LayerNorm keeps its bias).
        mlm_head_transform: the MLM head's ``dense -> GELU -> LayerNorm`` before the decoder (False: the
            decoder reads the encoder output directly, Cramming's ``skip_head_transform``).
        mlm_decoder_bias: the decoder's own bias ``head.bias`` (False: Cramming's ``decoder_bias: False``).
        embedding_layer_norm: LayerNorm on the embedding sum (False: 24hBERT's default
            ``layernorm_embedding=False``; with pre-LN the first layer normalises its input anyway).
        mlm_head: ``"sparse"`` (only labelled rows reach the vocabulary projection; MosaicBERT, 24hBERT,
            Cramming) or ``"dense"`` (every position of the padded batch is projected and scored, as
            Hugging Face's ``BertForMaskedLM``: the classic baseline).
        fp32_layer_norm: LayerNorm computes and returns fp32 and the residual stream stays fp32 (what
            ``torch.nn.LayerNorm`` does under autocast: the classic baseline) instead of fastbert's
            low-precision LayerNorm (input dtype out, fp32 statistics; MosaicBERT).
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "alibi"
    mlp_type: str = "glu"
    attention_impl: str = "unpadded"
    pad_vocab_size_multiple: int = 64
    local_attention_window: Optional[int] = None
    global_attn_every_n_layers: int = 1
    classifier_dropout: Optional[float] = None
    classifier_pooling: str = "cls"
    num_labels: int = 2
    layer_norm_position: str = "post"
    linear_bias: bool = True
    mlm_head_transform: bool = True
    mlm_decoder_bias: bool = True
    mlm_head: str = "sparse"
    embedding_layer_norm: bool = True
    fp32_layer_norm: bool = False
    tie_word_embeddings: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. the tokenizer used)

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                     "pad_vocab_size_multiple", "num_labels", "global_attn_every_n_layers"):
            positive(name)
        if self.local_attention_window is not None:
            positive("local_attention_window")
            if self.global_attn_every_n_layers == 1:
                raise ValueError("global_attn_every_n_layers: 1 makes every layer global, so local_attention_window="
                                 f"{self.local_attention_window} would be unused; set it > 1 (ModernBERT: 3) or "
                                 "local_attention_window=None")
        elif self.global_attn_every_n_layers != 1:
            raise ValueError(f"global_attn_every_n_layers={self.global_attn_every_n_layers} needs "
                             "local_attention_window (the width of the local layers' window, ModernBERT: 128)")
        for name, allowed in (("position_embedding_type", _POSITION_TYPES), ("mlp_type", _MLP_TYPES),
                              ("attention_impl", _ATTENTION_IMPLS), ("hidden_act", _ACTIVATIONS),
                              ("layer_norm_position", _LN_POSITIONS), ("mlm_head", _MLM_HEADS),
                              ("classifier_pooling", _POOLINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("linear_bias", "mlm_head_transform", "mlm_decoder_bias", "fp32_layer_norm", "embedding_layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
        if self.attention_probs_dropout_prob > 0 and self.attention_impl == "unpadded":
            # The varlen flash kernels have no dropout (MosaicBERT trains without it).
            raise ValueError("attention_probs_dropout_prob > 0 needs attention_impl='padded_sdpa'; the unpadded "
                             "flash attention has no dropout")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id: expected in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")

    # ------------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Rows of the word embedding / decoder: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def attention_window(self, layer_idx: int) -> Tuple[int, int]:
        """``window_size`` of layer ``layer_idx``: ``(-1, -1)`` for a global layer, ``(w // 2, w // 2)`` for a
        local one (ModernBERT: layer i is global when ``i % global_attn_every_n_layers == 0``)."""
        w = self.local_attention_window
        if w is None or layer_idx % self.global_attn_every_n_layers == 0:
            return (-1, -1)
        return (w // 2, w // 2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """The ``approximate`` argument of the fastbert GELU ops for ``hidden_act``."""
        return "tanh" if self.hidden_act == "gelu_tanh" else "none"

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """A named configuration: ``tiny``, ``mini``, ``base``, ``large`` (MosaicBERT recipe) or the same
        names with ``-baseline`` (classic BERT: learned positions, GELU MLP, padded attention with dropout).
        ``overrides`` replace any field."""
        size, _, variant = name.partition("-")
        if size not in _SIZES or variant not in ("", "baseline"):
            names = sorted(_SIZES) + [f"{s}-baseline" for s in sorted(_SIZES)]
            raise ValueError(f"name: unknown preset {name!r}; expected one of {names}")
        kw: Dict[str, Any] = dict(_SIZES[size])
        if variant == "baseline":
            kw.update(BASELINE_OVERRIDES)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "fastbert"
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **overrides) -> "BertConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a typo must not be silently ignored)."""
        d = dict(d)
        d.pop("model_type", None)
        d.pop("architecture", None)  # written by save_pretrained, informational
        d.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BertConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str) -> None:
        """Write JSON to ``path`` (a file, or a directory that receives ``config.json``)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str, **overrides) -> "BertConfig":
        """Read a JSON file written by ``save`` (``path`` a file or a directory with ``config.json``)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)
