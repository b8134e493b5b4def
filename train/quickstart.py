"""The first command: pretrain a tiny MosaicBERT-style encoder, then finetune it on SST-2.

    python -m train.quickstart [--data DIR] [--output-dir DIR] [key=value ...]

DIR (default ``$FASTBERT_DATA``, else ``../shared/data`` beside the repository) holds ``corpus/``
(``wiki2015-00.jsonl.gz``, ``wiki2015-valid.jsonl.gz``), ``vocab/`` and ``glue/SST-2``. Runs
``train/configs/tiny-cpu.yaml`` (on the GPU when there is one; a few minutes on 2 CPU cores), then the GLUE
harness on SST-2 (one seed, one epoch over a slice of the training set) and prints where everything went.
``key=value`` items override the pretraining config (e.g. ``max_steps=100``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import REPO_ROOT, data_root, load_config

TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny-cpu.yaml"
# SST-2 on a 2-layer model: one epoch over 4000 sentences is enough to beat the majority class clearly.
GLUE_OVERRIDES = {"seeds": 1, "epochs": 1, "max_train_examples": 4000, "max_seq_len": 64, "batch_size": 32,
                  "lr": 5e-4, "weight_decay": 5e-6}


def check_data(root: Path) -> dict:
    """The files the quickstart needs under ``root``; a clear error naming what is missing."""
    need = {"train": root / "corpus" / "wiki2015-00.jsonl.gz", "valid": root / "corpus" / "wiki2015-valid.jsonl.gz",
            "glue": root / "glue", "sst2": root / "glue" / "SST-2" / "train.tsv"}
    missing = [str(p) for p in need.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"--data: {root} lacks {', '.join(missing)}. Point --data (or FASTBERT_DATA) at a folder with "
            "corpus/wiki2015-00.jsonl.gz, corpus/wiki2015-valid.jsonl.gz and glue/SST-2 (see "
            "../shared/data/README.md), or run `python -m train.pretrain --data <your corpus>` directly.")
    return need


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data folder with corpus/, vocab/ and glue/ (default: $FASTBERT_DATA or "
                                  "../shared/data)")
    p.add_argument("--output-dir", default="runs/quickstart", help="where everything goes (default %(default)s)")
    p.add_argument("--skip-glue", action="store_true", help="pretrain only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    args = p.parse_args(argv)

    root = Path(args.data).expanduser().resolve() if args.data else data_root()
    try:
        need = check_data(root)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["FASTBERT_DATA"] = str(root)  # the config's ${FASTBERT_DATA} paths resolve here
    out = Path(args.output_dir).resolve()
    cfg = load_config(str(TINY_CONFIG), list(args.overrides))
    cfg.output_dir = str(out / "pretrain")
    cfg.data.train, cfg.data.valid = str(need["train"]), str(need["valid"])

    from .pretrain import TrainingDiverged, train
    t0 = time.time()
    print(f"[quickstart] 1/2 pretraining ({TINY_CONFIG.name}) on {need['train']} -> {cfg.output_dir}", flush=True)
    try:
        summary = train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    t_pre = time.time() - t0
    final = summary["final_dir"]
    ev0, ev1 = summary.get("first_eval"), summary.get("last_eval")

    results, glue_error = None, None
    glue_out = out / "glue"
    if not args.skip_glue:
        print(f"[quickstart] 2/2 finetuning {final} on SST-2 -> {glue_out}", flush=True)
        try:
            from . import glue
        except ImportError as e:  # the GLUE harness is a separate module; pretraining stands alone
            glue_error = f"train.glue is not available ({e})"
        else:
            import torch
            prev = torch.get_num_threads()
            if cfg.threads > 0:  # the same CPU thread setting as the pretraining (see tiny-cpu.yaml)
                torch.set_num_threads(cfg.threads)
            try:
                results = glue.run(final, "sst2", data_dir=str(need["glue"]), output_dir=str(glue_out),
                                   overrides=dict(GLUE_OVERRIDES))
            except Exception as e:  # report, keep the pretraining results
                glue_error = f"{type(e).__name__}: {e}"
            finally:
                torch.set_num_threads(prev)
    t_all = time.time() - t0

    print("\n[quickstart] done in %.1f min (pretraining %.1f min)" % (t_all / 60, t_pre / 60))
    if ev0 and ev1:
        print(f"  held-out MLM loss      {ev0['eval_loss']:.3f} -> {ev1['eval_loss']:.3f} "
              f"(accuracy {ev0['eval_acc']:.3f} -> {ev1['eval_acc']:.3f})")
    print(f"  pretrained model       {final}  (BertForMaskedLM.from_pretrained)")
    print(f"  checkpoints            {os.path.join(summary['output_dir'], 'checkpoints')}")
    print(f"  metrics                {summary['metrics']}")
    if summary.get("plot"):
        print(f"  loss plot              {summary['plot']}")
    if results is not None:
        sst = results.get("tasks", {}).get("sst2", {})
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sst.get("metrics", {}).items())
        print(f"  SST-2 dev              {metrics or json.dumps(sst, default=str)[:200]}")
        print(f"  GLUE results           {glue_out / 'results.json'}, {glue_out / 'results.md'}")
    elif glue_error:
        print(f"  SST-2                  not run: {glue_error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
