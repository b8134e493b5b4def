"""Where each optimizer step's training sequences come from, in order, from a position a checkpoint resumes.

Two readers with one interface (``take(global_n)`` -> this rank's ``global_n / world`` sequences as uint16
arrays; ``state()`` / ``load_state()``; ``progress()`` for the metrics; ``describe()``):

:class:`ShardReader`
    the tokenized shard cache of ``train/data.py``: a seeded permutation of all sequences per pass.
:class:`StreamReader`
    documents streamed through ``datasets`` (``load_dataset(..., streaming=True)``): C4 from the hub as the
    MosaicBERT paper trained (``allenai/c4``, ``en``), or local JSON Lines through the very same code (the
    tests). A background thread reads ``chunk_documents`` documents at a time, tokenizes them on the fly
    (``data.sequence_mode``, ``train/packing.py``) and shuffles the chunk's sequences with a seed of
    (seed, rank, pass, chunk). Under DDP each rank streams its own part (``split_dataset_by_node``: whole
    files when their number divides by the world size, as C4's 1024 do). The position saved in a checkpoint
    is the ``datasets`` state at the start of the current chunk, the concat carry-over, and how many of the
    chunk's sequences were used: a resumed run re-reads that chunk and continues with the same sequences.

Both count passes over their data and print a loud warning, once, when a second pass starts: a paper
recipe that repeats its data is not that recipe any more.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .data import BatchPlan, Source, TokenDataset, load_hub_dataset
from .packing import ConcatPacker, check_mode, docs_to_sequences

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def pass_warning(what: str, size: str, at: str) -> str:
    bar = "!" * 100
    return (f"{bar}\n!! WARNING: starting pass 2 over the training data ({what}, {size}) {at}.\n"
            "!! From here on every sequence is one the model has already seen (masked anew). The paper recipes "
            "train on less than one pass:\n!! give more data (data.streaming=true with allenai/c4) or a smaller "
            "budget. This warning is printed once; metrics.jsonl counts the passes.\n" + bar)


class ShardReader:
    """Sequences of a :class:`~train.data.TokenDataset` in the order of ``plan`` (a seeded permutation per
    pass; rank ``r`` takes its slice of each global batch). Position = global sequences consumed."""

    kind = "shards"

    def __init__(self, ds: TokenDataset, plan: BatchPlan, log: Callable[[str], None] = print):
        self.ds, self.plan, self.log = ds, plan, log
        self.position = 0
        self._warned = False

    def take(self, global_n: int) -> List[np.ndarray]:
        idx = self.plan.indices_at(self.position, global_n)
        self.position += global_n
        if not self._warned and (self.position - 1) // len(self.ds) >= 1:
            self._warned = True
            self.log(pass_warning("cached shards", f"{len(self.ds):,} sequences, {self.ds.n_tokens:,} tokens",
                                  f"after {self.position - global_n:,} sequences"))
        return [self.ds[int(i)] for i in idx]

    def state(self) -> Dict[str, Any]:
        return {"kind": self.kind, "position": self.position}

    def load_state(self, state: Dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.position = int(state["position"])

    def progress(self) -> Dict[str, Any]:
        n = len(self.ds)
        return {"data_pass": self.position // n + 1, "passes": self.position / n}

    def describe(self) -> str:
        return f"{len(self.ds):,} sequences ({self.ds.n_tokens:,} tokens), cached shards"

    def close(self) -> None:
        pass


def _check_kind(state: Dict[str, Any], kind: str) -> None:
    got = state.get("kind", "shards")
    if got != kind:
        raise ValueError(f"resume: the checkpoint's data position is for a {got!r} reader, this run reads "
                         f"{kind!r} (data.streaming changed?)")


def open_document_stream(source: Source, text_field: str = "text", max_documents: int = 0, rank: int = 0,
                         world: int = 1, arg: str = "data.train"):
    """A ``datasets.IterableDataset`` of ``{text_field: str}`` rows: local JSON Lines files through the
    ``json`` builder, or a hub dataset (``source.name``, ``source.config``, ``source.split``); the first
    ``max_documents`` only (0 = all); this rank's part when ``world > 1``. Offline, a hub name raises
    :class:`~train.data.HubUnavailableError`."""
    if source.kind == "files":
        bad = [f for f in source.files if not f.endswith(JSON_SUFFIXES)]
        if bad:
            raise ValueError(f"{arg}: data.streaming reads JSON Lines files ({'/'.join(JSON_SUFFIXES)}); "
                             f"got {bad[:3]}")
        import datasets
        ds = datasets.load_dataset("json", data_files=list(source.files), split="train", streaming=True)
    else:
        ds = load_hub_dataset(arg, source.name, source.config or None, split=source.split, streaming=True)
    if max_documents:
        ds = ds.take(max_documents)
    if ds.column_names is not None and text_field not in ds.column_names:
        raise ValueError(f"{arg}: the data has no column {text_field!r} (data.text_field); columns: "
                         f"{ds.column_names}")
    ds = ds.select_columns([text_field]) if ds.column_names is not None else ds
    if world > 1:
        from datasets.distributed import split_dataset_by_node
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    return ds


@dataclass
class _Chunk:
    seqs: List[np.ndarray]
    start: Dict[str, Any]            # the reader state at this chunk's first sequence
    n_docs: int = 0                  # documents the chunk was made of
    pass_docs: Optional[int] = None  # documents in one pass (this rank), once known


_END = object()
_STATE_KEYS = ("pass", "chunk", "ds_state", "carry", "docs", "seqs", "offset")


def _known_size(ds) -> Optional[int]:
    """Documents in the split, when the dataset's metadata says (hub datasets with split sizes)."""
    splits = getattr(getattr(ds, "info", None), "splits", None)
    try:
        return int(next(iter(splits.values())).num_examples) if splits else None
    except (AttributeError, StopIteration, TypeError, ValueError):
        return None


