"""MLM pretraining of a fastbert encoder.

    python -m train.pretrain --config train/configs/tiny-cpu.yaml [--data PATH] [--output-dir DIR] [key=value ...]
    torchrun --nproc_per_node=8 -m train.pretrain --config train/configs/mosaicbert-base.yaml

The loop is one straight function (:func:`train`), nanoGPT style. Outputs in ``output_dir``:
``config.yaml`` (the resolved config), ``metrics.jsonl`` (train rows every ``log_every`` steps, held-out rows
every ``eval_every``), ``checkpoints/step-NNNNNNN/`` (``model.safetensors`` + ``config.json`` +
``trainer_state.pt``: optimizer, schedule position, RNG of every rank, data position), ``loss.png`` and
``final/`` (``config.json``, ``model.safetensors``, tokenizer files; ``BertForMaskedLM.from_pretrained``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import data as D
from .config import PretrainConfig, expand_path, load_config, save_config
from .resume import (ResumeError, Schedule, StartPlan, evals_from_metrics, finished_summary, latest_checkpoint,
                     lr_at, plan_start, restore, save_checkpoint)
from .tokenizer import WordPiece, load_tokenizer
from .utils import (Dist, StopSignals, gpu_peak_flops, mfu, plot_losses, prog_name, rng_state, seed_all,
                    setup_distributed, truncate_metrics)

__all__ = ["train", "main", "lr_at", "budget_fraction", "batch_size_at", "build_optimizer", "TrainingDiverged",
           "TrainingInterrupted", "ResumeError"]

class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without writing the bad state."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run at a step boundary after writing a checkpoint, metrics and the plot.
    ``signum`` is the signal, ``summary`` what :func:`train` would have returned so far."""

    def __init__(self, message: str, signum: int, summary: Dict):
        super().__init__(message)
        self.signum, self.summary = signum, summary


# ----------------------------------------------------------------------------------------------
# Pieces of the loop

def budget_fraction(step: int, elapsed_s: float, cfg: PretrainConfig, first_step_s: float) -> float:
    """Where the schedule stands for optimizer step ``step`` (0-based): the fraction of the budget this step
    ends at for a step budget; for a wall-clock budget, the fraction of the time after the first step that
    has elapsed, so the first step runs at the warmup's starting LR (0 for a warmup from zero) and its
    duration (torch.compile's compilation, CUDA start-up: minutes) does not eat the warmup. The run still
    ends after ``max_minutes`` of training in total."""
    if cfg.max_steps:
        return (step + 1) / cfg.max_steps
    if step == 0:
        return 0.0
    return max(elapsed_s - first_step_s, 0.0) / max(cfg.max_minutes * 60.0 - first_step_s, 1e-9)


def batch_size_at(frac: float, cfg: PretrainConfig, world: int) -> int:
    """Global batch of a step at budget fraction ``frac``: ``global_batch_size``, or with
    ``batch_size_ramp = r > 0`` a linear ramp in whole micro-batches per rank, from one at ``frac = 0`` to
    ``global_batch_size`` at ``frac = r`` (Cramming's schedule_batch_size, micro-batch x ranks as the unit)."""
    full = cfg.global_batch_size
    if cfg.batch_size_ramp <= 0:
        return full
    unit = min(cfg.micro_batch_size * world, full)
    return min(int(frac * full / (cfg.batch_size_ramp * unit)) * unit + unit, full)


def decoupled_to_torch(weight_decay: float, peak_lr: float) -> float:
    """``torch.optim.AdamW`` multiplies its ``weight_decay`` by the current LR (``w *= 1 - lr_t * wd``);
    decoupled weight decay (Loshchilov & Hutter; Composer's DecoupledAdamW, which MosaicBERT used) shrinks
    by ``weight_decay * lr_t / lr_0``. Passing ``weight_decay / lr_0`` to torch gives exactly that."""
    return weight_decay / peak_lr


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay (:func:`decoupled_to_torch`): on every parameter
    (``optim.decay_all_parameters``, as MosaicBERT's code), or on matrices and embeddings only (biases and
    LayerNorm gains, the 1-D parameters, get none; 24hBERT and Cramming)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or cfg.optim.decay_all_parameters else no_decay).append(p)
    o = cfg.optim
    wd = decoupled_to_torch(o.weight_decay, o.lr)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps, **extra)


