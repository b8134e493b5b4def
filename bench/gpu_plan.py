"""The plan of ``python -m bench.gpu_run``: the phase table, the benchmark groups in priority order, the
budget arithmetic and the limits on what comes back from a lent GPU. Pure Python (no torch), so the
plan can be printed, tested and extended anywhere.

Budget rule (one rule, used for the phases and again for the benchmark groups inside a phase): every
entry has a ``reserve_s`` (the share it is guaranteed) and a ``cap_s`` (the most it may take). An entry
that starts at ``now`` must end by

    min(now + cap_s, end - sum(reserve_s of the entries after it that can still run))

so an overrunning phase is stopped in time to leave each later phase its share, and time a phase does
not use (or a skipped phase's reserve) flows to the later ones. ``check_plan`` refuses a table whose
reserves do not fit the budget.

A *background* phase (the extension build) runs behind the phases it names in ``alongside`` (the Triton
tests: no timing is disturbed by its compiler processes) and is waited for before any other phase; the
reserves of the phases alongside it are not taken out of its window.

Extending: add a ``Phase`` row (and its runner in ``bench.gpu_run.RUNNERS``), or a ``BenchGroup`` row.
A group selects pytest-benchmark tests of ``bench/`` by test function, provider, pass and shape; shape
filters (``shape_ids``, ``shape_params``) are dropped in smoke mode (no GPU), where every group has one
tiny shape, so the dry run still checks that every group matches real tests.
"""
from __future__ import annotations

import fnmatch
import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

INF = math.inf


@dataclass(frozen=True)
class Phase:
    name: str
    reserve_s: float
    cap_s: float
    needs: Tuple[str, ...] = ()     # "gpu", "ext" (fastbert._C built and importable), "compute-sanitizer", "ncu"
    background: bool = False        # runs behind the phases named in ``alongside``; joined before any other
    alongside: Tuple[str, ...] = ()
    about: str = ""


# Priority order = execution order. Typical H200 times (estimates, none measured yet) in the comments.
PHASES: Tuple[Phase, ...] = (
    Phase("env", 10, 45, about="GPU, clocks, driver, versions, API check; copy GB/s and bf16 matmul TFLOP/s"),
    # ~60 s: bindings.cpp (torch headers) is the long pole; flash_attn.cu takes ~7 CPU-s for one arch.
    Phase("build", 60, 200, needs=("gpu",), background=True, alongside=("correct-triton",),
          about="fastbert._C for this GPU's arch only (setup.py build_ext --inplace), timed, first error kept"),
    Phase("correct-triton", 30, 150, needs=("gpu",),
          about="tests/test_triton_*.py on the GPU (every Triton kernel vs the reference, gpu-marked BERT shapes)"),
    Phase("correct-cuda", 20, 90, needs=("gpu", "ext"),
          about="every other gpu-marked test (CUDA kernels at BERT shapes, bf16/fp16, fwd+bwd; the model)"),
    Phase("memcheck", 20, 75, needs=("gpu", "ext", "compute-sanitizer"),
          about="compute-sanitizer memcheck over bench.sanitize_driver (one small call of every CUDA kernel)"),
    Phase("racecheck", 20, 75, needs=("gpu", "ext", "compute-sanitizer"),
          about="compute-sanitizer racecheck over the same driver"),
    Phase("bench-core", 120, 330, needs=("gpu",), about="the benchmark groups of CORE_GROUPS, in that order"),
    Phase("ncu", 15, 50, needs=("gpu", "ncu"),
          about="ncu registers / occupancy of every kernel at BERT shapes vs the compile report's prediction"),
    Phase("bench-rest", 0, INF, needs=("gpu",), about="the rest of the benchmark suite, with the time left"),
    Phase("sanitize-more", 0, 90, needs=("gpu", "ext", "compute-sanitizer"),
          about="initcheck and synccheck over the driver, then memcheck of the Triton kernels, if time is left"),
    Phase("results", 15, 40, about="gpu_run.json, summary.md, speedup.png, logs.txt (always runs)"),
)


# ---------------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------------
def reserve_after(entries: Sequence, i: int, gone: frozenset = frozenset()) -> float:
    """Seconds the entries after index ``i`` are guaranteed, on the timeline: a background entry and the
    entries alongside it overlap, so together they hold ``max(its reserve, theirs summed)``; entries
    alongside ``entries[i]`` itself (when it is the background one) are not after it in time. ``gone``:
    names skipped or finished."""
    total = 0.0
    for j in range(i + 1, len(entries)):
        e = entries[j]
        if e.name in gone or (i >= 0 and e.name in getattr(entries[i], "alongside", ())):
            continue
        if any(e.name in getattr(entries[k], "alongside", ()) for k in range(i + 1, j)):
            continue  # counted in its background entry's block
        if getattr(e, "background", False):
            along = sum(a.reserve_s for a in entries[j + 1:] if a.name in e.alongside and a.name not in gone)
            total += max(e.reserve_s, along)
        else:
            total += e.reserve_s
    return total


