"""Pretraining configuration: dataclasses loaded from YAML, with ``key=value`` command-line overrides.

    cfg = load_config("train/configs/tiny-cpu.yaml", ["optim.lr=1e-3", "max_steps=50"])

Nested sections are dataclasses (``model``, ``data``, ``optim``); an override names a field with dots
(``optim.lr=1e-3``) and its value is converted to that field's type (``"5e-4"`` becomes a float, ``"true"`` a
bool, ``"0.9,0.98"`` a list). ``model.overrides`` is a free dict of ``fastbert.models.BertConfig`` fields
(``model.overrides.hidden_size=256``). An unknown key is an error naming the key: a typo must never be
ignored silently. The resolved configuration is written next to the run's outputs (``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

# The harness is the package fastbert.train (installed from train/); in a checkout this is the repository.
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped YAML configs (installed with the package)


def data_root() -> Path:
    """Where the shared data lives: ``$FASTBERT_DATA``, else ``../shared/data`` beside the repository
    checkout (an installed, non-editable copy has no checkout: set ``FASTBERT_DATA`` or pass ``--data``)."""
    env = os.environ.get("FASTBERT_DATA")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def shipped_configs() -> List[str]:
    """Names of the configs shipped with the harness (``tiny-cpu``, ``mosaicbert-base``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str) -> str:
    """``path`` itself when it is a file, else the shipped config of that name (``tiny-cpu`` or
    ``tiny-cpu.yaml``), so ``--config tiny-cpu`` works from any folder."""
    if os.path.isfile(path):
        return path
    for cand in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if os.path.basename(path) == path and cand.is_file():
            return str(cand)
    raise FileNotFoundError(f"--config: no such file {path!r} (shipped configs, usable by name: "
                            f"{', '.join(shipped_configs())})")


def expand_path(p: str) -> str:
    """Expand ``~`` and ``$VARS`` in a config path; ``$FASTBERT_DATA`` defaults to :func:`data_root`."""
    if not p:
        return p
    env = dict(os.environ)
    env.setdefault("FASTBERT_DATA", str(data_root()))
    # os.path.expandvars reads os.environ only; substitute FASTBERT_DATA ourselves so configs work unset.
    for name in ("FASTBERT_DATA",):
        p = p.replace("${%s}" % name, env[name]).replace("$" + name, env[name])
    return os.path.expanduser(os.path.expandvars(p))