def mask_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the masking generator of one micro-batch, ``micro`` counted over the whole global batch
    (``rank * accum_steps + i``). Masks depend on (seed, step, micro) only: a resumed run masks exactly as
    the uninterrupted one, and N ranks see the same masked batches as one process with N times the
    accumulation steps."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def make_batch(seqs: Sequence[np.ndarray], tok: WordPiece, prob: float, gen: torch.Generator, pad_to: int = 0):
    ids, attn = D.collate(seqs, tok.pad_id, pad_to)
    inputs, labels = D.mask_tokens(ids, tok.special_ids, tok.vocab_size, tok.mask_id, prob, gen)
    return inputs, attn, labels


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> Dict[str, float]:
    """Held-out MLM loss (mean over all masked tokens) and accuracy on fixed, pre-masked batches."""
    was_training = model.training
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for inputs, attn, labels in batches:
        with autocast:
            out = model(input_ids=inputs.to(device), attention_mask=attn.to(device), labels=labels.to(device),
                        return_logits=True)
        loss_sum += float(out.loss) * out.n_masked
        n += out.n_masked
        correct += int(out.n_correct)
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), "eval_acc": correct / max(n, 1), "eval_tokens": n}


def prepare_tokenizer(cfg: PretrainConfig, src: D.Source, cache_root: str, dist: Dist, log) -> WordPiece:
    """``data.tokenizer``: a vocabulary file, or ``train``: a WordPiece vocabulary trained on the first
    ``data.tokenizer_documents`` (else ``max_documents``) training documents, cached by their identity."""
    dc = cfg.data
    tok_spec = expand_path(dc.tokenizer)
    if tok_spec == "train":
        n_docs = dc.tokenizer_documents or dc.max_documents
        if src.kind == "hub" and not n_docs:
            raise ValueError("data.tokenizer=train on a hub dataset: set data.tokenizer_documents (how many "
                             "documents to train the vocabulary on)")
        key = D.cache_key(D.Source(src.kind, src.files, src.name, src.config, src.split),
                          f"train-{dc.train_vocab_size}-{dc.lowercase}", 0, n_docs, dc.text_field)
        tok_path = os.path.join(cache_root, f"wordpiece-{key}", "tokenizer.json")
        if dist.is_main and not os.path.isfile(tok_path):
            log(f"data: training a {dc.train_vocab_size}-token WordPiece vocabulary -> {tok_path}")
            tok = load_tokenizer("train", dc.lowercase, D.iter_documents(src, dc.text_field, n_docs),
                                 dc.train_vocab_size)
            tok.save(os.path.dirname(tok_path))
        dist.barrier()
        tok_spec = tok_path
    return load_tokenizer(tok_spec, dc.lowercase)


