"""GLUE data: the task table, readers for the standard `glue_data` TSV layout and the hub, tokenization
and padded batches.

The TSV files are split on tabs by hand, never through the `csv` module: GLUE text contains unbalanced
double quotes (MRPC has hundreds) that a quoting reader would merge across lines. Headers are matched
by column name, so a file with the right columns in another order still reads; CoLA has no header and
is read by position.

Label ids are the ones the hub's `nyu-mll/glue` uses (e.g. MNLI entailment=0, neutral=1,
contradiction=2), so a model finetuned on TSV data and one finetuned on hub data agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "TaskSpec", "TASKS", "ALL_TASKS", "GlueSplit", "GlueDataError", "parse_tasks", "select_tasks", "read_split",
    "check_task_files", "load_task", "load_task_hub", "find_data_dir", "Encoded", "load_tokenizer", "encode", "collate",
]


class GlueDataError(ValueError):
    """Bad GLUE input; the message names the file (and line, where there is one)."""


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is laid out on disk and on the hub.

    text_cols / label_col are header names, or column positions (ints) for header-less files.
    labels: the label strings in id order; None for regression (STS-B, float scores in [0, 5]).
    eval_files: eval split name -> file name (MNLI has two dev sets).
    """
    name: str
    dirname: str
    text_cols: tuple
    label_col: str | int
    labels: tuple[str, ...] | None
    header: bool = True
    n_cols: int | None = None  # exact column count for header-less files
    eval_files: dict = field(default_factory=lambda: {"dev": "dev.tsv"})
    skip_malformed: bool = False  # QQP: rows broken by stray newlines are reported and skipped
    hub_text_cols: tuple = ()
    hub_eval_splits: dict = field(default_factory=lambda: {"dev": "validation"})

    @property
    def num_labels(self) -> int:
        """Classifier width: 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", (3,), 1, _BIN, header=False, n_cols=4, hub_text_cols=("sentence",)),
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", _BIN, hub_text_cols=("sentence",)),
    "mrpc": TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BIN,
                     hub_text_cols=("sentence1", "sentence2")),
    "stsb": TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", None,
                     hub_text_cols=("sentence1", "sentence2")),
    "qqp": TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BIN, skip_malformed=True,
                    hub_text_cols=("question1", "question2")),
    "mnli": TaskSpec("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"),
                     eval_files={"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"},
                     hub_text_cols=("premise", "hypothesis"),
                     hub_eval_splits={"matched": "validation_matched", "mismatched": "validation_mismatched"}),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", _NLI2,
                     hub_text_cols=("question", "sentence")),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2,
                    hub_text_cols=("sentence1", "sentence2")),
    "wnli": TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BIN,
                     hub_text_cols=("sentence1", "sentence2")),
}
# Order of a full run: MNLI first, so that RTE/MRPC/STS-B can start from its finetuned weights.
ALL_TASKS: tuple[str, ...] = ("mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb", "wnli")
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'all' or a comma list (any case, 'SST-2' style accepted) -> task names in run order (MNLI first)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip().lower() for t in items if t.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    out = []
    for t in names:
        t = _ALIASES.get(t, t)
        if t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; expected 'all', 'available' or a comma list of "
                             f"{list(ALL_TASKS)}")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("--tasks: no task given")
    return sorted(out, key=ALL_TASKS.index)


@dataclass
class GlueSplit:
    """One split of one task. text_b is None for single-sentence tasks.

    labels: [N] int64 class ids, or [N] float32 scores for regression.
    """
    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    source: str  # file path or hub id, for messages
    skipped: int = 0  # malformed lines skipped (QQP)

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, n: int | None) -> "GlueSplit":
        """The first n examples (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        return GlueSplit(self.task, self.split, self.text_a[:n], None if self.text_b is None else self.text_b[:n],
                         self.labels[:n], self.source, self.skipped)


def _parse_label(spec: TaskSpec, raw: str, where: str):
    raw = raw.strip()
    if spec.labels is None:
        try:
            v = float(raw)
        except ValueError:
            raise GlueDataError(f"{where}: score {raw!r} is not a number") from None
        if not 0.0 <= v <= 5.0:
            raise GlueDataError(f"{where}: score {v} outside [0, 5]")
        return v
    try:
        return spec.labels.index(raw)
    except ValueError:
        raise GlueDataError(f"{where}: label {raw!r} not in the {spec.name} label set {list(spec.labels)}") from None


def read_split(spec: TaskSpec, path: str | os.PathLike, split: str = "train") -> GlueSplit:
    """Read one GLUE TSV file of task `spec`. Raises GlueDataError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise GlueDataError(f"{path}: file not found (expected the {spec.dirname} {split} split)")
    # utf-8-sig strips MRPC's byte order mark, so its first header name is "Quality", not "\ufeffQuality".
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise GlueDataError(f"{path}: empty file")
    start = 0
    if spec.header:
        head = lines[0].split("\t")
        n_cols = len(head)
        cols = {name.strip(): i for i, name in enumerate(head)}
        wanted = [*spec.text_cols, spec.label_col]
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise GlueDataError(f"{path}:1: header lacks column(s) {missing} for {spec.name}; header is {head}")
        text_idx = [cols[c] for c in spec.text_cols]
        label_idx = cols[spec.label_col]
        start = 1
    else:
        n_cols, text_idx, label_idx = spec.n_cols, list(spec.text_cols), spec.label_col
    text_a, text_b, labels, skipped = [], [], [], 0
    for lineno in range(start + 1, len(lines) + 1):
        line = lines[lineno - 1]
        where = f"{path}:{lineno}"
        parts = line.split("\t")
        if len(parts) != n_cols:
            if spec.skip_malformed:
                skipped += 1
                continue
            raise GlueDataError(f"{where}: expected {n_cols} tab-separated columns, found {len(parts)}")
        labels.append(_parse_label(spec, parts[label_idx], where))
        text_a.append(parts[text_idx[0]])
        if len(text_idx) > 1:
            text_b.append(parts[text_idx[1]])
    if not labels:
        raise GlueDataError(f"{path}: no examples (only a header or only malformed lines)")
    dtype = np.float32 if spec.is_regression else np.int64
    return GlueSplit(spec.name, split, text_a, text_b if len(spec.text_cols) > 1 else None,
                     np.asarray(labels, dtype=dtype), str(path), skipped)


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The glue_data folder: `explicit`, else $FASTBERT_DATA/glue, else ../shared/data/glue beside the repo."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("FASTBERT_DATA")
    candidates = [Path(env) / "glue", Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
    for c in candidates:
        if c.is_dir() and (c / "SST-2").is_dir():
            return c
    return None


def task_dir(spec: TaskSpec, data_dir: str | os.PathLike) -> Path:
    """The task's folder under data_dir ('SST-2'; the lower-case task name is accepted too)."""
    data_dir = Path(data_dir)
    for name in (spec.dirname, spec.name, spec.dirname.lower()):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise GlueDataError(f"{data_dir / spec.dirname}: task folder for {spec.name} not found "
                        f"(expected the standard glue_data layout under --data {data_dir})")


def check_task_files(task: str, data_dir: str | os.PathLike) -> list[Path]:
    """The files `task` needs under data_dir; raises GlueDataError naming the first one missing.

    Cheap (no reading), so a run checks every task before spending hours on the first one."""
    spec = TASKS[task]
    d = task_dir(spec, data_dir)
    paths = [d / "train.tsv", *(d / f for f in spec.eval_files.values())]
    for p in paths:
        if not p.is_file():
            raise GlueDataError(f"{p}: file not found (needed by {spec.name})")
    return paths


def _missing_files(task: str, data_dir) -> str | None:
    try:
        check_task_files(task, data_dir)
    except GlueDataError as e:
        return str(e)
    return None


def select_tasks(tasks: str | Sequence[str], data_dir: str | os.PathLike | None) -> list[str]:
    """The tasks to run, in run order, with their files checked under ``data_dir`` (None: the hub has all).

    ``'available'`` is every task whose files are present. ``'all'`` (or a list) with a task missing raises
    :class:`GlueDataError` naming the missing tasks and pointing at ``--tasks available`` -- cheap, so a run
    fails before hours of MNLI rather than after."""
    is_available = isinstance(tasks, str) and tasks.strip().lower() == "available"
    wanted = list(ALL_TASKS) if is_available else parse_tasks(tasks)
    if data_dir is None:
        return wanted
    missing = {t: why for t in wanted if (why := _missing_files(t, data_dir))}
    present = [t for t in wanted if t not in missing]
    if is_available:
        if not present:
            raise GlueDataError(f"--tasks available: no GLUE task folder (e.g. SST-2/train.tsv) under --data "
                                f"{data_dir}")
        return present
    if missing:
        if len(missing) == 1:
            raise GlueDataError(next(iter(missing.values())))
        names = ", ".join(f"{t} ({TASKS[t].dirname})" for t in missing)
        hint = (f"Run the {len(present)} present ones ({', '.join(present)}) with --tasks available, or use "
                if present else "Use ")
        raise GlueDataError(f"--tasks: {len(missing)} of the requested tasks have no files under --data {data_dir}: "
                            f"{names}. {hint}--data hub (nyu-mll/glue), or add the missing folders in the "
                            "standard glue_data layout.")
    return wanted


def load_task(task: str, data_dir: str | os.PathLike) -> tuple[GlueSplit, dict[str, GlueSplit]]:
    """(train split, {eval split name: split}) of `task` from a glue_data folder."""
    spec = TASKS[task]
    d = task_dir(spec, data_dir)
    train = read_split(spec, d / "train.tsv", "train")
    evals = {name: read_split(spec, d / fname, name) for name, fname in spec.eval_files.items()}
    return train, evals


def load_task_hub(task: str, dataset: str = "nyu-mll/glue") -> tuple[GlueSplit, dict[str, GlueSplit]]:
    """The same from the Hugging Face hub through `datasets` (needs network or a populated HF cache)."""
    from .data import load_hub_dataset  # only the hub path needs `datasets`

    spec = TASKS[task]
    ds = load_hub_dataset("--data hub", dataset, spec.name)

    def conv(split_name: str, hub_split: str) -> GlueSplit:
        d = ds[hub_split]
        a = list(d[spec.hub_text_cols[0]])
        b = list(d[spec.hub_text_cols[1]]) if len(spec.hub_text_cols) > 1 else None
        y = np.asarray(d["label"], dtype=np.float32 if spec.is_regression else np.int64)
        if not spec.is_regression and ((y < 0) | (y >= spec.num_labels)).any():
            raise GlueDataError(f"{dataset}/{spec.name}[{hub_split}]: labels outside 0..{spec.num_labels - 1} "
                                "(is this the unlabelled test split?)")
        return GlueSplit(spec.name, split_name, a, b, y, f"{dataset}/{spec.name}[{hub_split}]")

    return conv("train", "train"), {k: conv(k, v) for k, v in spec.hub_eval_splits.items()}


# ---------------------------------------------------------------- tokenization and batches

@dataclass
class Encoded:
    """A tokenized split: per example int32 ids and token types (variable length), labels [N]."""
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(vocab_file: str | os.PathLike, lowercase: bool = True, max_seq_len: int = 256):
    """A `tokenizers` BertWordPieceTokenizer on vocab_file, truncating to max_seq_len tokens (pairs: longest first)."""
    from tokenizers import BertWordPieceTokenizer

    if not Path(vocab_file).is_file():
        raise FileNotFoundError(f"vocab_file: {vocab_file} not found (the checkpoint folder needs a vocab.txt)")
    if max_seq_len < 8:
        raise ValueError(f"max_seq_len: must be at least 8, got {max_seq_len}")
    tok = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase)
    tok.enable_truncation(max_length=max_seq_len)
    tok.no_padding()
    return tok


