"""Pretraining data: sentence packing, the uint16 shard cache (reuse, corruption), masking, batch plan."""
import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from train import data as D
from train.tokenizer import WordPiece

WORDS = ("the cat dog bird sat ran on a mat tree house river quickly slowly green red small large "
         "electricity mountain philosophy government university").split()


def make_docs(n_docs, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))).capitalize() + "."
                     for _ in range(rng.randint(2, 8))]
            paras.append(" ".join(sents))
        docs.append("\n".join(paras))
    return docs


@pytest.fixture(scope="module")
def tok():
    return WordPiece.train(make_docs(50, seed=1), vocab_size=200)


@pytest.fixture()
def corpus(tmp_path):
    docs = make_docs(60)
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "title": f"t{i}", "text": d}) + "\n")
    return str(path), docs


def test_pack_document():
    sents = [[5] * 3, [6] * 4, [7] * 10, [8] * 2, [9] * 30]
    seqs = D.pack_document(sents, max_len=16, cls_id=1, sep_id=2)
    for s in seqs:
        assert s[0] == 1 and s[-1] == 2 and len(s) <= 16
    # consecutive sentences fill a sequence; the 30-token sentence is cut into pieces of 14
    assert seqs[0] == [1] + [5] * 3 + [6] * 4 + [2]
    assert seqs[1] == [1] + [7] * 10 + [8] * 2 + [2]
    assert [len(s) for s in seqs[2:]] == [16, 16]  # 14 + 14; the 2-token tail is below MIN_SEQ_TOKENS
    body = [t for s in seqs for t in s[1:-1]]
    assert body == [t for s in sents for t in s][:len(body)]  # order kept, nothing invented


def test_split_sentences():
    assert D.split_sentences("One two. Three four! Five?\nSix seven.") == [
        "One two.", "Three four!", "Five?", "Six seven."]


def test_cache_build_reuse_and_content(tmp_path, corpus, tok):
    path, docs = corpus
    logs = []
    src = D.resolve_source(path)
    ds = D.build_or_load(src, tok, 32, str(tmp_path / "cache"), num_workers=2, log=logs.append)
    assert "tokenizing" in logs[0]
    assert len(ds) > 60 and ds.n_tokens == sum(len(ds[i]) for i in range(len(ds)))
    for i in range(len(ds)):
        s = ds[i]
        assert s.dtype == np.uint16 and s[0] == tok.cls_id and s[-1] == tok.sep_id and len(s) <= 32
    # Content: the sequences of document 0 are its tokens in order.
    first = tok.encode_batch([docs[0].replace("\n", " ")])[0]
    assert list(ds[0][1:-1]) == first[:len(ds[0]) - 2]
    # Reuse: a second call opens the same files without tokenizing.
    shard = os.path.join(ds.cache_dir, ds.meta["shards"][0]["file"])
    mtime = os.stat(shard).st_mtime_ns
    logs.clear()
    ds2 = D.build_or_load(src, tok, 32, str(tmp_path / "cache"), num_workers=2, log=logs.append)
    assert "reusing" in logs[0] and ds2.cache_dir == ds.cache_dir and os.stat(shard).st_mtime_ns == mtime
    # Serial tokenization builds the same content; another max_len is another cache.
    ser = D.build_or_load(src, tok, 32, str(tmp_path / "cache_serial"), num_workers=1, log=logs.append)
    assert len(ser) == len(ds) and all(np.array_equal(ser[i], ds[i]) for i in range(len(ds)))
    other = D.build_or_load(src, tok, 48, str(tmp_path / "cache"), num_workers=1, log=logs.append)
    assert other.cache_dir != ds.cache_dir
    # Changing the data file (size/mtime) changes the key.
    with gzip.open(path, "at") as f:
        f.write(json.dumps({"text": "Extra document here. With two sentences of text in it."}) + "\n")
    assert D.cache_key(D.resolve_source(path), tok.fingerprint, 32, 0, "text") != os.path.basename(
        ds.cache_dir)[len("tokens-"):]


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_corrupt_shard_is_an_error_naming_the_file(tmp_path, corpus, tok, damage):
    path, _ = corpus
    ds = D.build_or_load(D.resolve_source(path), tok, 32, str(tmp_path / "c"), num_workers=1, log=lambda *_: 0)
    shard = os.path.join(ds.cache_dir, ds.meta["shards"][0]["file"])
    del ds
    raw = bytearray(open(shard, "rb").read())
    if damage == "flip":
        raw[-7] ^= 0x40  # one bit of one token
    elif damage == "truncate":
        raw = raw[:-10]
    else:
        raw[:8] = b"NOTASHRD"
    with open(shard, "wb") as f:
        f.write(raw)
    with pytest.raises(D.ShardError, match=shard.replace(".", r"\.")):
        D.build_or_load(D.resolve_source(path), tok, 32, str(tmp_path / "c"), num_workers=1, log=lambda *_: 0)