def check_plan(entries: Sequence, total_s: float) -> List[str]:
    """Problems with a table (empty: it fits). Every entry needs ``reserve_s <= cap_s`` and the reserves,
    laid out on the timeline (``reserve_after``), must fit in ``total_s``."""
    probs = []
    for e in entries:
        if e.reserve_s < 0 or e.reserve_s > e.cap_s:
            probs.append(f"{e.name}: reserve {e.reserve_s}s must be in [0, cap {e.cap_s}s]")
    need = reserve_after(entries, -1)
    if need > total_s:
        probs.append(f"the reserves need {need:.0f}s on the timeline, more than the budget of {total_s:.0f}s")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        probs.append(f"duplicate names in {names}")
    return probs


class Budget:
    """Deadlines for a sequence of entries sharing ``[start, start + total_s]``. ``clock`` is injectable
    (tests use a fake one); gpu_run uses ``time.time`` so that subprocesses see the same deadlines."""

    def __init__(self, entries: Sequence, total_s: float, clock: Callable[[], float], start: Optional[float] = None):
        self.entries = list(entries)
        self.clock = clock
        self.start = clock() if start is None else start
        self.end = self.start + total_s
        # A window smaller than the reserves (a late start, a short --budget-s) shrinks every reserve
        # by the same factor, so the first entries still get their share.
        need = reserve_after(self.entries, -1)
        self.scale = min(1.0, total_s / need) if need > 0 else 1.0
        self.skipped: set = set()
        self.done: set = set()

    def _index(self, name: str) -> int:
        for i, e in enumerate(self.entries):
            if e.name == name:
                return i
        raise KeyError(name)

    def deadline(self, name: str, now: Optional[float] = None) -> float:
        """When entry ``name``, starting at ``now``, must end."""
        i = self._index(name)
        now = self.clock() if now is None else now
        later = self.scale * reserve_after(self.entries, i, frozenset(self.skipped | self.done))
        return max(now, min(now + self.entries[i].cap_s, self.end - later))

    def skip(self, name: str) -> None:
        self.skipped.add(name)

    def finish(self, name: str) -> None:
        self.done.add(name)

    def left(self, now: Optional[float] = None) -> float:
        return self.end - (self.clock() if now is None else now)


def timeline(entries: Sequence, total_s: float) -> List[dict]:
    """The worst case, for the printed plan: each entry uses its whole window, in order (a background
    entry's window opens with the entries alongside it; the next entry after those waits for its end)."""
    b = Budget(entries, total_s, lambda: 0.0, start=0.0)
    rows, now, bg = [], 0.0, []   # bg: (end, alongside) of background entries still running
    for e in entries:
        now = max([now] + [end for end, along in bg if e.name not in along])
        bg = [(end, along) for end, along in bg if e.name in along]
        end = b.deadline(e.name, now)
        rows.append({"name": e.name, "start_s": now, "end_s": end, "reserve_s": e.reserve_s,
                     "cap_s": e.cap_s, "background": getattr(e, "background", False)})
        if getattr(e, "background", False):
            bg.append((end, getattr(e, "alongside", ())))
        else:
            now = end
        b.finish(e.name)
    return rows


