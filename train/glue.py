"""GLUE finetuning and evaluation.

    python -m train.glue --model CKPT_DIR --tasks all --data /path/to/glue_data --output-dir out/glue
    python -m train.glue --model CKPT_DIR --tasks sst2,rte --data hub seeds=1 rte.lr=2e-5
    torchrun --nproc_per_node=8 -m train.glue --model CKPT_DIR --tasks all --data ...   # DDP

CKPT_DIR is a fastbert checkpoint (config.json with "model_type": "fastbert" + model.safetensors + vocab.txt)
or a Hugging Face BERT checkpoint (config.json with "model_type": "bert" + weights + vocab.txt). Each task
gets a new classification head (1 output for STS-B regression). Writes OUTPUT_DIR/results.json and
OUTPUT_DIR/results.md.

Recipe (defaults; every key can be overridden as `key=value` for all tasks or `task.key=value` for one):
MosaicBERT's finetuning code (Portes et al. 2023; mosaicml/examples v0.0.4, examples/bert/src/glue/
finetuning_jobs.py and yamls/finetuning/glue/mosaic-bert-base-uncased.yaml), lr / decoupled weight decay /
epochs / batch size / seeds:
MNLI 5e-5/5e-6/3/48/[19], QNLI 1e-5/1e-6/10/16/[19], QQP 3e-5/3e-6/5/16/[19],
RTE 1e-5/1e-5/3/16/[19, 8364, 717, 10536, 90166], CoLA 5e-5/5e-6/10/32/[19, 8364, 717, 10536],
SST-2 3e-5/3e-6/3/16/[19, 8364, 717], MRPC 8e-5/8e-6/10/32/[5 seeds as RTE], STS-B 3e-5/3e-6/10/32/[5 seeds].
AdamW betas (0.9, 0.98), eps 1e-6, linear warmup over 6% of the steps then linear decay to 0 (alpha_f 0),
max_seq_len 256, no gradient clipping; RTE/MRPC/STS-B start from the MNLI-finetuned encoder (MNLI in the
same invocation, or `mnli_checkpoint=DIR`; a warning says when they start from the pretrained encoder
instead). WNLI is not in that code; it gets a small-task setting of ours (1e-5/1e-6/3, batch 16, 1 seed) and
is left out of the GLUE scores. A checkpoint whose pretraining switched dropout off (Cramming) carries
`finetune_overrides` in its config.json (e.g. hidden dropout 0.1): they are applied here, so finetuning
runs with dropout as that recipe does.

Scores: every results table gives two GLUE averages, named (train/metrics.py SCORE_DEFINITIONS): the GLUE
leaderboard's per-task metrics (median over seeds) and the MosaicBERT paper's (MNLI-m accuracy, ..., mean
over seeds), which is the number comparable with the paper's 79.6.

"Decoupled" weight decay (Loshchilov & Hutter; Composer's DecoupledAdamW, which MosaicBERT used) shrinks
weights by wd * (lr_t / lr_0) per step, whereas torch.optim.AdamW shrinks by lr_t * weight_decay. We use
torch's AdamW with weight_decay = wd / lr, which is the same update.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import glue_data as gd
from . import metrics as gm

__all__ = ["run", "main", "DEFAULTS", "RECIPES", "resolve_settings", "parse_overrides", "load_model_source"]

# Settings shared by all tasks (each overridable globally or per task).
DEFAULTS: dict[str, Any] = {
    "max_seq_len": 256,
    "warmup_ratio": 0.06,
    "beta1": 0.9,
    "beta2": 0.98,
    "eps": 1e-6,
    "grad_clip": 0.0,              # 0 = off (MosaicBERT's finetuning does not clip)
    "seed": 19,                    # first seed; seeds = n gives seed, seed+1, ..., or seeds = a,b,c explicitly
    "eval_batch_size": 128,
    "max_train_examples": None,    # first N training examples (for quick runs)
    "max_eval_examples": None,     # first N examples of each eval split
    "init_from_mnli": True,        # RTE/MRPC/STS-B start from the MNLI-finetuned encoder when MNLI ran
    "mnli_checkpoint": None,       # ...or, when MNLI is not in this run, from this finetuned MNLI checkpoint
    "save_checkpoints": False,     # write OUTPUT_DIR/checkpoints/<task>-seed<s>/ (save_pretrained + vocab.txt)
    "precision": "auto",           # auto: bf16 autocast on CUDA, fp32 on CPU; or bf16 / fp32
    "device": "auto",              # auto: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    "progress": True,              # tqdm bars (rank 0 only)
    "vocab_file": None,            # default: MODEL_DIR/vocab.txt
    "lowercase": None,             # default: from the checkpoint's tokenizer_config.json, else True
    "classifier_pooling": None,    # cls | mean (of the token states; fastbert only) | none: the checkpoint's, else cls
}
# Seeds of mosaic-bert-base-uncased.yaml (tasks without a list use its default_seed 19).
_SEEDS5 = [19, 8364, 717, 10536, 90166]
RECIPES: dict[str, dict[str, Any]] = {
    "mnli": {"lr": 5e-5, "weight_decay": 5e-6, "epochs": 3, "batch_size": 48, "seeds": [19]},
    "qnli": {"lr": 1e-5, "weight_decay": 1e-6, "epochs": 10, "batch_size": 16, "seeds": [19]},
    "qqp": {"lr": 3e-5, "weight_decay": 3e-6, "epochs": 5, "batch_size": 16, "seeds": [19]},
    "sst2": {"lr": 3e-5, "weight_decay": 3e-6, "epochs": 3, "batch_size": 16, "seeds": _SEEDS5[:3]},
    "cola": {"lr": 5e-5, "weight_decay": 5e-6, "epochs": 10, "batch_size": 32, "seeds": _SEEDS5[:4]},
    "rte": {"lr": 1e-5, "weight_decay": 1e-5, "epochs": 3, "batch_size": 16, "seeds": _SEEDS5},
    "mrpc": {"lr": 8e-5, "weight_decay": 8e-6, "epochs": 10, "batch_size": 32, "seeds": _SEEDS5},
    "stsb": {"lr": 3e-5, "weight_decay": 3e-6, "epochs": 10, "batch_size": 32, "seeds": _SEEDS5},
    "wnli": {"lr": 1e-5, "weight_decay": 1e-6, "epochs": 3, "batch_size": 16, "seeds": [19]},
}
_FROM_MNLI = ("rte", "mrpc", "stsb")
_TASK_KEYS = ("lr", "weight_decay", "epochs", "batch_size", "seeds")


# ---------------------------------------------------------------- settings

def _parse_value(s: str) -> Any:
    """'3' -> 3, '5e-5' -> 5e-05, 'true' -> True, 'none' -> None, '1,2,3' -> [1, 2, 3], else the string."""
    low = s.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in s:
        return [_parse_value(p) for p in s.split(",") if p.strip()]
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['seeds=1', 'rte.lr=2e-5'] -> {'seeds': 1, 'rte.lr': 2e-05}."""
    out = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {it!r}: expected key=value (e.g. seeds=1 or mrpc.lr=5e-5)")
        out[key.strip()] = _parse_value(val)
    return out


