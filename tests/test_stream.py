"""Sequence modes (truncate / document / concat), the training-sequence readers (shard cache and
``datasets`` streaming of a local JSON Lines stand-in for C4, through the same code as the hub), resumable
positions, the one-time pass warning, and the hub's offline error. No network."""
import gzip
import json

import numpy as np
import pytest

from train import data as D
from train.packing import ConcatPacker, docs_to_sequences, truncate_documents
from train.stream import ShardReader, StreamReader, open_document_stream
from train.tokenizer import WordPiece

from tests.test_data import make_docs


@pytest.fixture(scope="module")
def tok():
    return WordPiece.train(make_docs(50, seed=1), vocab_size=200)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    docs = make_docs(30, seed=4)
    path = tmp_path_factory.mktemp("stream") / "c4-standin.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"url": f"u{i}", "text": d}) + "\n")
    return str(path), docs


# ----------------------------------------------------------------------------------------------
# sequence modes

def test_truncate_mode_is_the_documents_first_tokens(tok):
    docs = ["alpha beta " * 200, "", "the cat sat", "x" * 3000 + " tail"]
    seqs = truncate_documents(tok, docs, 16)
    full = tok.encode_batch([d for d in docs if d])
    assert len(seqs) == 3  # the empty document makes no sequence
    for s, f in zip(seqs, full):
        assert s[0] == tok.cls_id and s[-1] == tok.sep_id and len(s) == min(16, len(f) + 2)
        assert s[1:-1] == f[:14]  # a prefix of the whole document's tokens (the text cut does not show)


def test_concat_mode_blocks_span_documents_with_separators(tok):
    docs = make_docs(6, seed=2)
    streams = docs_to_sequences(tok, docs, "concat", 32)
    assert all(s[-1] == tok.sep_id for s in streams)
    flat = [t for s in streams for t in s]
    packer = ConcatPacker(32)
    a = packer.feed(np.array(flat[:50], dtype=np.uint16))
    b = packer.feed(np.array(flat[50:], dtype=np.uint16))
    blocks = np.concatenate([a, b])
    assert blocks.shape[1] == 32 and blocks.shape[0] == len(flat) // 32
    assert blocks.reshape(-1).tolist() == flat[:blocks.size]  # the stream in order, no [CLS], tail carried
    assert packer.carry.tolist() == flat[blocks.size:]


@pytest.mark.parametrize("mode", ["truncate", "document", "concat"])
def test_shard_cache_per_mode(tok, docs_file, tmp_path, mode):
    path, docs = docs_file
    ds = D.build_or_load(D.resolve_source(path), tok, 24, str(tmp_path), num_workers=2, log=lambda *_: 0,
                         sequence_mode=mode, shard_tokens=300)
    seqs = [ds[i].tolist() for i in range(len(ds))]
    assert ds.meta["sequence_mode"] == mode
    if mode == "truncate":
        assert len(seqs) == len(docs) and all(s[0] == tok.cls_id and len(s) == 24 for s in seqs)
    elif mode == "concat":
        assert all(len(s) == 24 for s in seqs) and tok.cls_id not in {t for s in seqs for t in s}
        flat = [t for s in docs_to_sequences(tok, docs, "concat", 24) for t in s]
        assert [t for s in seqs for t in s] == flat[:24 * len(seqs)]  # across worker chunks, in order
    else:
        assert len(seqs) > len(docs) and all(s[0] == tok.cls_id and s[-1] == tok.sep_id for s in seqs)


# ----------------------------------------------------------------------------------------------
# readers

def test_shard_reader_warns_once_on_the_second_pass(tok, docs_file, tmp_path):
    ds = D.build_or_load(D.resolve_source(docs_file[0]), tok, 24, str(tmp_path), num_workers=1,
                         log=lambda *_: 0, sequence_mode="truncate")
    logs = []
    reader = ShardReader(ds, D.BatchPlan(len(ds), 8, 4, seed=1), logs.append)
    seen = [s.tolist() for _ in range(3) for s in reader.take(8)]  # 24 of 30: still the first pass
    assert not logs and reader.progress() == {"data_pass": 1, "passes": 24 / 30}
    assert sorted(map(tuple, seen)) == sorted({tuple(s) for s in seen})  # no repeats inside a pass
    reader.take(8)
    reader.take(8)
    assert len(logs) == 1 and "WARNING: starting pass 2" in logs[0] and reader.progress()["data_pass"] == 2
    again = ShardReader(ds, D.BatchPlan(len(ds), 8, 4, seed=1), logs.append)
    again.load_state(reader.state())
    assert [s.tolist() for s in again.take(8)] == [s.tolist() for s in reader.take(8)]


def _reader(path, tok, mode, logs, prefetch=2, rank=0, world=1, chunk=7):
    src = D.resolve_source(path)
    return StreamReader(lambda: open_document_stream(src, rank=rank, world=world), tok, mode, 24, seed=5,
                        rank=rank, world=world, chunk_documents=chunk, log=logs.append, prefetch=prefetch)


@pytest.mark.parametrize("mode", ["truncate", "concat"])
def test_stream_resumes_exactly_and_warns_on_the_second_pass(tok, docs_file, mode):
    path, docs = docs_file
    per_pass = len(docs) if mode == "truncate" else sum(map(len, docs_to_sequences(tok, docs, mode, 24))) // 24
    steps = per_pass // 8 + 2  # into the second pass
    logs = []
    full = _reader(path, tok, mode, logs)
    whole = [s.tolist() for _ in range(steps) for s in full.take(8)]
    full.close()
    assert len(logs) == 1 and "WARNING: starting pass 2" in logs[0]
    if mode == "truncate":  # one sequence per document: the first pass is every document exactly once
        first = whole[:30]
        assert sorted(map(tuple, first)) == sorted(map(tuple, truncate_documents(tok, docs, 24)))
        assert full.progress()["passes"] == pytest.approx(steps * 8 / 30) and full.progress()["data_pass"] == 2
    # stop half-way (inside a chunk of 7 documents), resume in a new reader (no prefetch thread this time)
    h = steps // 2 + 1
    part = _reader(path, tok, mode, [])
    head = [s.tolist() for _ in range(h) for s in part.take(8)]
    assert part.state()["offset"] not in (0, len(part._cur.seqs))
    state = json.loads(json.dumps(part.state()))  # what a checkpoint keeps survives serialisation
    part.close()
    rest = _reader(path, tok, mode, [], prefetch=0)
    rest.load_state(state)
    tail = [s.tolist() for _ in range(steps - h) for s in rest.take(8)]
    assert head + tail == whole


def test_stream_ranks_read_disjoint_documents(tok, docs_file):
    path, docs = docs_file
    per_rank = []
    for rank in range(2):
        r = _reader(path, tok, "truncate", [], rank=rank, world=2, chunk=4)
        per_rank.append({tuple(s.tolist()) for s in r.take(2 * 15)})  # take(global) gives global / world each
        r.close()
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(map(tuple, truncate_documents(tok, docs, 24)))


def test_stream_errors(tok, docs_file, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no column 'body'"):
        open_document_stream(D.resolve_source(docs_file[0]), text_field="body")
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n")
    with pytest.raises(ValueError, match="JSON Lines"):
        open_document_stream(D.resolve_source(str(txt)))
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.HubUnavailableError, match=r"data.train: cannot open the hub dataset 'allenai/c4'.*offline"):
        open_document_stream(D.resolve_source("allenai/c4", hub_config="en"))