def plan_markdown(entries: Sequence, total_s: float) -> str:
    lines = [f"Budget {total_s:.0f}s. Worst case (every phase uses its whole window):", "",
             "| phase | reserve s | cap s | window (worst case) | what |", "|---|---|---|---|---|"]
    for r, e in zip(timeline(entries, total_s), entries):
        cap = "rest" if e.cap_s == INF else f"{e.cap_s:.0f}"
        bg = " (background)" if r["background"] else ""
        lines.append(f"| {e.name}{bg} | {e.reserve_s:.0f} | {cap} | {r['start_s']:.0f}-{r['end_s']:.0f} | "
                     f"{getattr(e, 'about', '')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# benchmark groups
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchGroup:
    """pytest items of ``tests`` (``file::function``) whose ``provider`` param is in ``providers`` and
    ``pass_`` in ``passes`` (empty: any), whose other params match ``params``, and (GPU only) whose id
    contains, for every tuple of ``shape_ids``, one of its strings and whose ``shape_params`` match.
    Items run case by case (same inputs, every provider) so a group cut short still has ratios."""
    name: str
    tests: Tuple[str, ...]
    providers: Tuple[str, ...] = ()
    passes: Tuple[str, ...] = ()
    params: Dict[str, tuple] = field(default_factory=dict)
    shape_ids: Tuple[Tuple[str, ...], ...] = ()
    shape_params: Dict[str, tuple] = field(default_factory=dict)
    reserve_s: float = 0.0
    cap_s: float = INF
    exclude_tests: Tuple[str, ...] = ()


ATT = "bench/test_bench_attention.py::test_attention"
LN, GEGLU, GELU = ("bench/test_bench_ops.py::" + f for f in ("test_layer_norm", "test_geglu", "test_bias_gelu"))
PAD, MLM = "bench/test_bench_ops.py::test_padding", "bench/test_bench_ops.py::test_mlm_loss"
TRAIN = "bench/test_bench_train.py::test_train_step"
OURS = ("fastbert-cuda", "fastbert-triton")
ATT_SHAPES = (("xS128(", "xS512("), ("xH12x",))   # BERT-base heads, seq 128 and 512, lengths spread in [S/4, S]
H768 = {"hidden": (768,)}
FWD_BWD = ("fwdbwd", "fwd")
COMPILED = ("compile", "dense-compile", "flex-alibi")  # providers that compile a graph first (tens of seconds)

CORE_GROUPS: Tuple[BenchGroup, ...] = (
    BenchGroup("attention", (ATT,), OURS + ("sdpa-flash-nobias", "sdpa-alibi-bias"), FWD_BWD,
               shape_ids=ATT_SHAPES, reserve_s=30, cap_s=60),
    BenchGroup("attention-flex", (ATT,), ("flex-alibi",), FWD_BWD, shape_ids=ATT_SHAPES, reserve_s=15, cap_s=75),
    BenchGroup("layer_norm+residual", (LN,), OURS + ("eager",), FWD_BWD, params={"residual": (True,)},
               shape_params=H768, reserve_s=8, cap_s=20),
    BenchGroup("geglu", (GEGLU,), OURS + ("eager",), FWD_BWD, shape_params=H768, reserve_s=8, cap_s=20),
    BenchGroup("bias_gelu", (GELU,), OURS + ("eager",), FWD_BWD, shape_params=H768, reserve_s=8, cap_s=20),
    BenchGroup("unpad-pad", (PAD,), OURS + ("reference",), FWD_BWD, shape_params=H768, reserve_s=8, cap_s=20),
    BenchGroup("mlm_loss", (MLM,), OURS + ("dense",), ("fwdbwd",), shape_params=H768, reserve_s=8, cap_s=25),
    BenchGroup("train_step", (TRAIN,), ("fastbert-auto",) + OURS + ("hf-bert-sdpa",), reserve_s=15, cap_s=45),
    BenchGroup("compiled-peers", (LN, GEGLU, GELU, PAD, MLM), ("compile", "dense-compile"), ("fwdbwd",),
               params={"residual": (True,)}, shape_params=H768, reserve_s=0, cap_s=120),
)
# Everything else in bench/, new benchmark files included (the calibration tests excluded: the env phase
# measures the same thing).
REST_GROUPS: Tuple[BenchGroup, ...] = (
    BenchGroup("rest", ("bench/test_bench_*.py",), exclude_tests=("bench/test_bench_calibration.py",)),
)
BENCH_PHASE_GROUPS = {"bench-core": CORE_GROUPS, "bench-rest": REST_GROUPS}
# Providers not executed in a dry run: seconds of CPU each (the Triton interpreter, eager FlexAttention,
# a Hugging Face model, the reference attention backward), and tests/test_bench_smoke.py already runs
# every one of them. The dry run checks the selection, the order, the deadlines and the records.
DRY_SKIP_PROVIDERS = ("fastbert-triton", "fastbert-auto", "flex-alibi", "hf-bert-sdpa", "fastbert-torch")


def _match_any(value, allowed: tuple) -> bool:
    return not allowed or value in allowed


def group_of(nodeid: str, params: Dict[str, object], groups: Sequence[BenchGroup], smoke: bool) -> Optional[int]:
    """Index of the first group that selects this pytest item, or None."""
    for gi, g in enumerate(groups):
        if _test_index(g, nodeid) == len(g.tests):
            continue
        if not _match_any(params.get("provider"), g.providers) or not _match_any(params.get("pass_"), g.passes):
            continue
        if any(k in params and params[k] not in v for k, v in g.params.items()):
            continue
        if not smoke:
            if any(k in params and params[k] not in v for k, v in g.shape_params.items()):
                continue
            if any(not any(s in nodeid for s in alts) for alts in g.shape_ids):
                continue
        return gi
    return None


def case_key(nodeid: str, params: Dict[str, object]) -> str:
    """The inputs an item runs on: its test function and params without the provider (the items of one
    case share inputs)."""
    return nodeid.split("[", 1)[0] + repr(sorted((k, repr(v)) for k, v in params.items() if k != "provider"))


def _test_index(group: BenchGroup, nodeid: str) -> int:
    """Index of the first entry of ``group.tests`` (``file``, ``file::function``, shell patterns allowed)
    naming this item; ``len(group.tests)`` if none does."""
    path, _, rest = nodeid.partition("::")
    names = (path, f"{path}::{rest.split('[', 1)[0]}")
    if any(fnmatch.fnmatch(n, x) for x in group.exclude_tests for n in names):
        return len(group.tests)
    return next((i for i, t in enumerate(group.tests) if any(fnmatch.fnmatch(n, t) for n in names)), len(group.tests))


def group_files(groups: Sequence[BenchGroup], root: str) -> List[str]:
    """The test files the groups name (patterns expanded under ``root``), for pytest's command line."""
    out = set()
    for g in groups:
        for t in g.tests:
            pat = t.split("::")[0]
            out.update(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pat)))
    excl = {e.split("::")[0] for g in groups for e in g.exclude_tests if "::" not in e}
    return sorted(f for f in out if f not in excl)