def prepare_data(cfg: PretrainConfig, dist: Dist, log):
    """Tokenizer, the training-sequence reader (``train/stream.py``: cached shards, or a stream with
    ``data.streaming``) and the tokenized validation set; rank 0 builds the caches, the others wait."""
    from .stream import ShardReader, StreamReader, open_document_stream
    dc = cfg.data
    valid_path = expand_path(dc.valid)
    src = D.resolve_source(expand_path(dc.train), exclude=[valid_path], hub_config=dc.hub_config,
                           hub_split=dc.hub_split, arg="data.train (--data)")
    cache_root = expand_path(dc.cache_dir) or D.default_cache_root()
    tok = prepare_tokenizer(cfg, src, cache_root, dist, log)

    def build(source, max_docs, logf):
        return D.build_or_load(source, tok, dc.max_len, cache_root, max_docs, dc.text_field, dc.num_workers,
                               dc.shard_tokens, log=logf, sequence_mode=dc.sequence_mode)

    valid_src = (D.resolve_source(valid_path, hub_config=dc.hub_config, hub_split=dc.valid_hub_split,
                                  arg="data.valid") if valid_path else None)
    train_ds = valid_ds = None
    if dist.is_main:  # build (or verify) the caches once; the other ranks open them after the barrier
        train_ds = None if dc.streaming else build(src, dc.max_documents, log)
        valid_ds = build(valid_src, dc.valid_max_documents, log) if valid_src else None
    dist.barrier()
    if not dist.is_main:
        train_ds = None if dc.streaming else build(src, dc.max_documents, lambda *_: None)
        valid_ds = build(valid_src, dc.valid_max_documents, lambda *_: None) if valid_src else None
    if dc.streaming:
        name = ",".join(os.path.basename(f) for f in src.files) if src.kind == "files" else \
            f"{src.name}/{src.config or '-'}/{src.split}"
        reader = StreamReader(lambda: open_document_stream(src, dc.text_field, dc.max_documents, dist.rank,
                                                           dist.world, "data.train (--data)"),
                              tok, dc.sequence_mode, dc.max_len, cfg.seed, dist.rank, dist.world,
                              dc.stream_chunk_documents, dc.text_field, log, name)
    else:
        reader = ShardReader(train_ds, D.BatchPlan(len(train_ds), cfg.global_batch_size, cfg.micro_batch_size,
                                                   dist.rank, dist.world, cfg.seed), log)
    return tok, reader, valid_ds


def reader_states(reader, dist: Dist, consumed: int, first_step_s: float) -> Dict:
    """The data position for a checkpoint: sequences consumed, every rank's reader state, the first step's
    duration (the wall-clock schedule's offset)."""
    states = [reader.state()]
    if dist.enabled:
        states = [None] * dist.world
        torch.distributed.all_gather_object(states, reader.state())
    return {"sequences_consumed": consumed, "readers": states, "first_step_s": first_step_s}


def resume_reader(reader, data: Dict, dist: Dist):
    """Put ``reader`` where a checkpoint's ``data`` left it; returns (sequences consumed, first step's s)."""
    consumed = int(data["sequences_consumed"])
    states = data.get("readers")
    if states and len(states) == dist.world:
        reader.load_state(states[dist.rank])
    elif getattr(reader, "kind", "") == "shards":  # the shard order is global: any world size continues it
        reader.load_state({"kind": "shards", "position": consumed})
    else:
        raise ValueError(f"resume: the checkpoint streamed its data on {len(states or [])} rank(s), this run has "
                         f"{dist.world}; a stream resumes on the same number of ranks only")
    return consumed, float(data.get("first_step_s", 0.0))


# ----------------------------------------------------------------------------------------------
# The loop

def train(cfg: PretrainConfig, log=None) -> Dict:
    """Run (or resume) pretraining as configured; returns a summary dict (paths, first/last held-out loss).

    Everything that can refuse the run (config validation, the resume check of :func:`plan_start`) runs
    before anything is written. Raises :class:`ResumeError` (nothing written), :class:`TrainingDiverged`
    on a NaN/inf loss (the checkpoints already written are kept) and :class:`TrainingInterrupted` after
    SIGINT/SIGTERM (a checkpoint of the last step written; ``resume=auto`` continues it exactly).
    """
    cfg.validate()
    plan = plan_start(cfg, os.path.abspath(expand_path(cfg.output_dir)))
    if plan.finished:
        return finished_summary(cfg, plan, log)
    prev_threads = torch.get_num_threads()
    try:
        return _train(cfg, plan, log)
    finally:
        torch.set_num_threads(prev_threads)  # an in-process caller (tests, quickstart) gets its setting back