def resolve_settings(tasks: list[str], overrides: dict | None) -> dict[str, dict[str, Any]]:
    """Per task: DEFAULTS < the task's recipe < global overrides < `task.key` overrides. Unknown keys are errors."""
    overrides = dict(overrides or {})
    known = set(DEFAULTS) | set(_TASK_KEYS)
    glob, per_task = {}, {t: {} for t in gd.TASKS}
    for k, v in overrides.items():
        task, dot, key = k.rpartition(".")
        if dot:
            task = gd._ALIASES.get(task.lower(), task.lower())
            if task not in gd.TASKS:
                raise ValueError(f"override {k!r}: unknown task {task!r}; expected one of {list(gd.ALL_TASKS)}")
        if key not in known:
            raise ValueError(f"override {k!r}: unknown setting {key!r}; known: {sorted(known)}")
        (per_task[task] if dot else glob)[key] = v
    out = {}
    for t in tasks:
        s = {**DEFAULTS, **RECIPES[t], **glob, **per_task[t]}
        _validate(t, s)
        out[t] = s
    return out


def _validate(task: str, s: dict) -> None:
    def bad(key, what):
        raise ValueError(f"{task}.{key}: expected {what}, got {s[key]!r}")

    for key in ("lr", "epochs"):
        if not isinstance(s[key], (int, float)) or isinstance(s[key], bool) or s[key] <= 0:
            bad(key, "a positive number")
    for key in ("batch_size", "eval_batch_size", "max_seq_len"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            bad(key, "a positive integer")
    for key in ("max_train_examples", "max_eval_examples"):
        if s[key] is not None and (not isinstance(s[key], int) or s[key] < 1):
            bad(key, "a positive integer or none")
    if not isinstance(s["weight_decay"], (int, float)) or s["weight_decay"] < 0:
        bad("weight_decay", "a number >= 0")
    if not 0 <= s["warmup_ratio"] < 1:
        bad("warmup_ratio", "a fraction in [0, 1)")
    seeds = s["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            bad("seeds", "a count >= 1 or a comma list of seeds")
        s["seeds"] = [int(s["seed"]) + i for i in range(seeds)]
    elif isinstance(seeds, list) and seeds and all(isinstance(x, int) for x in seeds):
        s["seeds"] = list(seeds)
    else:
        bad("seeds", "a count >= 1 or a comma list of integer seeds")
    if s["precision"] not in ("auto", "bf16", "fp32"):
        bad("precision", "auto, bf16 or fp32")
    if s["classifier_pooling"] not in (None, "cls", "mean"):
        bad("classifier_pooling", "cls, mean or none")


# ---------------------------------------------------------------- models

@dataclass
class ModelSource:
    """Where the pretrained weights come from and how to build a classifier on them."""
    kind: str  # "fastbert" or "hf"
    path: Path
    vocab_file: Path
    lowercase: bool
    finetune_overrides: dict | None = None  # BertConfig fields the pretraining recipe asks for when finetuning

    def build(self, num_labels: int, pooling: str | None = None) -> torch.nn.Module:
        """A fresh classifier with `num_labels` outputs on the pretrained encoder (new, randomly initialised head).
        `pooling` ("cls" / "mean") overrides the checkpoint's own finetuning setting; None keeps it (else cls)."""
        if self.kind == "fastbert":
            from fastbert.models import BertForSequenceClassification

            overrides = dict(self.finetune_overrides or {})
            if pooling is not None:
                overrides["classifier_pooling"] = pooling
            return BertForSequenceClassification.from_pretrained(str(self.path), num_labels=num_labels,
                                                                 **overrides)
        if pooling not in (None, "cls"):
            raise ValueError(f"classifier_pooling={pooling!r}: a Hugging Face BERT checkpoint classifies from "
                             "[CLS] only; use a fastbert checkpoint for mean pooling")
        from transformers import BertForSequenceClassification as HFBert
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # "some weights newly initialised" is expected for the head
        hf_logging.disable_progress_bar()  # one loading bar per seed is noise
        try:
            model, info = HFBert.from_pretrained(str(self.path), num_labels=num_labels, ignore_mismatched_sizes=True,
                                                 output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        check_hf_loading_info(info, str(self.path))
        return model


def check_hf_loading_info(info: dict, path: str) -> None:
    """Every weight of an HF checkpoint is used or its dropping is intended: only the task head
    (``classifier.*``, and the pooler when the checkpoint has none) may be new or resized, and only the
    pretraining heads (``cls.*``) may be left unused. Anything else is a ValueError naming the keys."""
    new = [k for k in info.get("missing_keys", []) if not k.startswith(("classifier.", "bert.pooler."))]
    resized = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    resized = [k for k in resized if not k.startswith("classifier.")]
    unused = [k for k in info.get("unexpected_keys", []) if not k.startswith("cls.")]
    for what, keys in (("missing from", new), ("of another shape in", resized), ("unused from", unused)):
        if keys:
            raise ValueError(f"--model: encoder weights {what} the checkpoint {path}: {sorted(keys)[:8]}"
                             f"{' ...' if len(keys) > 8 else ''} (is it a BERT checkpoint of this architecture?)")


def load_model_source(model_dir: str | os.PathLike, vocab_file=None, lowercase=None) -> ModelSource:
    """Inspect a checkpoint folder: fastbert (model_type "fastbert") or Hugging Face BERT (model_type "bert")."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--model: {cfg_path} not found (expected a checkpoint folder with config.json)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    mtype = cfg.get("model_type")
    if mtype == "fastbert":
        kind = "fastbert"
    elif mtype == "bert":
        kind = "hf"
    else:
        raise ValueError(f"--model: {cfg_path} has model_type {mtype!r}; expected 'fastbert' (a fastbert "
                         "checkpoint) or 'bert' (a Hugging Face BERT checkpoint)")
    vocab = Path(vocab_file) if vocab_file else d / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"--model: {vocab} not found; the checkpoint folder needs the WordPiece vocab.txt "
                                "it was pretrained with (or pass vocab_file=PATH)")
    if lowercase is None:
        lowercase = True
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            with open(tc) as f:
                lowercase = bool(json.load(f).get("do_lower_case", True))
    overrides = (cfg.get("extra") or {}).get("finetune_overrides") if kind == "fastbert" else None
    return ModelSource(kind, d, vocab, bool(lowercase), dict(overrides) if overrides else None)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _load_encoder_from(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy every weight of `state` (an MNLI-finetuned classifier) into `model` except the task head
    (recognised by name: "classifier"). Returns the number of tensors copied; any other weight that is
    missing from `state` or has another shape raises (a different architecture), never silently skipped.
    """
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and "classifier" not in k}
    bad = sorted(k for k in own if "classifier" not in k and (k not in take or own[k].shape != take[k].shape))
    if bad:
        raise RuntimeError(f"init_from_mnli: {len(bad)} encoder tensors of this model are missing from the MNLI model "
                           f"or have another shape: {bad[:8]}{' ...' if len(bad) > 8 else ''}; is it the same "
                           "architecture?")
    model.load_state_dict(take, strict=False)
    return len(take)


# ---------------------------------------------------------------- distributed helpers

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device_setting: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_setting == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_setting)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- train / eval

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Computed here in fp32 (not by the model), so both model kinds and bf16 logits get the same loss."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _forward(model, batch: dict, device, amp: bool) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                    attention_mask=batch["attention_mask"].to(device, non_blocking=True),
                    token_type_ids=batch["token_type_ids"].to(device, non_blocking=True))
    return out.logits if hasattr(out, "logits") else out[0]


