"""Pretraining data: documents -> WordPiece sequences in cached uint16 shards -> masked batches.

Pipeline
1. ``resolve_source(spec)``: a file, a directory of ``.jsonl`` / ``.jsonl.gz`` / ``.txt`` (``.txt.gz``)
   files, or a Hugging Face hub dataset name (read through ``datasets``).
2. ``build_or_load(...)``: documents are tokenized in parallel worker processes and turned into sequences of
   at most ``max_len`` tokens as ``sequence_mode`` says (``train/packing.py``: ``truncate``, ``document``
   or ``concat``). Sequences go to uint16 shard files that are memory-mapped on load. The cache directory is
   named by a hash of (the data files' paths, sizes and mtimes, or the hub dataset's fingerprint; the
   tokenizer's vocabulary; ``max_len``; ``max_documents``; ``sequence_mode``; ``FORMAT_VERSION``), so a
   second run reuses it and any change rebuilds. (A hub corpus too large to tokenize up front, such as C4,
   is read by ``train/stream.py`` instead, with ``data.streaming=true``.)
3. ``BatchPlan`` (which sequences each rank reads at each step: a seeded permutation per epoch, rank
   slices without overlap, a pure function of the step so a resumed run reads exactly what it would have),
   ``collate`` (pad to the longest sequence) and ``mask_tokens`` (dynamic MLM masking, 80/10/10).

Shard file layout (little endian)::

    header, 64 bytes: magic b"FBTOKSH1", version u32, vocab_size u32, n_seqs u64, n_tokens u64,
                      crc32 of everything after the header u32, zero padding
    offsets: int64[n_seqs + 1]   (sequence i is tokens[offsets[i]:offsets[i+1]])
    tokens:  uint16[n_tokens]

On load the size must match the header (a truncated file is an error) and the CRC must match (a corrupted
one is an error); both errors name the file. The cache's ``manifest.json`` is written last, atomically:
without it the cache does not exist.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from .packing import (MIN_SEQ_TOKENS, ConcatPacker, check_mode, docs_to_sequences, pack_document,  # noqa: F401
                      split_sentences, to_arrays)

FORMAT_VERSION = 1
MAGIC = b"FBTOKSH1"
_HEADER = struct.Struct("<8sIIQQI")
HEADER_BYTES = 64
DOCS_PER_TASK = 64           # documents per tokenizer work item
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz")


class ShardError(RuntimeError):
    """A token shard that is truncated, corrupted, or not a shard at all."""


class HubUnavailableError(ConnectionError):
    """A Hugging Face hub dataset could not be opened: the machine is offline or the hub unreachable."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` switches the hub off."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub_dataset(arg: str, name: str, *args, **kwargs):
    """``datasets.load_dataset(name, *args, **kwargs)``; a connection failure becomes a
    :class:`HubUnavailableError` naming ``arg`` (the config key), the dataset, why, and what to do."""
    import datasets  # only for hub data
    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except ConnectionError as e:
        why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not cached"
               if hub_offline() else f"the Hugging Face hub is unreachable ({e})")
        raise HubUnavailableError(
            f"{arg}: cannot open the hub dataset {name!r}: {why}. Run once with network access (the stream "
            "needs it throughout for C4), or point it at local JSON Lines files.") from None


# ----------------------------------------------------------------------------------------------
# Sources

@dataclass
class Source:
    """Where documents come from: ``kind`` is ``"files"`` (``files`` set) or ``"hub"`` (``name`` set)."""
    kind: str
    files: Tuple[str, ...] = ()
    name: str = ""
    config: str = ""
    split: str = "train"

    def identity(self) -> Dict:
        """What the cache key depends on: file paths, sizes and mtimes, or the hub dataset's name."""
        if self.kind == "files":
            return {"files": [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
                              for p in self.files]}
        return {"hub": [self.name, self.config, self.split]}