def order_key(group: BenchGroup, nodeid: str, case_index: int, params: Dict[str, object]) -> tuple:
    """Run order inside a group: its tests in the order listed, then case by case, then the providers
    in the order listed (so a group cut short still has every provider of its first cases)."""
    prov = params.get("provider")
    pi = group.providers.index(prov) if prov in group.providers else len(group.providers)
    return (_test_index(group, nodeid), case_index, pi)


def skip_reason(now: float, phase_end: float, group_end: Optional[Tuple[str, float]], est_s: float,
                dry_skip: bool) -> Optional[str]:
    """Why a test must not start now (None: start it): the phase's time is up; a dry run does not
    execute this provider; its group's window has closed; or it needs more time than the phase has left.
    A group may overrun its own window by one test, never the phase."""
    if now >= phase_end:
        return "gpu_run: the phase's time is up"
    if dry_skip:
        return "gpu_run dry run: provider not executed (tests/test_bench_smoke.py runs it)"
    if group_end is not None and now >= group_end[1]:
        return f"gpu_run: group {group_end[0]}'s time is up"
    if now + est_s > phase_end:
        return f"gpu_run: {est_s:.0f}s needed, {phase_end - now:.0f}s left in the phase"
    return None


def est_seconds(params: Dict[str, object], nodeid: str) -> float:
    """Rough cost of one benchmark on an H100/H200, to avoid starting one that cannot finish in time."""
    if params.get("provider") in COMPILED:
        return 30.0
    return 8.0 if "test_train_step" in nodeid else 2.0


# ---------------------------------------------------------------------------------------------------
# what comes back from the device machine
# ---------------------------------------------------------------------------------------------------
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_DEPTH = 2                       # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
OUT_FILES = {"json": "gpu_run.json", "summary": "summary.md", "chart": "speedup.png", "logs": "logs.txt",
             "ncu": "ncu.csv"}
LOG_BUDGET_BYTES = 12 * 2**20       # logs.txt stays well inside one file's limit


def check_out_dir(out_dir: str) -> List[str]:
    """Everything in ``out_dir`` that would not come back from the device machine (empty: all fine)."""
    probs, files, total = [], 0, 0
    for root, dirs, names in os.walk(out_dir):
        rel = os.path.relpath(root, out_dir)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for d in dirs:
            if not NAME_RE.match(d):
                probs.append(f"folder name {os.path.join(rel, d)!r} has characters other than letters, digits, . _ -")
        for n in names:
            p = os.path.join(root, n)
            shown = os.path.normpath(os.path.join(rel, n))
            if os.path.islink(p) or not os.path.isfile(p):
                probs.append(f"{shown}: not a plain file")
                continue
            files += 1
            size = os.path.getsize(p)
            total += size
            if depth > MAX_DEPTH:
                probs.append(f"{shown}: more than {MAX_DEPTH} folders deep")
            if not NAME_RE.match(n):
                probs.append(f"{shown}: name has characters other than letters, digits, . _ -")
            if size > MAX_FILE_BYTES:
                probs.append(f"{shown}: {size} bytes, over {MAX_FILE_BYTES}")
    if files > MAX_FILES:
        probs.append(f"{files} files, more than {MAX_FILES}")
    if total > MAX_TOTAL_BYTES:
        probs.append(f"{total} bytes in all, over {MAX_TOTAL_BYTES}")
    return probs


def clip_text(text: str, max_bytes: int, what: str = "text") -> str:
    """``text`` cut to about ``max_bytes`` UTF-8 bytes, keeping its head and its tail (errors are usually
    at the start of a log, the summary at its end) with a line saying how much was left out."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    keep = max(max_bytes - 200, 0)
    head, tail = raw[: keep // 3], raw[len(raw) - (keep - keep // 3):]
    cut = len(raw) - len(head) - len(tail)
    return (head.decode("utf-8", "ignore") + f"\n[... {cut} bytes of {what} left out ...]\n"
            + tail.decode("utf-8", "ignore"))