def lr_schedule(warmup: int, total: int):
    """LR multiplier for the optimizer step with index `step` (0-based): linear warmup over `warmup`
    steps up to 1, then linear decay that reaches 0 after the last of `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _param_groups(model, lr: float, decoupled_wd: float) -> list[dict]:
    """Weight decay on matrices only (biases and LayerNorm weights, the 1-D tensors, are not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    wd = decoupled_wd / lr  # torch's AdamW multiplies by lr; see the module docstring
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _predict(model, enc: gd.Encoded, s: dict, device, amp: bool, d: Dist, regression: bool, desc: str):
    """Predictions for every example of `enc` ([N] class ids, or float scores), gathered across ranks."""
    model.eval()
    order = np.argsort([len(x) for x in enc.input_ids], kind="stable")  # similar lengths per batch: less padding
    mine = order[d.rank::d.world]
    bs = s["eval_batch_size"]
    idx_out, pred_out = [], []
    bar = _bar(range(0, len(mine), bs), s, d, desc)
    with torch.no_grad():
        for i in bar:
            idx = mine[i:i + bs]
            logits = _forward(model, gd.collate(enc, idx), device, amp).float()
            pred = logits.squeeze(-1) if regression else logits.argmax(-1)
            idx_out.append(idx)
            pred_out.append(pred.cpu().numpy())
    parts = _gather((np.concatenate(idx_out) if idx_out else np.zeros(0, np.int64),
                     np.concatenate(pred_out) if pred_out else np.zeros(0)), d)
    preds = np.zeros(len(enc), dtype=np.float64 if regression else np.int64)
    for idx, p in parts:
        preds[idx] = p
    model.train()
    return preds


def _bar(it, s, d: Dist, desc: str, **kw):
    if not (s["progress"] and d.main):
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, **kw)


