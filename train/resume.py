"""Checkpoints of a pretraining run, and how a run starts: fresh, resumed, already finished, or refused.

:func:`plan_start` reads the run folder (never writes it) and returns a :class:`StartPlan`; a checkpoint
whose run is incompatible with the configuration raises :class:`ResumeError` naming the fields. The
learning-rate :class:`Schedule` lives here too, because a resumed run with a longer budget continues its
decay from where it was (an ``anchor``) instead of jumping back up the new schedule. :func:`save_checkpoint`
/ :func:`restore` write and read ``checkpoints/step-NNNNNNN/``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import PretrainConfig, expand_path, to_dict
from .utils import Dist, read_metrics, seed_all, set_rng_state

CKPT_PREFIX = "step-"

# Settings that define what is being trained: a checkpoint is resumed only when they are equal.
# Everything else (logging, evaluation, checkpoint cadence, threads, device, micro-batch, ...) may change.
RUN_DEFINING = ("model.", "optim.", "data.train", "data.tokenizer", "data.lowercase", "data.train_vocab_size",
                "data.max_len", "data.mlm_probability", "data.max_documents", "data.text_field", "data.hub_split",
                "data.hub_config", "data.sequence_mode", "data.streaming", "data.stream_chunk_documents",
                "global_batch_size", "batch_size_ramp", "seed")
NOT_RUN_DEFINING = ("model.finetune_overrides",)  # read by GLUE finetuning only
BUDGET_KEYS = ("max_steps", "max_minutes")
_IGNORED = ("output_dir", "resume")  # where the run goes / how it was asked to start


class ResumeError(ValueError):
    """The run folder or checkpoint cannot be resumed with this configuration (nothing was written)."""


def lr_at(frac: float, peak: float, warmup: float, final_ratio: float, initial_ratio: float = 0.0) -> float:
    """Linear warmup from ``peak * initial_ratio`` over the first ``warmup`` fraction of the budget, then
    linear decay to ``peak * final_ratio`` at ``frac == 1``. MosaicBERT: (0.06, 0.02, 0); 24hBERT:
    (0.06, 0, 0); Cramming's "budget-triangle2" is (0.75, 0, 0.25): ``min(0.25 + x, 4 - 4x)``."""
    frac = min(max(frac, 0.0), 1.0)
    if warmup > 0 and frac < warmup:
        return peak * (initial_ratio + (1.0 - initial_ratio) * frac / warmup)
    return peak * (final_ratio + (1.0 - final_ratio) * (1.0 - frac) / (1.0 - warmup))



@dataclass
class Schedule:
    """The LR as a function of the elapsed budget fraction: :func:`lr_at`, or, after a budget change at
    fraction ``anchor[0]`` where the LR was ``anchor[1]``, a straight line from there to the floor."""
    peak: float
    warmup: float
    final_ratio: float
    anchor: Optional[Tuple[float, float]] = None

    initial_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: PretrainConfig, anchor=None) -> "Schedule":
        o = cfg.optim
        return cls(o.lr, o.warmup, o.final_lr_ratio, tuple(anchor) if anchor else None, o.initial_lr_ratio)

    def lr(self, frac: float) -> float:
        if self.anchor is None or frac < self.anchor[0]:
            return lr_at(frac, self.peak, self.warmup, self.final_ratio, self.initial_ratio)
        a, lr_a = self.anchor
        floor = self.peak * self.final_ratio
        t = min(1.0, (frac - a) / (1.0 - a)) if a < 1.0 else 1.0
        return lr_a + (floor - lr_a) * t


def used(step: int, elapsed_s: float, max_steps: int, max_minutes: float) -> float:
    """How much of the budget ``step`` steps / ``elapsed_s`` seconds of training have used (>= 1: done)."""
    return step / max_steps if max_steps else elapsed_s / (max_minutes * 60.0)


def position(step: int, elapsed_s: float, max_steps: int, max_minutes: float, first_step_s: float) -> float:
    """Where the LR schedule stands after ``step`` steps, counted as :func:`train.pretrain.budget_fraction`
    counts it (a wall-clock budget's clock starts after the first step)."""
    if max_steps:
        return step / max_steps
    if step == 0:
        return 0.0
    return max(elapsed_s - first_step_s, 0.0) / max(max_minutes * 60.0 - first_step_s, 1e-9)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root)
                  if d.startswith(CKPT_PREFIX) and os.path.isfile(os.path.join(root, d, "trainer_state.pt")))
    return os.path.join(root, done[-1]) if done else None


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (``model.overrides`` entries become keys too)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value)]`` of the settings that differ (a key missing on one side,
    as when a later version added a field, reads as its default ``None`` there)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(_IGNORED)]


_PATH_KEYS = ("train", "valid", "tokenizer")