def test_txt_and_directory_sources(tmp_path, tok):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("First doc line one.\nLine two here.\n\nSecond document is this one.\n")
    (d / "valid.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    (d / "notes.md").write_text("ignored")
    src = D.resolve_source(str(d), exclude=[str(d / "valid.jsonl")])
    assert [os.path.basename(f) for f in src.files] == ["a.txt"]
    assert list(D.iter_documents(src)) == ["First doc line one.\nLine two here.", "Second document is this one."]
    assert list(D.iter_documents(src, max_documents=1)) == ["First doc line one.\nLine two here."]
    with pytest.raises(FileNotFoundError, match="--data"):
        D.resolve_source(str(tmp_path / "missing.jsonl"))
    assert D.resolve_source("wikitext").kind == "hub"
    (d / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        list(D.iter_documents(D.Source("files", (str(d / "bad.jsonl"),))))


def test_masking_statistics():
    torch.manual_seed(0)
    V, special = 1000, [0, 100, 101, 102, 103]
    ids = torch.randint(0, V, (256, 128))
    ids[:, 0], ids[:, 60] = 101, 102
    ids[:, 100:] = 0  # padding
    ids[torch.rand(ids.shape) < 0.02] = 100  # some [UNK]
    is_special = torch.isin(ids, torch.tensor(special))
    inputs, labels = D.mask_tokens(ids, special, V, 103, 0.3, torch.Generator().manual_seed(1))
    sel = labels != -100
    assert not (sel & is_special).any(), "a special token or pad was selected"
    assert torch.equal(labels[sel], ids[sel])
    assert torch.equal(inputs[~sel], ids[~sel])
    n_normal, n_sel = int((~is_special).sum()), int(sel.sum())
    assert abs(n_sel / n_normal - 0.3) < 0.01
    masked = (inputs == 103) & sel
    kept = (inputs == ids) & sel
    rand = sel & ~masked & ~kept
    assert abs(int(masked.sum()) / n_sel - 0.8) < 0.01
    assert abs(int(kept.sum()) / n_sel - 0.1) < 0.01 + 0.001  # (a random draw can equal the original)
    assert abs(int(rand.sum()) / n_sel - 0.1) < 0.01
    assert not torch.isin(inputs[rand], torch.tensor(special)).any(), "random replacement drew a special id"
    assert int(inputs[rand].max()) < V
    # Another probability, same generator seed -> same statistics rule (15%).
    _, labels15 = D.mask_tokens(ids, special, V, 103, 0.15, torch.Generator().manual_seed(2))
    assert abs(int((labels15 != -100).sum()) / n_normal - 0.15) < 0.01


def test_batch_plan_ranks_do_not_overlap():
    n, G = 50, 12
    plans = [D.BatchPlan(n, G, micro_batch=3, rank=r, world=2, seed=3) for r in range(2)]
    single = D.BatchPlan(n, G, micro_batch=3, seed=3)
    assert plans[0].accum_steps == 2 and single.accum_steps == 4
    seen = []
    for step in range(10):
        a, b = plans[0].indices(step), plans[1].indices(step)
        assert not set(a) & set(b)
        assert np.array_equal(np.concatenate([a, b]), single.indices(step))
        seen.extend(a)
        seen.extend(b)
    # positions 0..119 cover epochs 0, 1 (complete) and part of 2: each sequence exactly twice in the first 100
    assert sorted(seen[:100]) == sorted(list(range(n)) * 2)
    with pytest.raises(ValueError, match="world size"):
        D.BatchPlan(n, 10, 2, rank=0, world=3)


def test_tokenizer_save_and_reload(tmp_path, tok):
    tok.save(str(tmp_path))
    vocab = (tmp_path / "vocab.txt").read_text().splitlines()
    assert len(vocab) == tok.vocab_size and vocab[tok.mask_id] == "[MASK]" and vocab[tok.pad_id] == "[PAD]"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["do_lower_case"] is True
    text = ["The small cat sat on the mountain.", "Electricity philosophy!"]
    for reloaded in (WordPiece.from_vocab(str(tmp_path)), WordPiece.from_vocab(str(tmp_path / "vocab.txt"))):
        assert reloaded.encode_batch(text) == tok.encode_batch(text)
        assert reloaded.special_ids == tok.special_ids
    assert WordPiece.from_vocab(str(tmp_path / "vocab.txt")).fingerprint == tok.fingerprint
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        WordPiece.from_vocab(str(tmp_path / "nope.txt"))
