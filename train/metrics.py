"""GLUE metrics in plain numpy (no scikit-learn/scipy at run time; the tests compare against them).

Every function takes 1-D array-likes of equal length and returns a Python float. Degenerate inputs
(a constant prediction or target) give 0.0 for the correlation metrics, which is what scikit-learn's
``matthews_corrcoef`` does and what makes a collapsed classifier score as "no better than chance"
instead of producing NaN in the GLUE table.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "accuracy", "f1_binary", "matthews_corr", "pearson", "spearman", "rankdata_average",
    "METRICS", "TASK_METRICS", "GLUE_TASKS", "task_metrics", "task_score", "glue_score",
    "SCORE_DEFINITIONS", "PAPER_TASK_METRIC", "paper_glue_score",
]


def _pair(preds, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{name}: preds and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"{name}: preds has {p.shape[0]} items but labels has {y.shape[0]}")
    if p.size == 0:
        raise ValueError(f"{name}: empty preds/labels")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of exact matches."""
    p, y = _pair(preds, labels, "accuracy")
    return float(np.mean(p == y))


def f1_binary(preds, labels, positive=1) -> float:
    """F1 of the positive class (MRPC, QQP: class 1). 0.0 when there are no true and no predicted positives."""
    p, y = _pair(preds, labels, "f1")
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corr(preds, labels) -> float:
    """Matthews correlation coefficient for binary or multiclass labels (Gorodkin's R_K form).

    Computed from the confusion matrix C: with t_k = row sums (true counts), p_k = column sums
    (predicted counts), c = trace, s = total:
    MCC = (c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t)); 0.0 when the denominator is 0.
    """
    p, y = _pair(preds, labels, "matthews_corr")
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inv[: y.size], inv[y.size:]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t, pk = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_yp = c * s - t @ pk
    cov_pp = s * s - pk @ pk
    cov_yy = s * s - t @ t
    denom = cov_pp * cov_yy
    return 0.0 if denom == 0 else float(cov_yp / math.sqrt(denom))


def pearson(preds, labels) -> float:
    """Pearson correlation in float64; 0.0 when either side is constant."""
    p, y = _pair(preds, labels, "pearson")
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = math.sqrt(float(dp @ dp) * float(dy @ dy))
    if denom == 0:
        return 0.0
    # Clip: rounding can push |r| a hair above 1 for perfectly (anti)correlated data.
    return float(np.clip((dp @ dy) / denom, -1.0, 1.0))


def rankdata_average(x) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span (scipy's 'average' method). [n] float64."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    ends = np.r_[starts[1:], sx.size]  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(preds, labels) -> float:
    """Spearman correlation: Pearson of tie-averaged ranks."""
    p, y = _pair(preds, labels, "spearman")
    return pearson(rankdata_average(p), rankdata_average(y))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1_binary, "matthews_corr": matthews_corr,
    "pearson": pearson, "spearman": spearman,
}

# Metrics per task, as in the GLUE paper. MNLI is evaluated on two dev sets; its metric names carry the split.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_corr",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),  # reported as matched_accuracy / mismatched_accuracy
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

# The tasks averaged into the GLUE score: the 8 without WNLI, as in BERT.
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


def task_metrics(task: str, preds, labels) -> dict[str, float]:
    """All metrics of `task` on one eval split, as {name: value}. preds are class ids (float scores for stsb)."""
    if task not in TASK_METRICS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {sorted(TASK_METRICS)}")
    return {name: METRICS[name](preds, labels) for name in TASK_METRICS[task]}


def task_score(metrics: Mapping[str, float]) -> float:
    """A task's score: the mean of its metrics (MNLI: of matched and mismatched accuracy)."""
    if not metrics:
        raise ValueError("metrics: empty")
    return float(np.mean(list(metrics.values())))


def glue_score(scores: Mapping[str, float]) -> tuple[float | None, list[str]]:
    """Mean of the task scores over the GLUE tasks present (WNLI and unknown tasks ignored).

    Returns (score or None when no GLUE task ran, list of the GLUE tasks that are missing), so the
    caller can say the average is partial.
    """
    present: Sequence[str] = [t for t in GLUE_TASKS if t in scores]
    missing = [t for t in GLUE_TASKS if t not in scores]
    if not present:
        return None, missing
    return float(np.mean([scores[t] for t in present])), missing


# Two GLUE scores, named side by side in every results table:
SCORE_DEFINITIONS: dict[str, str] = {
    "glue": ("GLUE leaderboard metrics: per task the mean of its metrics (CoLA Matthews corr.; SST-2, QNLI, RTE "
             "accuracy; MRPC and QQP F1 and accuracy; STS-B Pearson and Spearman; MNLI matched and mismatched "
             "accuracy), median over seeds, averaged over the 8 tasks (WNLI excluded, as in BERT)"),
    "mosaicbert": ("MosaicBERT paper (Portes et al. 2023, section 3; the finetuning code's metrics): MNLI-m "
                   "accuracy; QNLI, QQP, RTE, SST-2, MRPC accuracy; CoLA Matthews corr.; STS-B Spearman; mean "
                   "over seeds, averaged over the 8 tasks: the number its 79.6 is"),
}
# The one metric per task of the MosaicBERT paper's average (names as in our results' metric dicts).
PAPER_TASK_METRIC: dict[str, str] = {
    "mnli": "matched_accuracy", "qnli": "accuracy", "qqp": "accuracy", "rte": "accuracy", "sst2": "accuracy",
    "mrpc": "accuracy", "cola": "matthews_corr", "stsb": "spearman",
}


def paper_glue_score(per_seed: Mapping[str, Sequence[Mapping[str, float]]]) -> tuple[float | None, dict[str, float]]:
    """The MosaicBERT paper's GLUE average from ``{task: [metrics of each seed]}``: per task the mean over seeds
    of :data:`PAPER_TASK_METRIC`, then the mean over the GLUE tasks present. Returns (score or None, per-task
    values)."""
    tasks = {t: float(np.mean([m[PAPER_TASK_METRIC[t]] for m in seeds]))
             for t, seeds in per_seed.items() if t in PAPER_TASK_METRIC and seeds}
    return (float(np.mean(list(tasks.values()))) if tasks else None), tasks