@dataclass
class ModelSection:
    preset: str = "tiny"                     # a BertConfig preset: tiny, mini, base, large (+ "-baseline")
    overrides: Dict[str, Any] = field(default_factory=dict)  # BertConfig fields, e.g. {hidden_size: 256}
    # BertConfig fields GLUE finetuning applies to this checkpoint (saved in its config.json), e.g. dropout
    # back on for a recipe that pretrains without it (Cramming)
    finetune_overrides: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Build the model config now (no weights), so a bad preset or override fails before any data
        is read. vocab_size and pad_token_id come from the tokenizer later."""
        from fastbert.models import BertConfig
        known = {f.name for f in dataclasses.fields(BertConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides: unknown BertConfig field(s) {unknown}; known: {sorted(known)}")
        try:
            BertConfig.preset(self.preset)
        except ValueError as e:
            raise ValueError(f"model.preset: {e}") from None
        try:
            BertConfig.preset(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model.overrides: {e}") from None


@dataclass
class DataSection:
    train: str = "${FASTBERT_DATA}/corpus/wiki2015-00.jsonl.gz"  # file, directory, or hub dataset name
    valid: str = "${FASTBERT_DATA}/corpus/wiki2015-valid.jsonl.gz"  # held-out file ("" = no evaluation)
    tokenizer: str = "${FASTBERT_DATA}/vocab/bert-base-uncased-vocab.txt"  # vocab.txt, tokenizer.json or "train"
    lowercase: bool = True
    train_vocab_size: int = 30522            # only for tokenizer: train
    max_len: int = 128                       # tokens per sequence, [CLS] and [SEP] included
    mlm_probability: float = 0.3             # MosaicBERT masks 30%; classic BERT 15%
    eval_mlm_probability: float = 0.0        # masking rate of the held-out loss (0 = mlm_probability)
    max_documents: int = 0                   # read only the first N documents of the training data (0 = all)
    valid_max_documents: int = 0             # same for the validation file
    text_field: str = "text"                 # JSON / hub column holding the document text
    hub_split: str = "train"
    hub_config: str = ""
    cache_dir: str = ""                      # tokenized shards; "" = $FASTBERT_CACHE or ~/.cache/fastbert
    num_workers: int = 2                     # tokenizer processes
    shard_tokens: int = 1 << 24              # tokens per shard file (uint16: 32 MiB)
    sequence_mode: str = "document"          # truncate (MosaicBERT) | document (whole sentences) | concat (Cramming)
    streaming: bool = False                  # read data.train through datasets streaming, tokenized on the fly (C4)
    stream_chunk_documents: int = 4096       # streaming: documents read, tokenized and shuffled together
    valid_hub_split: str = "validation"      # split of a hub dataset given as data.valid
    tokenizer_documents: int = 0             # tokenizer: train reads this many documents (0 = max_documents)


@dataclass
class OptimSection:
    lr: float = 5e-4                         # peak learning rate
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5               # decoupled: each step multiplies weights by 1 - weight_decay * lr_t / lr
    decay_all_parameters: bool = True        # also decay biases and LayerNorm (MosaicBERT); false: matrices only
    warmup: float = 0.06                     # fraction of the budget spent warming up linearly
    initial_lr_ratio: float = 0.0            # the warmup starts at lr * initial_lr_ratio (Cramming's triangle: 0.25)
    final_lr_ratio: float = 0.02             # the linear decay ends at lr * final_lr_ratio
    grad_clip: float = 0.0                   # max global grad norm (0 = off)


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    output_dir: str = "runs/pretrain"
    # Budget: exactly one of these is > 0. The LR schedule follows the elapsed fraction of it.
    max_steps: int = 0                       # optimizer steps (exactly one of max_steps, max_minutes > 0)
    max_minutes: float = 0.0                 # wall-clock minutes of training (evaluation excluded)
    global_batch_size: int = 64              # sequences per optimizer step, over all ranks
    batch_size_ramp: float = 0.0             # grow the batch linearly from one micro-batch per rank to
                                             # global_batch_size over this fraction of the budget (Cramming: 0.6)
    micro_batch_size: int = 32               # sequences per forward pass on one rank
    seed: int = 1234
    device: str = "auto"                     # auto | cpu | cuda
    precision: str = "auto"                  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False                    # torch.compile the model
    threads: int = 0                         # CPU threads for torch (0 = torch's default)
    log_every: int = 10
    eval_every: int = 100                    # steps between held-out evaluations (0 = only at the end)
    eval_sequences: int = 512                # held-out sequences per evaluation
    checkpoint_every: int = 0                # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    resume: str = "auto"                     # auto (latest checkpoint in output_dir) | none (a new folder) | <dir>
    progress: bool = True                    # tqdm progress bar
    plot: bool = True                        # DIR/loss.png at the end
    debug_nan_at_step: int = 0               # test knob: make the loss NaN at this step
    debug_step_delay_s: float = 0.0          # test knob: sleep after each step (kill-and-resume test)

    def validate(self) -> "PretrainConfig":
        if (self.max_steps > 0) == (self.max_minutes > 0):
            raise ValueError("budget: set exactly one of max_steps > 0 or max_minutes > 0 "
                             f"(got max_steps={self.max_steps}, max_minutes={self.max_minutes})")
        for name in ("global_batch_size", "micro_batch_size", "log_every", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.data.max_len < 8:
            raise ValueError(f"data.max_len: expected >= 8, got {self.data.max_len}")
        if not 0.0 < self.data.mlm_probability < 1.0:
            raise ValueError(f"data.mlm_probability: expected in (0, 1), got {self.data.mlm_probability}")
        if not 0.0 <= self.data.eval_mlm_probability < 1.0:
            raise ValueError("data.eval_mlm_probability: expected in [0, 1) (0 = mlm_probability), got "
                             f"{self.data.eval_mlm_probability}")
        if not 0.0 <= self.optim.warmup < 1.0:
            raise ValueError(f"optim.warmup: expected a fraction in [0, 1), got {self.optim.warmup}")
        for name in ("initial_lr_ratio", "final_lr_ratio"):
            if not 0.0 <= getattr(self.optim, name) <= 1.0:
                raise ValueError(f"optim.{name}: expected a fraction in [0, 1], got {getattr(self.optim, name)}")
        if self.optim.lr <= 0 or self.optim.weight_decay < 0 or self.optim.grad_clip < 0:
            raise ValueError(f"optim: expected lr > 0, weight_decay >= 0 and grad_clip >= 0, got lr="
                             f"{self.optim.lr}, weight_decay={self.optim.weight_decay}, grad_clip={self.optim.grad_clip}")
        if not 0.0 <= self.batch_size_ramp < 1.0:
            raise ValueError(f"batch_size_ramp: expected a fraction of the budget in [0, 1), got {self.batch_size_ramp}")
        from .packing import check_mode
        check_mode(self.data.sequence_mode)
        from fastbert.models import BertConfig
        unknown = sorted(set(self.model.finetune_overrides) - {f.name for f in dataclasses.fields(BertConfig)})
        if unknown:
            raise ValueError(f"model.finetune_overrides: unknown BertConfig field(s) {unknown}")
        if len(self.optim.betas) != 2:
            raise ValueError(f"optim.betas: expected two values, got {self.optim.betas}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: expected auto, bf16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        self.model.check()
        return self


# ----------------------------------------------------------------------------------------------
# Generic dataclass <-> dict with type conversion

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError("not a boolean")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("a bool is not an int")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)  # PyYAML reads "5e-4" as a string; float() takes it
        if tp is str:
            return "" if value is None else str(value)
        if origin in (list, List):
            (elem,) = typing.get_args(tp) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.strip("[]").split(",") if v.strip()]
            return [_convert(v, elem, key) if elem is not Any else v for v in value]
        if origin in (dict, Dict):
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key '{key}': cannot convert {value!r} to {getattr(tp, '__name__', tp)} "
                         f"({e})") from None
    return value


def _from_dict(cls, d: Dict[str, Any], prefix: str = ""):
    if not isinstance(d, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ValueError(f"unknown config key '{prefix}{k}'; known keys here: {sorted(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _from_dict(tp, v or {}, prefix + k + ".")
        else:
            kwargs[k] = _convert(v, tp, prefix + k)
    return cls(**kwargs)


def apply_override(cfg, item: str) -> None:
    """Apply one ``a.b.c=value`` override to the dataclass ``cfg`` in place."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if isinstance(obj, dict):  # inside a free dict field (model.overrides.*): YAML-typed value
            if i == len(parts) - 1:
                obj[part] = yaml.safe_load(raw) if raw != "" else ""
            else:
                obj = obj.setdefault(part, {})
            continue
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            raise ValueError(f"unknown config key '{key}' (no '{part}' in {type(obj).__name__}; "
                             f"known: {sorted(names)})")
        tp = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"config key '{key}' is a section; set one of its fields ({key}.<field>=...)")
            # Strings stay verbatim (a path like "01" must not become an int); others parse as YAML first.
            value = raw if tp is str else (yaml.safe_load(raw) if raw.strip() else raw)
            setattr(obj, part, _convert(value, tp, key))
        else:
            obj = getattr(obj, part)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), cls=PretrainConfig):
    """Read ``path`` (YAML; ``None`` = the defaults), apply ``key=value`` overrides, validate."""
    raw: Dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    cfg = _from_dict(cls, raw)
    for item in overrides:
        apply_override(cfg, item)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    """Write the resolved configuration as YAML (atomically: a half-written config is never left)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def config_help(cls=PretrainConfig, prefix: str = "") -> List[str]:
    """One line per config key, ``key = default  (the comment beside the field)``, read from the dataclasses
    (and their source comments), for ``--help``."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen install): keys and defaults only
        src = ""
    notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, re.M))
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines += config_help(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = f"  ({notes[f.name]})" if f.name in notes else ""
        lines.append(f"  {prefix}{f.name} = {default!r}{note}")
    return lines