def resolve_source(spec: str, exclude: Sequence[str] = (), hub_config: str = "", hub_split: str = "train",
                   arg: str = "--data") -> Source:
    """A file, a directory of data files (sorted; ``exclude`` paths skipped, e.g. the validation file),
    or a hub dataset name (anything that does not look like a local path)."""
    if not spec:
        raise ValueError(f"{arg}: no data given")
    if os.path.isfile(spec):
        return Source("files", (spec,))
    if os.path.isdir(spec):
        skip = {os.path.abspath(p) for p in exclude if p}
        files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if f.endswith(DATA_SUFFIXES) and os.path.abspath(os.path.join(spec, f)) not in skip)
        if not files:
            raise FileNotFoundError(f"{arg}: directory {spec!r} holds no {'/'.join(DATA_SUFFIXES)} files")
        return Source("files", tuple(files))
    looks_local = (spec.startswith((".", "/", "~")) or spec.endswith(DATA_SUFFIXES) or os.sep + os.sep in spec
                   or spec.count("/") > 1)
    if looks_local:
        raise FileNotFoundError(f"{arg}: no such file or directory {spec!r} (set FASTBERT_DATA to the data folder, "
                                "or pass a file, a folder or a Hugging Face hub dataset name)")
    return Source("hub", name=spec, config=hub_config, split=hub_split)


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(source: Source, text_field: str = "text", max_documents: int = 0) -> Iterator[str]:
    """Yield document texts (paragraphs separated by newlines). ``.txt``: documents are separated by
    blank lines. JSON Lines: one document a line, text in ``text_field``."""
    n = 0
    if source.kind == "hub":
        ds = load_hub_dataset("data.train (--data)", source.name, source.config or None, split=source.split,
                              streaming=True)
        for row in ds:
            if text_field not in row:
                raise KeyError(f"hub dataset {source.name!r}: no column {text_field!r} (data.text_field)")
            yield row[text_field]
            n += 1
            if max_documents and n >= max_documents:
                return
        return
    for path in source.files:
        with _open_text(path) as f:
            if ".txt" in os.path.basename(path):
                buf: List[str] = []
                for line in f:
                    line = line.strip()
                    if line:
                        buf.append(line)
                        continue
                    if buf:
                        yield "\n".join(buf)
                        buf = []
                        n += 1
                        if max_documents and n >= max_documents:
                            return
                if buf:
                    yield "\n".join(buf)
                    n += 1
            else:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object with a {text_field!r} field "
                                         f"({type(e).__name__}: {e})") from None
                    yield text
                    n += 1
                    if max_documents and n >= max_documents:
                        return
        if max_documents and n >= max_documents:
            return


# ----------------------------------------------------------------------------------------------
# Tokenizer workers (the sequence modes live in train/packing.py)

# Worker state (one tokenizer per process, built once by the pool initializer).
_W: Dict = {}


def _worker_init(tok_json: str, lowercase: bool, max_len: int, mode: str = "document") -> None:
    from .tokenizer import WordPiece
    _W["tok"] = WordPiece.from_str(tok_json, lowercase)
    _W["max_len"] = max_len
    _W["mode"] = mode


def _tokenize_docs(docs: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Documents -> (tokens uint16 [n_tokens], lengths int64 [n_seqs]): finished sequences, or per-document
    streams in concat mode (the parent cuts those into blocks, in order, across work items)."""
    return to_arrays(docs_to_sequences(_W["tok"], docs, _W["mode"], _W["max_len"]))


def _chunks(it: Iterable[str], n: int) -> Iterator[List[str]]:
    buf: List[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ----------------------------------------------------------------------------------------------
# Shards

def write_shard(path: str, tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> Dict:
    """Write one shard atomically (temp file + rename). ``tokens`` uint16, ``lengths`` int64."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    body_off = offsets.astype("<i8").tobytes()
    body_tok = tokens.astype("<u2").tobytes()
    crc = zlib.crc32(body_tok, zlib.crc32(body_off))
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, vocab_size, len(lengths), len(tokens), crc)
    header += b"\0" * (HEADER_BYTES - len(header))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body_off)
        f.write(body_tok)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": os.path.basename(path), "n_seqs": int(len(lengths)), "n_tokens": int(len(tokens)),
            "crc32": crc}