def _eval_batches(cfg: PretrainConfig, valid_ds, tok, dist: Dist) -> List:
    """Held-out batches, masked once with a fixed seed: every evaluation scores the same positions."""
    if valid_ds is None or not dist.is_main:
        return []
    g = torch.Generator().manual_seed(cfg.seed + 7)
    n_eval = min(cfg.eval_sequences, len(valid_ds))
    prob = cfg.data.eval_mlm_probability or cfg.data.mlm_probability
    return [make_batch([valid_ds[j] for j in range(i, min(i + cfg.micro_batch_size, n_eval))], tok, prob, g)
            for i in range(0, n_eval, cfg.micro_batch_size)]


def _train(cfg: PretrainConfig, plan: StartPlan, log) -> Dict:
    from fastbert.models import BertConfig, BertForMaskedLM

    dist = setup_distributed(cfg.device)
    if cfg.threads > 0:  # after setup_distributed, which splits the cores between CPU ranks
        torch.set_num_threads(cfg.threads)
    device = dist.device
    bar = None

    def say(msg: str) -> None:  # rank 0 only; through tqdm so the bar is not broken
        if not dist.is_main:
            return
        if log is not None:
            log(msg)
        elif bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    out_dir = plan.out_dir
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if dist.is_main:  # the first writes: plan_start has accepted the run folder and the checkpoint
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    say(f"pretrain: output -> {out_dir} (world size {dist.world}, device {device})")
    if plan.checkpoint:
        say(f"resume: continuing {plan.checkpoint} (step {plan.step}, {plan.elapsed_s / 60:.1f} min trained)")
    for note in plan.notes:
        say(f"resume: {note}")

    tok, reader, valid_ds = prepare_data(cfg, dist, say)

    # --- model and optimizer (same seed on every rank: DDP also broadcasts rank 0's weights) ---
    seed_all(cfg.seed)
    mcfg = BertConfig.preset(cfg.model.preset, **{"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id,
                                                  **cfg.model.overrides})
    if mcfg.position_embedding_type == "learned" and cfg.data.max_len > mcfg.max_position_embeddings:
        raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the model's max_position_embeddings "
                         f"{mcfg.max_position_embeddings}")
    mcfg.extra = {**mcfg.extra, "tokenizer": tok.fingerprint, "pretrain_max_len": cfg.data.max_len}
    if cfg.model.finetune_overrides:  # read by train.glue when it builds a classifier on this checkpoint
        mcfg.extra["finetune_overrides"] = dict(cfg.model.finetune_overrides)
    raw_model = BertForMaskedLM(mcfg).to(device)
    n_params = raw_model.num_parameters()
    optimizer = build_optimizer(raw_model, cfg, device)

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    step, elapsed, consumed, first_step_s = plan.step, plan.elapsed_s, 0, 0.0
    if plan.state is not None:
        restore(plan, raw_model, optimizer, dist, cfg, say)
        consumed, first_step_s = resume_reader(reader, plan.state["data"], dist)
        if dist.is_main:
            truncate_metrics(metrics_path, step)
    else:
        seed_all(cfg.seed + dist.rank)  # dropout differs per rank; the weights are already drawn
        if dist.is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)
    schedule = Schedule.from_config(cfg, plan.anchor)

    model = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    # micro-batch size and accumulation steps (the sequences come from the reader)
    batch_plan = D.BatchPlan(1, cfg.global_batch_size, cfg.micro_batch_size, dist.rank, dist.world, cfg.seed)
    pad_to = cfg.data.max_len if cfg.compile else 0  # static shapes for the compiler; else pad to longest
    budget_s = cfg.max_minutes * 60.0

    def progress(step_: int, elapsed_: float) -> float:
        return step_ / cfg.max_steps if cfg.max_steps else elapsed_ / budget_s

    eval_batches = _eval_batches(cfg, valid_ds, tok, dist)
    peak = gpu_peak_flops(device)
    metrics_f = open(metrics_path, "a") if dist.is_main else None

    def write_metrics(row: Dict) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()

    def run_eval() -> Optional[Dict]:
        if not eval_batches:
            return None
        r = evaluate(raw_model, eval_batches, device, autocast)
        write_metrics({"split": "valid", "step": step, **r})
        say(f"eval  step {step:>6}: held-out MLM loss {r['eval_loss']:.4f}, accuracy {r['eval_acc']:.3f} "
            f"({r['eval_tokens']} masked tokens)")
        return r

    def checkpoint() -> str:
        rngs = [rng_state()]
        if dist.enabled:  # every rank's dropout RNG, so a resume continues each rank's stream
            rngs = [None] * dist.world
            torch.distributed.all_gather_object(rngs, rng_state())
        data_state = reader_states(reader, dist, consumed, first_step_s)  # every rank's data position
        path = None
        if dist.is_main:
            path = save_checkpoint(out_dir, raw_model, optimizer, step, elapsed, rngs, cfg, cfg.keep_checkpoints,
                                   data_state, schedule)
            say(f"checkpoint: {path}")
        dist.barrier()
        return path

    budget = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.max_minutes} min"
    say(f"model: {cfg.model.preset} {mcfg.num_hidden_layers}x{mcfg.hidden_size}, {n_params / 1e6:.2f}M params; "
        f"pos={mcfg.position_embedding_type} mlp={mcfg.mlp_type} attn={mcfg.attention_impl}")
    ramp = f" (ramped up over {cfg.batch_size_ramp:.0%} of the budget)" if cfg.batch_size_ramp else ""
    say(f"train: {reader.describe()}; global batch{ramp} "
        f"{cfg.global_batch_size} = {dist.world} rank(s) x {batch_plan.accum_steps} micro-step(s) x "
        f"{batch_plan.micro_batch}; budget {budget}; lr {cfg.optim.lr}, masking {cfg.data.mlm_probability:.0%}; "
        f"{'bf16 autocast' if use_bf16 else 'fp32'}")

    if step == 0:
        run_eval()
    last_ckpt = latest_checkpoint(out_dir)
    if dist.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps or None, initial=step, desc="pretrain", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    win_tokens, win_time, win_loss, win_n = 0, 0.0, 0.0, 0
    last_loss = float("nan")
    stop = StopSignals()
    stopped = False

    with stop:
        while progress(step, elapsed) < 1.0:
            t0 = time.perf_counter()
            frac = budget_fraction(step, elapsed, cfg, first_step_s)
            lr = schedule.lr(frac)
            for group in optimizer.param_groups:
                group["lr"] = lr

            step_batch = batch_size_at(frac, cfg, dist.world)
            seqs = reader.take(step_batch)
            consumed += step_batch
            micro = [seqs[i:i + batch_plan.micro_batch] for i in range(0, len(seqs), batch_plan.micro_batch)]
            loss_sum = torch.zeros((), device=device)
            n_tokens = 0
            for i, idx in enumerate(micro):
                gen = torch.Generator().manual_seed(mask_seed(cfg.seed, step, dist.rank * len(micro) + i))
                inputs, attn, labels = make_batch(idx, tok, cfg.data.mlm_probability, gen, pad_to)
                n_tokens += int(attn.sum())
                if device.type == "cuda":  # pinned host memory lets the copies overlap the previous step
                    inputs, attn, labels = (t.pin_memory() for t in (inputs, attn, labels))
                inputs, attn, labels = (t.to(device, non_blocking=True) for t in (inputs, attn, labels))
                # DDP all-reduces gradients on the last micro-step only; the others accumulate locally.
                sync = (model.no_sync() if dist.enabled and i < len(micro) - 1 else contextlib.nullcontext())
                with sync:
                    with autocast:
                        out = model(input_ids=inputs, attention_mask=attn, labels=labels)
                    loss = out.loss / len(micro)
                    if cfg.debug_nan_at_step and step + 1 == cfg.debug_nan_at_step:
                        loss = loss * float("nan")  # test knob: a diverged step
                    loss.backward()
                loss_sum += loss.detach()
            # clip_grad_norm_ also returns the global norm (after DDP's all-reduce, so equal on every rank):
            # a NaN on any rank shows up on all of them and every rank stops at the same step.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                                       else float("inf"))
            # One host sync per step: the NaN guard must see this step before the optimizer applies it.
            loss_val, norm_val = (float(x) for x in torch.stack([loss_sum, grad_norm.float()]).cpu())
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                where = last_ckpt or "none written yet"
                reader.close()
                if bar is not None:
                    bar.close()
                if metrics_f is not None:
                    metrics_f.close()
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss={loss_val} grad_norm={norm_val} (lr {lr:.3g}). "
                    f"Stopped without saving this state; last good checkpoint: {where}. Lower optim.lr or "
                    f"raise optim.warmup, then resume from it (resume=auto).")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            dt = time.perf_counter() - t0
            if budget_s and dist.enabled:
                # The wall-clock budget must end every rank at the same step: rank 0's clock decides.
                t = torch.tensor([dt], device=device, dtype=torch.float64)
                torch.distributed.broadcast(t, 0)
                dt = float(t)
            elapsed += dt
            if step == 1:
                first_step_s = elapsed  # compilation and start-up: kept out of the schedule (budget_fraction)
            win_tokens += n_tokens
            win_time += dt
            win_loss += loss_val
            win_n += 1
            last_loss = loss_val

            stopped = stop.agreed(dist)  # every rank stops after the same step
            if step % cfg.log_every == 0 or progress(step, elapsed) >= 1.0 or stopped:
                stats = torch.tensor([win_loss / win_n, float(win_tokens)], dtype=torch.float64, device=device)
                if dist.enabled:  # mean loss and total tokens over ranks
                    torch.distributed.all_reduce(stats)
                    stats[0] /= dist.world
                tok_s = float(stats[1]) / max(win_time, 1e-9)
                m = mfu(n_params, tok_s / dist.world, peak)
                row = {"split": "train", "step": step, "loss": float(stats[0]), "lr": lr, "grad_norm": norm_val,
                       "tokens_per_s": tok_s, "mfu": m, "elapsed_s": elapsed, "batch_size": step_batch,
                       "sequences": consumed, **reader.progress()}
                write_metrics(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                                    mfu="n/a" if m is None else f"{m:.1%}", refresh=False)
                win_tokens, win_time, win_loss, win_n = 0, 0.0, 0.0, 0
            if bar is not None:
                if not cfg.max_steps:
                    bar.set_description(f"pretrain {elapsed / 60:.1f}/{cfg.max_minutes:g} min")
                bar.update(1)

            done = progress(step, elapsed) >= 1.0
            if stopped:
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and not done:
                run_eval()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or done:
                last_ckpt = checkpoint()
            if cfg.debug_step_delay_s:
                time.sleep(cfg.debug_step_delay_s)  # test knob: widen the window for a kill

    if stopped:
        if bar is not None:
            bar.close()
            bar = None
        path = checkpoint()  # every rank takes part (RNG and data positions are gathered)
        reader.close()
        return _stop_after_signal(stop, step, elapsed, path, metrics_f, metrics_path, cfg, dist, say)
    reader.close()
    if bar is not None:
        bar.close()
        bar = None
    summary = {"output_dir": out_dir, "steps": step, "elapsed_s": elapsed, "last_train_loss": last_loss,
               "metrics": metrics_path, "checkpoint": last_ckpt}
    if dist.is_main:
        run_eval()
        metrics_f.close()
        final_dir = _write_final(out_dir, raw_model, tok, cfg)
        png = _plot(cfg, metrics_path, out_dir)
        first, last = evals_from_metrics(metrics_path)
        summary.update(final_dir=final_dir, plot=png, first_eval=first, last_eval=last)
        say(f"done: {step} steps in {elapsed / 60:.1f} min; final model -> {final_dir}")
        say(f"      metrics -> {metrics_path}" + (f"; loss plot -> {png}" if png else ""))
    dist.barrier()
    if dist.enabled:
        torch.distributed.destroy_process_group()
    return summary