def _same_paths(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` with its local data paths made absolute (``--data corpus`` and ``--data /abs/corpus`` are the
    same data); hub names and ``train`` (a tokenizer to train) stay as written."""
    data = dict(cfg.get("data", {}))
    for k in _PATH_KEYS:
        p = expand_path(str(data.get(k) or ""))
        if p and os.path.exists(p):
            data[k] = os.path.realpath(p)
    return {**cfg, "data": data}


def _fmt(changes) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


@dataclass
class StartPlan:
    """How :func:`train.pretrain.train` starts. ``checkpoint``/``state`` are None for a fresh run;
    ``finished`` means the checkpoint already completed this budget (and ``final/`` exists)."""
    out_dir: str
    checkpoint: Optional[str] = None
    state: Optional[Dict[str, Any]] = None
    step: int = 0
    elapsed_s: float = 0.0
    finished: bool = False
    anchor: Optional[Tuple[float, float]] = None
    notes: List[str] = field(default_factory=list)


def _find_checkpoint(cfg: PretrainConfig, out_dir: str) -> Optional[str]:
    if cfg.resume == "auto":
        return latest_checkpoint(out_dir)
    if cfg.resume in ("none", ""):
        held = latest_checkpoint(out_dir) or (os.path.join(out_dir, "final")
                                              if os.path.isdir(os.path.join(out_dir, "final")) else None)
        if held:
            raise ResumeError(f"resume=none: output_dir {out_dir} already holds a run ({held}); a fresh start "
                              "would overwrite it. Choose a new --output-dir (or delete that folder), or "
                              "continue it with resume=auto")
        return None
    ckpt = expand_path(cfg.resume)
    if not os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        raise ResumeError(f"resume: {ckpt!r} is not a checkpoint directory (no trainer_state.pt)")
    return ckpt


def _budget_change(cfg: PretrainConfig, sched: Dict[str, Any], step: int, elapsed: float, first_s: float,
                   where: str):
    """(anchor, note) when the budget differs from the checkpoint's; raises when it cannot continue."""
    old_steps, old_min = sched["max_steps"], sched["max_minutes"]
    if (old_steps, old_min) == (cfg.max_steps, cfg.max_minutes):
        return sched.get("anchor"), None
    old_b = f"max_steps={old_steps}" if old_steps else f"max_minutes={old_min}"
    new_b = f"max_steps={cfg.max_steps}" if cfg.max_steps else f"max_minutes={cfg.max_minutes}"
    if bool(old_steps) != bool(cfg.max_steps):
        raise ResumeError(f"resume {where}: its budget was {old_b}, now {new_b}; a step budget and a wall-clock "
                          "budget cannot be swapped on resume (use the same kind, or a new --output-dir)")
    if used(step, elapsed, cfg.max_steps, cfg.max_minutes) >= 1.0:
        raise ResumeError(f"resume {where}: the checkpoint is at step {step} ({elapsed / 60:.1f} min), already "
                          f"beyond the new budget {new_b} (was {old_b}); give a larger budget or a new --output-dir")
    old = Schedule.from_config(cfg, sched.get("anchor"))
    old_frac = position(step, elapsed, old_steps, old_min, first_s)
    new_frac = position(step, elapsed, cfg.max_steps, cfg.max_minutes, first_s)
    if old_frac < cfg.optim.warmup and not sched.get("anchor"):
        return None, (f"budget {old_b} -> {new_b} during warmup: the warmup now spans {cfg.optim.warmup:.0%} "
                      "of the new budget")
    lr_now = old.lr(old_frac)
    floor = cfg.optim.lr * cfg.optim.final_lr_ratio
    how = ("stays at its floor" if abs(lr_now - floor) <= 1e-12 * max(1.0, floor)
           else f"decays linearly to {floor:.3g} over the new budget")
    return (new_frac, lr_now), (f"budget {old_b} -> {new_b}: no new warmup; the LR continues from "
                                f"{lr_now:.3g} and {how}")


def plan_start(cfg: PretrainConfig, out_dir: str) -> StartPlan:
    """Read ``out_dir`` (and ``cfg.resume``) and decide how the run starts. Writes nothing.

    Raises :class:`ResumeError` when a checkpoint's run-defining settings (:data:`RUN_DEFINING`) differ
    from ``cfg``, when its budget cannot be continued, or when ``resume=none`` would overwrite a run.
    """
    plan = StartPlan(out_dir)
    ckpt = _find_checkpoint(cfg, out_dir)
    if ckpt is None:
        return plan
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
    changes = config_diff(_same_paths(state.get("config", {})), _same_paths(to_dict(cfg)))
    fatal = [c for c in changes if c[0].startswith(RUN_DEFINING) and not c[0].startswith(NOT_RUN_DEFINING)]
    if fatal:
        raise ResumeError(
            f"resume: {ckpt} was trained with different settings: {_fmt(fatal)}. Resuming would mix two runs "
            f"(or fail on mismatched weights). Restore those settings to continue it, or start the new run in a "
            f"new --output-dir (output_dir=...). Nothing was written.")
    plan.checkpoint, plan.state = ckpt, state
    plan.step, plan.elapsed_s = int(state["step"]), float(state["elapsed_s"])
    sched = state.get("scheduler", {})
    sched.setdefault("max_steps", state.get("config", {}).get("max_steps", cfg.max_steps))
    sched.setdefault("max_minutes", state.get("config", {}).get("max_minutes", cfg.max_minutes))
    first_s = float(state.get("data", {}).get("first_step_s", 0.0))
    plan.anchor, budget_note = _budget_change(cfg, sched, plan.step, plan.elapsed_s, first_s, ckpt)
    other = [c for c in changes if c not in fatal and not c[0].startswith(BUDGET_KEYS)]
    if other:
        plan.notes.append(f"settings changed since the checkpoint (allowed): {_fmt(other)}")
    if budget_note:
        plan.notes.append(budget_note)
    done = used(plan.step, plan.elapsed_s, cfg.max_steps, cfg.max_minutes) >= 1.0
    plan.finished = done and os.path.isfile(os.path.join(out_dir, "final", "model.safetensors"))
    return plan


# ----------------------------------------------------------------------------------------------
# Checkpoint files

def save_checkpoint(out_dir: str, raw_model, optimizer, step: int, elapsed: float, rngs: List[Dict],
                    cfg: PretrainConfig, keep: int, data: Optional[Dict] = None,
                    schedule: Optional[Schedule] = None) -> str:
    """Write ``checkpoints/step-N`` atomically: everything goes to a temp directory that is renamed into
    place last, so a kill at any moment leaves either the complete checkpoint or none."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{CKPT_PREFIX}{step:07d}")
    for stale in os.listdir(root):  # temp directories of a run killed mid-write (only rank 0 writes here)
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-{CKPT_PREFIX}{step:07d}-{os.getpid()}")
    raw_model.save_pretrained(tmp)
    state = {"step": step, "elapsed_s": elapsed,
             "optimizer": optimizer.state_dict(),
             "scheduler": {"step": step, "elapsed_s": elapsed, "max_steps": cfg.max_steps,
                           "max_minutes": cfg.max_minutes, "anchor": schedule.anchor if schedule else None},
             "rng": rngs,  # one entry per rank
             "data": {"sequences_consumed": step * cfg.global_batch_size, "seed": cfg.seed,
                      "global_batch_size": cfg.global_batch_size, **(data or {})},
             "config": to_dict(cfg)}
    path = os.path.join(tmp, "trainer_state.pt")
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final):  # an older checkpoint resumed into its own folder passes this step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(d for d in os.listdir(root) if d.startswith(CKPT_PREFIX))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def restore(plan: StartPlan, raw_model, optimizer, dist: Dist, cfg: PretrainConfig, say) -> None:
    """Load the checkpoint's weights, optimizer and every rank's RNG (all checked by :func:`plan_start`)."""
    from safetensors.torch import load_file
    state = plan.state
    raw_model.load_checkpoint_state(load_file(os.path.join(plan.checkpoint, "model.safetensors")),
                                    source=plan.checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    rngs = state["rng"]
    if len(rngs) == dist.world:
        set_rng_state(rngs[dist.rank])
    else:
        say(f"warning: checkpoint from {len(rngs)} rank(s), now {dist.world}: dropout RNG reseeded")
        seed_all(cfg.seed + 1000 * plan.step + dist.rank)


def evals_from_metrics(metrics_path: str) -> Tuple[Optional[Dict], Optional[Dict]]:
    """(first, last) held-out rows of ``metrics.jsonl`` (a resumed run reports the whole run's change)."""
    rows = [r for r in read_metrics(metrics_path) if r.get("split") == "valid"]
    return (rows[0], rows[-1]) if rows else (None, None)


def finished_summary(cfg: PretrainConfig, plan: StartPlan, log) -> Dict:
    """A rerun of a finished run: say so, write nothing, return the run's summary."""
    out = plan.out_dir
    metrics_path = os.path.join(out, "metrics.jsonl")
    first, last = evals_from_metrics(metrics_path)
    budget = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.max_minutes} min"
    if int(os.environ.get("RANK", "0")) == 0:
        (log or (lambda m: print(m, flush=True)))(
            f"pretrain: {out} already finished its budget ({budget}; checkpoint {plan.checkpoint}); nothing to "
            f"train, nothing rewritten. To train longer raise max_steps/max_minutes (the LR continues its decay, "
            f"no new warmup); for a new run use a new --output-dir.")
    png = os.path.join(out, "loss.png")
    return {"output_dir": out, "steps": plan.step, "elapsed_s": plan.elapsed_s, "metrics": metrics_path,
            "checkpoint": plan.checkpoint, "final_dir": os.path.join(out, "final"), "first_eval": first,
            "last_eval": last, "plot": png if os.path.isfile(png) else None, "already_finished": True,
            "last_train_loss": next((r["loss"] for r in reversed(read_metrics(metrics_path))
                                     if r.get("split") == "train"), float("nan"))}
