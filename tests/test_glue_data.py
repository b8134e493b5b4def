"""GLUE readers: fixtures for MNLI/QNLI/QQP/RTE, the real files when ../shared/data/glue is present,
bad-input errors, tokenization and batching."""
import re
from pathlib import Path

import numpy as np
import pytest

from train import glue_data as gd

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
REAL = gd.find_data_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real GLUE data not found (set FASTBERT_DATA or put it at "
                                                     "../shared/data/glue beside the repo)")


def _vocab():
    d = REAL.parent / "vocab" / "bert-base-uncased-vocab.txt" if REAL is not None else None
    if d is None or not d.is_file():
        pytest.skip("bert-base-uncased-vocab.txt not found under ../shared/data/vocab")
    return d


# ---------------------------------------------------------------- fixtures in the real formats

def test_mnli_fixture():
    train, evals = gd.load_task("mnli", FIXTURES)
    assert len(train) == 8 and set(evals) == {"matched", "mismatched"}
    assert len(evals["matched"]) == 5 and len(evals["mismatched"]) == 5
    # Columns found by name in the 12-column train header and the 16-column dev header.
    assert train.text_a[1] == "The committee postponed the vote until next month."
    assert train.text_b[1] == "The vote happened yesterday."
    # Hub ids: entailment 0, neutral 1, contradiction 2 (gold_label, not label1..5).
    np.testing.assert_array_equal(train.labels[:3], [0, 2, 1])
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(evals["mismatched"].labels, train.labels[3:])


def test_qnli_fixture():
    train, evals = gd.load_task("qnli", FIXTURES)
    assert len(train) == 6 and len(evals["dev"]) == 6
    assert train.text_a[0].startswith("What color") and train.text_b[0].startswith("On a clear day")
    np.testing.assert_array_equal(train.labels, [0, 1, 0, 1, 0, 1])


def test_qqp_fixture_skips_and_counts_malformed_lines():
    train, evals = gd.load_task("qqp", FIXTURES)
    assert len(train) == 6 and train.skipped == 2  # one broken question = two malformed lines
    assert evals["dev"].skipped == 0 and len(evals["dev"]) == 6
    assert "word mean?" not in " ".join(train.text_a + train.text_b)
    np.testing.assert_array_equal(train.labels, [1, 0, 1, 0, 1, 0])


def test_rte_fixture():
    train, evals = gd.load_task("rte", FIXTURES)
    assert len(train) == 8 and len(evals["dev"]) == 4
    np.testing.assert_array_equal(train.labels[:3], [0, 1, 1])


# ---------------------------------------------------------------- the real files

# task -> (train rows, dev rows), from ../shared/data/README.md
REAL_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
              "rte": (2490, 277), "wnli": (635, 71)}


@needs_real
@pytest.mark.parametrize("task", sorted(REAL_SIZES))
def test_real_files(task):
    train, evals = gd.load_task(task, REAL)
    assert (len(train), len(evals["dev"])) == REAL_SIZES[task]
    spec = gd.TASKS[task]
    for split in (train, evals["dev"]):
        assert (split.text_b is None) == (len(spec.text_cols) == 1)
        assert all(isinstance(t, str) and t.strip() for t in split.text_a)
        if spec.is_regression:
            assert split.labels.dtype == np.float32 and 0 <= split.labels.min() and split.labels.max() <= 5
        else:
            assert set(np.unique(split.labels)) == set(range(spec.num_labels))
    if task == "mrpc":  # the BOM header was read by name; the quotes inside sentences stayed put
        assert train.text_a[0].startswith("Amrozi accused his brother")
        assert '"' in train.text_a[0]
    if task == "cola":
        assert train.text_a[0].startswith("Our friends won't buy this analysis")
    if task == "stsb":
        assert train.labels[0] == pytest.approx(5.0) and train.text_b[0] == "An air plane is taking off."


# ---------------------------------------------------------------- bad input

def _write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_missing_task_dir(tmp_path):
    with pytest.raises(gd.GlueDataError, match=r"RTE: task folder for rte not found"):
        gd.load_task("rte", tmp_path)