def _plot(cfg: PretrainConfig, metrics_path: str, out_dir: str) -> Optional[str]:
    return plot_losses(metrics_path, os.path.join(out_dir, "loss.png"),
                       title=f"{cfg.model.preset} MLM pretraining") if cfg.plot else None


def _write_final(out_dir: str, raw_model, tok, cfg: PretrainConfig) -> str:
    """``final/``: weights, config, tokenizer files and the pretraining config, renamed into place last."""
    final_dir = os.path.join(out_dir, "final")
    tmp = final_dir + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    raw_model.save_pretrained(tmp)
    tok.save(tmp)
    save_config(cfg, os.path.join(tmp, "pretrain_config.yaml"))
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    return final_dir


def _stop_after_signal(stop: StopSignals, step: int, elapsed: float, path: Optional[str], metrics_f,
                       metrics_path: str, cfg: PretrainConfig, dist: Dist, say):
    """SIGINT/SIGTERM, after the checkpoint of the step just finished (``path``): plot, then raise
    :class:`TrainingInterrupted` so the caller exits cleanly."""
    png = None
    if dist.is_main:
        metrics_f.close()
        png = _plot(cfg, metrics_path, os.path.dirname(metrics_path))
    dist.barrier()
    if dist.enabled:
        torch.distributed.destroy_process_group()
    summary = {"output_dir": os.path.dirname(metrics_path), "steps": step, "elapsed_s": elapsed,
               "metrics": metrics_path, "checkpoint": path, "plot": png}
    msg = (f"stopped by {stop.name} after step {step} ({elapsed / 60:.1f} min): checkpoint {path}, metrics "
           f"{metrics_path}" + (f", loss plot {png}" if png else "") + ". Rerun the same command (resume=auto) "
           "to continue exactly from here.")
    say(msg)
    raise TrainingInterrupted(msg, stop.signum, summary)


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None):
    from .config import config_help, shipped_configs
    p = argparse.ArgumentParser(prog=prog_name("pretrain"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be overridden as key=value, nested keys with dots "
                                       "(optim.lr=1e-3 max_steps=100 model.overrides.num_hidden_layers=4).\n"
                                       "Config keys and their defaults (a --config file replaces some of them):\n"
                                       + "\n".join(config_help()))
    p.add_argument("--config", help="a YAML file, or the name of a shipped config: "
                                    f"{', '.join(shipped_configs())}; without one the defaults below apply")
    p.add_argument("--data", help="training data: a file, a directory of .jsonl/.jsonl.gz/.txt files, or a "
                                  "Hugging Face hub dataset name (sets data.train)")
    p.add_argument("--output-dir", help="where metrics, checkpoints, loss.png and final/ go (sets output_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def config_from_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    args = parse_args(argv)
    if args.config is None:
        warn_if_defaults_on_cpu(list(args.overrides))
    cfg = load_config(args.config, list(args.overrides))
    if args.data:
        cfg.data.train = args.data
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return cfg.validate()


def warn_if_defaults_on_cpu(overrides: Sequence[str]) -> bool:
    """Without --config the defaults (the whole first corpus file tokenized with BERT's 30522-token
    vocabulary, batch 64) suit a GPU; on a CPU they take ~13 s a step. Say so and name the CPU config."""
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("device=")), "auto")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print("warning: no --config, so the built-in defaults apply (BERT's 30522-token vocabulary, the whole "
              "training file tokenized, global batch 64), and there is no GPU here: on a CPU that is about 13 s "
              "a step. For a CPU run use --config tiny-cpu (train/configs/tiny-cpu.yaml: a tiny model that "
              "learns in minutes), or the quickstart (fastbert-quickstart / python -m train.quickstart).",
              file=sys.stderr, flush=True)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = config_from_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except TrainingInterrupted as e:  # the message was logged; the conventional exit code of that signal
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted (outside the training steps: nothing new to resume from)", file=sys.stderr, flush=True)
        return 130
    except (ResumeError, D.ShardError, D.HubUnavailableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
