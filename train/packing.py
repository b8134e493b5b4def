"""How documents become training sequences (``data.sequence_mode``), shared by the shard cache and the stream.

Three modes, one per paper:

``truncate`` (MosaicBERT: its text loader tokenizes each sample with truncation to ``max_seq_len``)
    one sequence per document: ``[CLS]`` + the document's first ``max_len - 2`` tokens + ``[SEP]``; the
    rest of the document is not used.
``document`` (ours, the default; BERT/24hBERT-style packing of whole sentences inside one document)
    consecutive sentences of a document fill ``[CLS] s1 s2 ... [SEP]`` of at most ``max_len`` tokens.
``concat`` (Cramming: every document followed by ``[SEP]``, all concatenated, cut into blocks)
    the token stream ``d1 [SEP] d2 [SEP] ...`` is cut into blocks of exactly ``max_len`` tokens, without
    ``[CLS]``; a block may span documents. The tail carries over to the next documents (Cramming drops it
    at every 1024-document map batch: a few tokens per thousand documents).
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

SEQUENCE_MODES = ("truncate", "document", "concat")
MIN_SEQ_TOKENS = 8           # document mode: shorter leftovers (a document's last few words) are dropped
# truncate mode tokenizes only a document's first max_len * this many characters (cut at a space, so the
# tokens are a prefix of the full document's); a cut text that yields too few tokens is tokenized whole.
CHARS_PER_TOKEN_BOUND = 16

# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or opening quote/bracket.
# Crude (abbreviations split), but only packing depends on it: sequences are runs of whole sentences.
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def check_mode(mode: str) -> str:
    if mode not in SEQUENCE_MODES:
        raise ValueError(f"data.sequence_mode: expected one of {SEQUENCE_MODES}, got {mode!r}")
    return mode


def split_sentences(doc: str) -> List[str]:
    out = []
    for para in doc.split("\n"):
        para = para.strip()
        if para:
            out.extend(s for s in _SENT_END.split(para) if s.strip())
    return out


def pack_document(sentences: List[List[int]], max_len: int, cls_id: int, sep_id: int) -> List[List[int]]:
    """Greedy packing of one document's tokenized sentences into ``[CLS] s1 s2 ... [SEP]`` of at most
    ``max_len`` tokens; a sentence that does not fit in an empty sequence is cut into pieces."""
    room = max_len - 2
    seqs: List[List[int]] = []
    cur: List[int] = []
    for sent in sentences:
        if cur and len(cur) + len(sent) > room:
            seqs.append(cur)
            cur = []
        cur = cur + sent
        while len(cur) > room:
            seqs.append(cur[:room])
            cur = cur[room:]
    if cur:
        seqs.append(cur)
    return [[cls_id] + s + [sep_id] for s in seqs if len(s) + 2 >= MIN_SEQ_TOKENS]


def _head_text(doc: str, n_chars: int) -> str:
    if len(doc) <= n_chars:
        return doc
    cut = doc.rfind(" ", 0, n_chars)
    return doc[:cut] if cut > 0 else doc[:n_chars]


def truncate_documents(tok, docs: Sequence[str], max_len: int) -> List[List[int]]:
    """``truncate`` mode: ``[CLS] first max_len-2 tokens [SEP]`` of every non-empty document."""
    room = max_len - 2
    limit = max_len * CHARS_PER_TOKEN_BOUND
    heads = [_head_text(d, limit) for d in docs]
    ids = tok.encode_batch(heads) if heads else []
    short = [i for i, (d, h, x) in enumerate(zip(docs, heads, ids)) if len(h) < len(d) and len(x) < room]
    if short:  # a cut text with too few tokens (very long "words"): tokenize those documents whole
        for i, x in zip(short, tok.encode_batch([docs[i] for i in short])):
            ids[i] = x
    return [[tok.cls_id] + x[:room] + [tok.sep_id] for x in ids if x]


def document_sequences(tok, docs: Sequence[str], max_len: int) -> List[List[int]]:
    """``document`` mode: whole sentences of one document packed per sequence (:func:`pack_document`)."""
    per_doc = [split_sentences(d) for d in docs]
    flat = [s for sents in per_doc for s in sents]
    ids = tok.encode_batch(flat) if flat else []
    seqs: List[List[int]] = []
    i = 0
    for sents in per_doc:
        seqs.extend(pack_document(ids[i:i + len(sents)], max_len, tok.cls_id, tok.sep_id))
        i += len(sents)
    return seqs


def concat_streams(tok, docs: Sequence[str]) -> List[List[int]]:
    """``concat`` mode, first half: each document's tokens followed by ``[SEP]`` (what :class:`ConcatPacker`
    cuts into blocks)."""
    return [x + [tok.sep_id] for x in (tok.encode_batch(list(docs)) if docs else []) if x]


def docs_to_sequences(tok, docs: Sequence[str], mode: str, max_len: int) -> List[List[int]]:
    """Token lists of ``docs`` in ``mode``: finished sequences (truncate, document) or per-document streams
    (concat; feed them to a :class:`ConcatPacker`)."""
    if mode == "truncate":
        return truncate_documents(tok, docs, max_len)
    if mode == "document":
        return document_sequences(tok, docs, max_len)
    return concat_streams(tok, docs)


def to_arrays(seqs: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens uint16 [n_tokens], lengths int64 [n_seqs]) of a list of sequences."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.uint16, count=int(lengths.sum()))
    return tokens, lengths


class ConcatPacker:
    """Cuts a token stream into blocks of exactly ``max_len`` tokens, carrying the tail between calls.

    ``feed(tokens)`` (uint16 [n]) -> blocks ``[k, max_len]`` uint16; ``carry`` holds the tokens not yet in
    a block (a list of ints, saved in checkpoints so a resumed stream continues the same blocks)."""

    def __init__(self, max_len: int, carry: Sequence[int] = ()):
        self.max_len = max_len
        self.carry = np.asarray(carry, dtype=np.uint16)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.carry, np.asarray(tokens, dtype=np.uint16)])
        n = len(buf) // self.max_len * self.max_len
        self.carry = buf[n:].copy()
        return buf[:n].reshape(-1, self.max_len)

    def state(self) -> Dict:
        return {"carry": self.carry.tolist()}