def open_shard(path: str, verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Memory-map a shard: (offsets int64 [n+1], tokens uint16 [T]). Raises :class:`ShardError` naming
    ``path`` when it is truncated, corrupted or not a shard."""
    if not os.path.isfile(path):
        raise ShardError(f"token shard {path} is missing")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"token shard {path} is truncated ({size} bytes, smaller than its header)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, _vocab, n_seqs, n_tokens, crc = _HEADER.unpack(bytes(mm[:_HEADER.size]))
    if magic != MAGIC:
        raise ShardError(f"token shard {path} is not a fastbert token shard (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ShardError(f"token shard {path} has format version {version}, expected {FORMAT_VERSION}")
    expected = HEADER_BYTES + 8 * (n_seqs + 1) + 2 * n_tokens
    if size != expected:
        raise ShardError(f"token shard {path} is truncated or has trailing bytes: {size} bytes, the header "
                         f"says {expected}; delete its cache directory to rebuild")
    if verify:
        got = zlib.crc32(memoryview(mm[HEADER_BYTES:]))
        if got != crc:
            raise ShardError(f"token shard {path} is corrupted: CRC32 {got:#010x} != {crc:#010x} in its "
                             "header; delete its cache directory to rebuild")
    offsets = np.frombuffer(mm, dtype="<i8", count=n_seqs + 1, offset=HEADER_BYTES)
    tokens = np.frombuffer(mm, dtype="<u2", count=n_tokens, offset=HEADER_BYTES + 8 * (n_seqs + 1))
    if offsets[0] != 0 or offsets[-1] != n_tokens or (n_seqs and np.any(np.diff(offsets) < 0)):
        raise ShardError(f"token shard {path} has an inconsistent index")
    return offsets, tokens


class TokenDataset:
    """The sequences of one tokenized cache directory (memory-mapped; cheap to open in every rank).

    ``ds[i]`` is a uint16 array of sequence ``i`` (``[CLS] ... [SEP]``); ``len(ds)`` sequences;
    ``n_tokens`` in total; ``meta`` is the manifest.
    """

    def __init__(self, cache_dir: str, verify: bool = True):
        man = os.path.join(cache_dir, "manifest.json")
        if not os.path.isfile(man):
            raise ShardError(f"{cache_dir} has no manifest.json (incomplete or not a token cache)")
        with open(man) as f:
            self.meta = json.load(f)
        self.cache_dir = cache_dir
        self._offsets, self._tokens, starts = [], [], [0]
        for sh in self.meta["shards"]:
            offs, toks = open_shard(os.path.join(cache_dir, sh["file"]), verify=verify)
            if len(offs) - 1 != sh["n_seqs"] or len(toks) != sh["n_tokens"]:
                raise ShardError(f"token shard {os.path.join(cache_dir, sh['file'])} does not match the "
                                 "manifest's sizes")
            self._offsets.append(offs)
            self._tokens.append(toks)
            starts.append(starts[-1] + sh["n_seqs"])
        self._starts = np.array(starts, dtype=np.int64)
        self.n_tokens = int(sum(len(t) for t in self._tokens))
        if len(self) == 0:
            raise ValueError(f"{cache_dir}: the data produced no sequences (documents too short or empty?)")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[s])
        offs = self._offsets[s]
        return self._tokens[s][offs[j]:offs[j + 1]]


def default_cache_root() -> str:
    from fastbert.paths import cache_dir
    return str(cache_dir())


def cache_key(source: Source, tokenizer_fingerprint: str, max_len: int, max_documents: int,
              text_field: str, sequence_mode: str = "document") -> str:
    blob = json.dumps({"source": source.identity(), "tokenizer": tokenizer_fingerprint, "max_len": max_len,
                       "max_documents": max_documents, "text_field": text_field, "mode": sequence_mode,
                       "version": FORMAT_VERSION, "min_seq": MIN_SEQ_TOKENS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_or_load(source: Source, tokenizer, max_len: int, cache_root: str = "", max_documents: int = 0,
                  text_field: str = "text", num_workers: int = 2, shard_tokens: int = 1 << 24,
                  log=print, sequence_mode: str = "document") -> TokenDataset:
    """Tokenize ``source`` into the cache (once) and return the memory-mapped dataset.

    Reuses ``<cache_root>/tokens-<key>`` when its manifest exists; otherwise builds it in a temporary
    directory and renames it into place, so a crash mid-build leaves no half cache behind.
    """
    cache_root = cache_root or default_cache_root()
    key = cache_key(source, tokenizer.fingerprint, max_len, max_documents, text_field, check_mode(sequence_mode))
    final = os.path.join(cache_root, f"tokens-{key}")
    if os.path.isfile(os.path.join(final, "manifest.json")):
        ds = TokenDataset(final)
        log(f"data: reusing tokenized cache {final} ({len(ds):,} sequences, {ds.n_tokens:,} tokens)")
        return ds
    what = ", ".join(source.files) if source.kind == "files" else f"hub:{source.name}"
    log(f"data: tokenizing {what} -> {final} (max_len={max_len}, sequence_mode={sequence_mode}, "
        f"{num_workers} worker(s))")
    os.makedirs(cache_root, exist_ok=True)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards: List[Dict] = []
    pend_t: List[np.ndarray] = []
    pend_l: List[np.ndarray] = []
    pend_n = 0
    n_docs = 0

    def flush():
        nonlocal pend_t, pend_l, pend_n
        if pend_l:
            path = os.path.join(tmp, f"shard-{len(shards):05d}.bin")
            shards.append(write_shard(path, np.concatenate(pend_t), np.concatenate(pend_l),
                                      tokenizer.vocab_size))
        pend_t, pend_l, pend_n = [], [], 0

    def counted(it):
        nonlocal n_docs
        for d in it:
            n_docs += 1
            yield d

    docs = _chunks(counted(iter_documents(source, text_field, max_documents)), DOCS_PER_TASK)
    init_args = (tokenizer.to_str(), tokenizer.lowercase, max_len, sequence_mode)
    packer = ConcatPacker(max_len) if sequence_mode == "concat" else None
    if num_workers > 1:
        import multiprocessing as mp
        # Workers tokenize; the Rust tokenizer's own thread pool would fight them for the cores (and
        # is unsafe across fork), so it is switched off for the children.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=init_args)
        results = pool.imap(_tokenize_docs, docs)  # ordered: the cache content is deterministic
    else:
        pool = None
        _worker_init(*init_args)
        results = map(_tokenize_docs, docs)
    try:
        for toks, lens in results:
            if packer is not None:  # blocks cut in document order, across work items
                blocks = packer.feed(toks)
                toks, lens = blocks.reshape(-1), np.full(len(blocks), max_len, dtype=np.int64)
            pend_t.append(toks)
            pend_l.append(lens)
            pend_n += len(toks)
            if pend_n >= shard_tokens:
                flush()
        flush()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-built cache left behind
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = {"version": FORMAT_VERSION, "key": key, "source": source.identity(), "max_len": max_len,
                "sequence_mode": sequence_mode,
                "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "n_documents": n_docs, "n_seqs": sum(s["n_seqs"] for s in shards),
                "n_tokens": sum(s["n_tokens"] for s in shards), "shards": shards}
    with open(os.path.join(tmp, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(tmp, "manifest.json.tmp"), os.path.join(tmp, "manifest.json"))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same cache first: theirs is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)
    ds = TokenDataset(final)
    log(f"data: {n_docs:,} documents -> {len(ds):,} sequences, {ds.n_tokens:,} tokens in "
        f"{len(shards)} shard(s)")
    return ds


# ----------------------------------------------------------------------------------------------
# Batches

class BatchPlan:
    """Which sequences rank ``rank`` of ``world`` reads at optimizer step ``step``.

    Global position ``p`` (``step * global_batch + k``) maps to sequence ``perm_e[p % N]`` of epoch
    ``e = p // N`` (a fresh seeded permutation per epoch). Rank ``r`` takes positions
    ``[r * B_r, (r+1) * B_r)`` of each step's global batch (``B_r = global_batch / world``), so ranks never
    overlap and a resumed run reads exactly what an uninterrupted one would.
    """

    def __init__(self, n_seqs: int, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if global_batch % world:
            raise ValueError(f"global_batch_size {global_batch} is not divisible by the world size {world}")
        per_rank = global_batch // world
        if per_rank % micro_batch and micro_batch < per_rank:
            raise ValueError(f"global_batch_size/world = {per_rank} is not a multiple of micro_batch_size "
                             f"{micro_batch}")
        self.n, self.global_batch, self.rank, self.world, self.seed = n_seqs, global_batch, rank, world, seed
        self.per_rank = per_rank
        self.micro_batch = min(micro_batch, per_rank)
        self.accum_steps = per_rank // self.micro_batch
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices [per_rank] of this rank at ``step``."""
        return self.indices_at(step * self.global_batch, self.global_batch)

    def indices_at(self, start: int, global_n: int) -> np.ndarray:
        """This rank's sequence indices ``[global_n / world]`` for the global positions ``[start, start +
        global_n)`` (a batch-size ramp changes ``global_n`` from step to step)."""
        per_rank = global_n // self.world
        first = start + self.rank * per_rank
        pos = np.arange(first, first + per_rank, dtype=np.int64)
        out = np.empty_like(pos)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            out[sel] = self._perm(int(e))[pos[sel] % self.n]
        return out

    def micro_batches(self, step: int) -> List[np.ndarray]:
        idx = self.indices(step)
        return [idx[i:i + self.micro_batch] for i in range(0, len(idx), self.micro_batch)]


def collate(seqs: Sequence[np.ndarray], pad_id: int, pad_to: int = 0):
    """Right-pad to the longest sequence (or to ``pad_to``): ``(input_ids [B,S] int64, attention_mask
    [B,S] int64)``."""
    import torch
    S = max(pad_to, max(len(s) for s in seqs))
    ids = np.full((len(seqs), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), S), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def mask_tokens(input_ids, special_ids: Sequence[int], vocab_size: int, mask_id: int, probability: float,
                generator=None):
    """Dynamic MLM masking (BERT's 80/10/10).

    Each non-special token is selected with ``probability``; of the selected, 80% become ``mask_id``, 10%
    a random non-special token, 10% stay. Special tokens (pads included) are never selected.

    Args: ``input_ids`` [B,S] int64. Returns ``(inputs [B,S] int64, labels [B,S] int64)``, labels the
    original id at selected positions and -100 elsewhere. ``input_ids`` is not modified.
    """
    import torch
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype)
    is_special = torch.isin(input_ids, special)
    u = torch.rand(input_ids.shape, generator=generator)
    selected = (u < probability) & ~is_special
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    # Random replacements come from the non-special ids: draw from [0, V - n_special) and skip over them.
    n_special = len(special_ids)
    rnd = torch.randint(0, vocab_size - n_special, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    for s in sorted(special_ids):
        rnd = rnd + (rnd >= s).to(rnd.dtype)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, rnd, inputs)
    return inputs, labels