class StreamReader:
    """Sequences of a document stream (see the module docstring). ``open_fn()`` returns the
    ``datasets.IterableDataset`` of this rank (:func:`open_document_stream`); ``tok`` a
    :class:`~train.tokenizer.WordPiece`. ``prefetch`` chunks are prepared ahead by a background thread
    (0: prepared on demand in the caller's thread). ``pass_docs``: documents per pass on this rank when
    known in advance (else learnt when the first pass ends), for the ``passes`` metric."""

    kind = "stream"

    def __init__(self, open_fn: Callable[[], Any], tok, sequence_mode: str, max_len: int, seed: int,
                 rank: int = 0, world: int = 1, chunk_documents: int = 4096, text_field: str = "text",
                 log: Callable[[str], None] = print, name: str = "stream", prefetch: int = 2,
                 pass_docs: Optional[int] = None):
        self.open_fn, self.tok, self.mode = open_fn, tok, check_mode(sequence_mode)
        self.max_len, self.seed, self.rank, self.world = max_len, seed, rank, world
        self.chunk_documents, self.text_field, self.log, self.name = chunk_documents, text_field, log, name
        self.prefetch = prefetch
        self._start: Dict[str, Any] = {"pass": 0, "chunk": 0, "ds_state": None, "carry": [], "docs": 0, "seqs": 0,
                                       "offset": 0}
        self._cur: Optional[_Chunk] = None
        self._off = 0
        self._pass_docs = pass_docs
        self._warned = False
        self._producer = None

    # -- producing chunks -----------------------------------------------------------------------
    def _chunks(self, start: Dict[str, Any], stop: threading.Event):
        """Chunks from ``start`` on, pass after pass, for ever."""
        p, c, docs, seqs = start["pass"], start["chunk"], start["docs"], start["seqs"]
        ds = self._open(p, start["ds_state"])
        pass_docs = self._pass_docs
        packer = ConcatPacker(self.max_len, start["carry"])
        it = iter(ds)
        while not stop.is_set():
            st = {"pass": p, "chunk": c, "ds_state": ds.state_dict(), "carry": packer.carry.tolist(),
                  "docs": docs, "seqs": seqs}
            batch = []
            for row in it:
                batch.append(row[self.text_field])
                if len(batch) == self.chunk_documents:
                    break
            if not batch:  # this pass is over: the next one starts again from the beginning of the data
                if seqs == 0:
                    raise ValueError(f"{self.name}: a whole pass over the data produced no training sequence "
                                     "(empty data, or every document too short?)")
                pass_docs = pass_docs or docs
                p, c, docs, seqs = p + 1, 0, 0, 0
                ds = self._open(p, None)
                it = iter(ds)
                continue
            toks = docs_to_sequences(self.tok, batch, self.mode, self.max_len)
            if self.mode == "concat":
                arrs = list(packer.feed(np.fromiter((t for s in toks for t in s), dtype=np.uint16)))
            else:
                arrs = [np.asarray(s, dtype=np.uint16) for s in toks]
            order = np.random.default_rng([self.seed, self.rank, p, c]).permutation(len(arrs))
            c, docs, seqs = c + 1, docs + len(batch), seqs + len(arrs)
            if arrs:
                yield _Chunk([arrs[i] for i in order], st, len(batch), pass_docs)

    def _open(self, pass_index: int, ds_state):
        ds = self.open_fn()
        if self._pass_docs is None and _known_size(ds):
            self._pass_docs = -(-_known_size(ds) // self.world)
        ds.set_epoch(pass_index)
        if ds_state is not None:
            ds.load_state_dict(ds_state)
        return ds

    def _start_producer(self) -> None:
        stop = threading.Event()
        gen = self._chunks(self._start, stop)
        if self.prefetch <= 0:
            self._producer = (gen, None, stop)
            return
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)

        def run():
            try:
                for chunk in gen:
                    while not stop.is_set():
                        try:
                            q.put(chunk, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer and raised there
                q.put(e)
            q.put(_END)

        t = threading.Thread(target=run, name=f"fastbert-{self.name}-rank{self.rank}", daemon=True)
        t.start()
        self._producer = (q, t, stop)

    def _next_chunk(self) -> _Chunk:
        if self._producer is None:
            self._start_producer()
        src, thread, _ = self._producer
        item = next(src, _END) if thread is None else src.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise RuntimeError(f"{self.name}: the stream stopped")
        return item

    # -- the reader interface -------------------------------------------------------------------
    def take(self, global_n: int) -> List[np.ndarray]:
        n = global_n // self.world
        out: List[np.ndarray] = []
        while len(out) < n:
            if self._cur is None or self._off == len(self._cur.seqs):
                self._cur, self._off = self._next_chunk(), 0
                self._pass_docs = self._pass_docs or self._cur.pass_docs
                if self._start["offset"]:  # resuming inside this chunk
                    self._off, self._start = self._start["offset"], {**self._start, "offset": 0}
                if self._cur.start["pass"] >= 1 and not self._warned:
                    self._warned = True
                    size = f"{self._pass_docs:,} documents on this rank" if self._pass_docs else "size unknown"
                    self.log(pass_warning(f"stream {self.name}", size, f"at stream chunk {self._cur.start['chunk']}"))
            k = min(n - len(out), len(self._cur.seqs) - self._off)
            out.extend(self._cur.seqs[self._off:self._off + k])
            self._off += k
        return out

    def state(self) -> Dict[str, Any]:
        st = self._start if self._cur is None else {**self._cur.start, "offset": self._off}
        return {"kind": self.kind, **st, "pass_docs": self._pass_docs}

    def load_state(self, state: Dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        if self._producer is not None:
            raise RuntimeError("load_state: call it before the first take()")
        self._start = {k: state[k] for k in _STATE_KEYS}
        self._pass_docs = self._pass_docs or state.get("pass_docs")

    def progress(self) -> Dict[str, Any]:
        """``data_pass`` (1-based), ``documents_read`` in this pass on this rank (the current chunk's
        documents counted by the share of its sequences used) and ``passes`` (float; None while the size of
        a pass is unknown: C4 does not say it in a stream)."""
        st = self._cur.start if self._cur is not None else self._start
        docs = float(st["docs"])
        if self._cur is not None and self._cur.seqs:
            docs += self._cur.n_docs * self._off / len(self._cur.seqs)
        passes = st["pass"] + docs / self._pass_docs if self._pass_docs else None
        return {"data_pass": st["pass"] + 1, "documents_read": round(docs), "passes": passes}

    def describe(self) -> str:
        return f"{self.name} (streamed, tokenized on the fly, sequence_mode={self.mode})"

    def close(self) -> None:
        if self._producer is not None:
            self._producer[2].set()