def encode(tokenizer, split: GlueSplit) -> Encoded:
    """Tokenize a split: [CLS] a [SEP] (b [SEP]) with token types 0/1."""
    if split.text_b is None:
        encs = tokenizer.encode_batch(split.text_a)
    else:
        encs = tokenizer.encode_batch(list(zip(split.text_a, split.text_b)))
    ids = [np.asarray(e.ids, dtype=np.int32) for e in encs]
    types = [np.asarray(e.type_ids, dtype=np.int32) for e in encs]
    return Encoded(ids, types, split.labels)


def collate(enc: Encoded, idx: Sequence[int], pad_id: int = 0) -> dict:
    """Pad the examples `idx` to their longest length.

    Returns torch tensors: input_ids, token_type_ids, attention_mask [B, S] int64 and labels [B]
    (int64, or float32 for regression). Padding only to the batch maximum keeps the padded work small;
    the fastbert model then drops the pads entirely (unpadded attention).
    """
    import torch

    seqs = [enc.input_ids[i] for i in idx]
    S = max(len(s) for s in seqs)
    ids = np.full((len(idx), S), pad_id, dtype=np.int64)
    types = np.zeros((len(idx), S), dtype=np.int64)
    mask = np.zeros((len(idx), S), dtype=np.int64)
    for r, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[r, :n] = enc.input_ids[i]
        types[r, :n] = enc.token_type_ids[i]
        mask[r, :n] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(types),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(enc.labels[np.asarray(idx, dtype=np.int64)]),
    }