def test_missing_file(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(gd.GlueDataError, match=r"RTE/dev.tsv: file not found"):
        gd.load_task("rte", tmp_path)


_STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
_STSB_ROW = "0\tg\tf\ty\t0\tn\tn\ta\tb\t{}\n"

# A bad file's error names the file and, for a bad header or row, its line: (task, file text, the error
# after "<path>").
BAD_FILES = {
    "empty": ("sst2", "", r": empty file"),
    "header_only": ("sst2", "sentence\tlabel\n", r": no examples"),
    "wrong_columns": ("sst2", "text\tlabel\nhello\t1\n", r":1: header lacks column\(s\) \['sentence'\]"),
    "extra_column": ("sst2", "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
                     r":3: expected 2 tab-separated columns, found 3"),
    "missing_column_no_header": ("cola", "src\t1\t\tok\nsrc\t1\tonly three\n",  # CoLA has no header
                                 r":2: expected 4 tab-separated columns, found 3"),
    "rte_label": ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n",
                  r":3: label 'neutral' not in the rte label set"),
    "sst2_label": ("sst2", "sentence\tlabel\nfine\t2\n", r":2: label '2' not in the sst2 label set"),
    "stsb_score_not_number": ("stsb", _STSB_HEAD + _STSB_ROW.format("3.2") + _STSB_ROW.format("high"),
                              r":3: score 'high' is not a number"),
    "stsb_score_range": ("stsb", _STSB_HEAD + _STSB_ROW.format("7.5"), r":2: score 7.5 outside \[0, 5\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_error_names_file_and_line(tmp_path, case):
    task, text, error = BAD_FILES[case]
    p = _write(tmp_path / "train.tsv", text)
    with pytest.raises(gd.GlueDataError, match=re.escape(str(p)) + error):
        gd.read_split(gd.TASKS[task], p)


def test_bom_and_crlf(tmp_path):
    # A BOM before the first header name and Windows line ends must not break column lookup.
    p = _write(tmp_path / "m.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\tA b .\tC d .\r\n",
               encoding="utf-8-sig")
    s = gd.read_split(gd.TASKS["mrpc"], p)
    assert s.text_a == ["A b ."] and s.text_b == ["C d ."] and s.labels.tolist() == [1]


def test_parse_tasks():
    assert gd.parse_tasks("all") == list(gd.ALL_TASKS)
    assert gd.parse_tasks("RTE,SST-2,mnli") == ["mnli", "sst2", "rte"]  # MNLI first, for the RTE init
    assert gd.parse_tasks(["stsb", "sts-b"]) == ["stsb"]
    with pytest.raises(ValueError, match="--tasks: unknown task 'squad'"):
        gd.parse_tasks("sst2,squad")
    with pytest.raises(ValueError, match="no task"):
        gd.parse_tasks(" , ")


# ---------------------------------------------------------------- tokenization and batches

def test_encode_pairs_truncate_and_collate():
    tok = gd.load_tokenizer(_vocab(), lowercase=True, max_seq_len=16)
    train, _ = gd.load_task("rte", FIXTURES)
    enc = gd.encode(tok, train)
    ids, types = enc.input_ids[0], enc.token_type_ids[0]
    assert ids[0] == 101 and (ids == 102).sum() == 2 and ids[-1] == 102  # [CLS] a [SEP] b [SEP]
    sep = int(np.flatnonzero(ids == 102)[0])
    assert (types[:sep + 1] == 0).all() and (types[sep + 1:] == 1).all()
    assert max(len(x) for x in enc.input_ids) == 16  # truncated (the long pairs exceed 16 tokens)
    assert tok.decode(gd.encode(tok, gd.GlueSplit("sst2", "x", ["Hello World"], None, np.zeros(1, np.int64),
                                                  "x")).input_ids[0].tolist()) == "hello world"
    b = gd.collate(enc, [0, 3, 5])
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
    lengths = [len(enc.input_ids[i]) for i in (0, 3, 5)]
    assert b["input_ids"].shape == (3, max(lengths))
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    assert b["labels"].tolist() == train.labels[[0, 3, 5]].tolist()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        gd.load_tokenizer(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="max_seq_len"):
        gd.load_tokenizer(_vocab(), max_seq_len=2)


def test_hub_columns_and_splits(monkeypatch):
    """load_task_hub maps nyu-mll/glue's columns and split names (datasets.load_dataset faked: no network)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        row = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
        test = dict(row, label=[-1, -1])  # the hub's test splits are unlabelled
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(row),
                                     "validation_matched": datasets.Dataset.from_dict(row),
                                     "validation_mismatched": datasets.Dataset.from_dict(row),
                                     "test_matched": datasets.Dataset.from_dict(test)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, evals = gd.load_task_hub("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert train.text_a == ["p1", "p2"] and train.text_b == ["h1", "h2"] and train.labels.tolist() == [2, 0]
    assert set(evals) == {"matched", "mismatched"} and evals["matched"].source.endswith("[validation_matched]")

    def fake_unlabelled(name, config):
        d = datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]})
        return datasets.DatasetDict({"train": d, "validation": d})

    monkeypatch.setattr(datasets, "load_dataset", fake_unlabelled)
    with pytest.raises(gd.GlueDataError, match="labels outside 0..1"):
        gd.load_task_hub("sst2")