def finetune(task: str, seed: int, s: dict, src: ModelSource, train: gd.Encoded, evals: dict[str, gd.Encoded],
             init_state: dict | None, device, d: Dist, ckpt_dir: Path | None) -> tuple[dict, dict, torch.nn.Module]:
    """Finetune one seed of one task; returns (metrics, info, the finetuned model)."""
    spec = gd.TASKS[task]
    if s["batch_size"] % d.world:
        raise ValueError(f"{task}.batch_size: {s['batch_size']} is the global batch and must divide by the "
                         f"world size {d.world}")
    local_bs = s["batch_size"] // d.world
    # Every rank sees the same number of batches (the tail that does not divide is dropped), so DDP's
    # all-reduces never wait on a rank that has run out.
    per_rank = len(train) // d.world
    if per_rank == 0:
        raise ValueError(f"{task}: {len(train)} training examples cannot be split over {d.world} ranks")
    _seed_all(seed)  # the same head initialisation on every rank
    model = src.build(spec.num_labels, s["classifier_pooling"])
    n_init = _load_encoder_from(model, init_state) if init_state is not None else 0
    torch.manual_seed(seed + 7919 * d.rank)  # but different dropout masks per rank
    model.to(device).train()
    amp = (device.type == "cuda" and s["precision"] == "auto") or s["precision"] == "bf16"
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = math.ceil(per_rank / local_bs)
    total = max(1, math.ceil(s["epochs"] * steps_per_epoch))
    warmup = int(s["warmup_ratio"] * total)
    opt = torch.optim.AdamW(_param_groups(model, s["lr"], s["weight_decay"]), lr=s["lr"],
                            betas=(s["beta1"], s["beta2"]), eps=s["eps"])

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(warmup, total))
    rng = np.random.default_rng(seed)  # the same permutation on every rank; each takes its own slice
    t0 = time.perf_counter()
    step, losses = 0, []
    bar = _bar(range(total), s, d, f"{task} seed {seed}")
    batches = iter(())
    for _ in bar:
        batch_idx = next(batches, None)
        if batch_idx is None:
            perm = rng.permutation(len(train))[d.rank * per_rank:(d.rank + 1) * per_rank]
            batches = iter([perm[i:i + local_bs] for i in range(0, per_rank, local_bs)])
            batch_idx = next(batches)
        batch = gd.collate(train, batch_idx)
        logits = _forward(model, batch, device, amp)
        loss = _loss(logits, batch["labels"].to(device), spec.is_regression)
        loss.backward()
        if s["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 20 == 0 or step == total:
            losses.append(loss.item())  # a host sync; only every 20 steps
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    train_s = time.perf_counter() - t0
    metrics = {}
    for split, enc in evals.items():
        preds = _predict(model, enc, s, device, amp, d, spec.is_regression, f"{task} eval {split}")
        m = gm.task_metrics(task, preds, enc.labels)
        metrics.update(m if len(evals) == 1 else {f"{split}_{k}": v for k, v in m.items()})
    info = {"seed": seed, "metrics": metrics, "score": gm.task_score(metrics), "steps": total,
            "train_examples": len(train), "eval_examples": {k: len(v) for k, v in evals.items()},
            "train_seconds": round(train_s, 2), "final_loss": losses[-1] if losses else None,
            "init": "mnli" if init_state is not None else "pretrained", "init_tensors": n_init}
    if ckpt_dir is not None and d.main:
        out = ckpt_dir / f"{task}-seed{seed}"
        _unwrap(model).save_pretrained(str(out))
        shutil.copy(src.vocab_file, out / "vocab.txt")
        info["checkpoint"] = str(out)
    return metrics, info, _unwrap(model)


# ---------------------------------------------------------------- the run

def run(model_dir, tasks="all", data_dir=None, output_dir=None, overrides: dict | None = None) -> dict:
    """Finetune and evaluate `tasks` ('all', a comma string or a list) from the checkpoint `model_dir`.

    data_dir: a glue_data folder, "hub" for `datasets.load_dataset("nyu-mll/glue", task)`, or None to look
    in $FASTBERT_DATA/glue and ../shared/data/glue. overrides: {key: value} as on the command line
    (e.g. {"seeds": 1, "max_train_examples": 256, "rte.lr": 2e-5}). Returns the results dict, also
    written (by rank 0) to output_dir/results.json and results.md when output_dir is given.
    """
    if data_dir is None:
        data_dir = gd.find_data_dir()
        if data_dir is None:
            raise FileNotFoundError("--data: no glue_data folder given and none found at $FASTBERT_DATA/glue or "
                                    "../shared/data/glue; pass --data DIR or --data hub")
    use_hub = str(data_dir) == "hub"
    # every task's files are checked now, not after hours of MNLI when a later task's are missing
    task_list = gd.select_tasks(tasks, None if use_hub else data_dir)
    settings = resolve_settings(task_list, overrides)
    first = settings[task_list[0]]
    src = load_model_source(model_dir, first["vocab_file"], first["lowercase"])
    d, device = _init_dist(first["device"])
    out_dir = Path(output_dir) if output_dir is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    results: dict[str, Any] = {
        "model": str(model_dir), "model_kind": src.kind, "data": str(data_dir), "device": _device_name(device),
        "world_size": d.world, "torch": torch.__version__, "tasks": {}, "settings": {},
    }
    mnli_state = None
    if src.finetune_overrides and d.main:
        print(f"[glue] the checkpoint's pretraining recipe sets for finetuning: {src.finetune_overrides}",
              file=sys.stderr)
    try:
        for task in task_list:
            s = settings[task]
            results["settings"][task] = {k: v for k, v in s.items() if k not in ("progress",)}
            train, evals = gd.load_task_hub(task) if use_hub else gd.load_task(task, data_dir)
            skipped = {sp.split: sp.skipped for sp in (train, *evals.values()) if sp.skipped}
            if skipped and d.main:
                print(f"[glue] {task}: skipped malformed lines {skipped}", file=sys.stderr)
            train = train.subset(s["max_train_examples"])
            evals = {k: v.subset(s["max_eval_examples"]) for k, v in evals.items()}
            tok = gd.load_tokenizer(src.vocab_file, src.lowercase, s["max_seq_len"])
            train_enc = gd.encode(tok, train)
            eval_enc = {k: gd.encode(tok, v) for k, v in evals.items()}
            if task in _FROM_MNLI and s["init_from_mnli"] and mnli_state is None and s["mnli_checkpoint"]:
                # An MNLI model finetuned by an earlier run (save_checkpoints=true writes one).
                ck = load_model_source(s["mnli_checkpoint"], src.vocab_file, src.lowercase)
                mnli_state = ck.build(gd.TASKS["mnli"].num_labels).state_dict()
            init = mnli_state if (task in _FROM_MNLI and s["init_from_mnli"]) else None
            if task in _FROM_MNLI and init is None and d.main:
                print(mnli_warning(task, s["init_from_mnli"]), file=sys.stderr)
            per_seed = []
            for i, seed in enumerate(s["seeds"]):
                use_ckpt = ckpt_root if s["save_checkpoints"] else None
                metrics, info, model = finetune(task, seed, s, src, train_enc, eval_enc, init, device, d, use_ckpt)
                per_seed.append(info)
                if task == "mnli" and i == 0:
                    # The first MNLI seed initialises RTE/MRPC/STS-B; kept on the CPU to free the GPU.
                    mnli_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                del model
                if d.main:
                    print(f"[glue] {task} seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                          + f" ({info['train_seconds']:.1f}s)", file=sys.stderr)
            results["tasks"][task] = _summarise(per_seed, skipped)
            # Rewritten after every task, so a long run that dies late keeps what it finished.
            _update_glue(results)
            if out_dir is not None and d.main:
                _write_results(results, out_dir)
        if d.world > 1:
            # All ranks leave together: a rank that tears gloo down while its peer is still writing results
            # can abort the peer at exit ("terminate called without an active exception").
            import torch.distributed as dist

            dist.barrier()
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return results


def mnli_warning(task: str, init_from_mnli: bool) -> str:
    why = ("init_from_mnli=false" if not init_from_mnli else
           "MNLI did not run in this invocation and no mnli_checkpoint=DIR was given")
    return (f"[glue] WARNING: {task} starts from the pretrained encoder, not from the MNLI-finetuned one ({why}). "
            "MosaicBERT's recipe finetunes RTE, MRPC and STS-B from the MNLI checkpoint: these scores are "
            "not comparable with the paper's.")


def _update_glue(results: dict) -> None:
    scores = {t: r["score"] for t, r in results["tasks"].items()}
    g, missing = gm.glue_score(scores)
    results["glue_score"] = g
    results["glue_tasks"] = [t for t in gm.GLUE_TASKS if t in scores]
    results["glue_missing"] = missing
    results["glue_note"] = _glue_note(results["glue_tasks"], missing)
    paper, per_task = gm.paper_glue_score({t: [sd["metrics"] for sd in r["seeds"]]
                                           for t, r in results["tasks"].items()})
    results["glue_score_mosaicbert"] = paper
    results["mosaicbert_task_scores"] = per_task
    results["score_definitions"] = dict(gm.SCORE_DEFINITIONS)


def _write_results(results: dict, out_dir: Path) -> None:
    """results.json and results.md, each through a temp file + rename (never half-written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2, default=_json_default) + "\n"),
                       ("results.md", results_markdown(results))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def _summarise(per_seed: list[dict], skipped: dict) -> dict:
    """Median over seeds of each metric, and of the per-seed score (the number the GLUE score averages)."""
    names = list(per_seed[0]["metrics"])
    metrics = {n: float(np.median([r["metrics"][n] for r in per_seed])) for n in names}
    out = {"metrics": metrics, "score": float(np.median([r["score"] for r in per_seed])),
           "num_seeds": len(per_seed), "seeds": per_seed}
    if skipped:
        out["skipped_malformed_lines"] = skipped
    return out


def _glue_note(present: list[str], missing: list[str]) -> str:
    if not present:
        return "no GLUE task ran (WNLI alone is not scored)"
    if not missing:
        return "GLUE score over all 8 tasks (WNLI excluded)"
    return f"partial GLUE score over {len(present)} of 8 tasks ({', '.join(present)}); missing: {', '.join(missing)}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def results_markdown(results: dict) -> str:
    """The results as Markdown: one row per task (medians over seeds, x100), the GLUE score, then per seed."""
    lines = ["# GLUE results", "",
             f"model `{results['model']}` ({results['model_kind']}), data `{results['data']}`, "
             f"device {results['device']}, world size {results['world_size']}", "",
             "| task | metrics (median over seeds) | score | seeds |", "|---|---|---:|---:|"]
    for task, r in results["tasks"].items():
        ms = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["metrics"].items())
        lines.append(f"| {task} | {ms} | {100 * r['score']:.2f} | {r['num_seeds']} |")
    g, p = results["glue_score"], results.get("glue_score_mosaicbert")
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.2f}")
    lines += ["", f"**GLUE score (leaderboard metrics): {pct(g)}** ({results['glue_note']}): "
              f"{gm.SCORE_DEFINITIONS['glue']}", "",
              f"**GLUE score (MosaicBERT paper's definition): {pct(p)}**: {gm.SCORE_DEFINITIONS['mosaicbert']}", "",
              "## Per seed", "", "| task | seed | init | metrics | score | train examples | steps | train s |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for task, r in results["tasks"].items():
        for sd in r["seeds"]:
            ms = ", ".join(f"{k} {100 * v:.2f}" for k, v in sd["metrics"].items())
            lines.append(f"| {task} | {sd['seed']} | {sd['init']} | {ms} | {100 * sd['score']:.2f} | "
                         f"{sd['train_examples']} | {sd['steps']} | {sd['train_seconds']:.1f} |")
    skipped = {t: r["skipped_malformed_lines"] for t, r in results["tasks"].items() if "skipped_malformed_lines" in r}
    if skipped:
        lines += ["", "Malformed lines skipped: " + "; ".join(f"{t} {v}" for t, v in skipped.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from .utils import prog_name
    p = argparse.ArgumentParser(prog=prog_name("glue"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings (key=value, or task.key=value for one task): "
                                       + ", ".join(sorted(set(DEFAULTS) | set(_TASK_KEYS))))
    p.add_argument("--model", required=True, help="checkpoint folder (fastbert or Hugging Face BERT)")
    p.add_argument("--tasks", default="all", help="'all', 'available' (every task whose files are under --data) "
                                                  "or a comma list of " + ",".join(gd.ALL_TASKS))
    p.add_argument("--data", default=None, help="glue_data folder, or 'hub' for nyu-mll/glue "
                                                "(default: $FASTBERT_DATA/glue or ../shared/data/glue)")
    p.add_argument("--output-dir", default=None,
                   help="where results.json / results.md go (default glue-results/<model name>)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. seeds=1 mrpc.lr=5e-5 max_train_examples=1000")
    a = p.parse_args(argv)
    out = a.output_dir or str(Path("glue-results") / Path(a.model).resolve().name)
    try:
        res = run(a.model, a.tasks, a.data, out, parse_overrides(a.overrides))
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # ConnectionError: hub unreachable/offline
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(results_markdown(res))
        print(f"wrote {out}/results.json and {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
