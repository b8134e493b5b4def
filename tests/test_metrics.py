"""train.metrics against scikit-learn / scipy on random data, ties and degenerate cases."""
import math

import numpy as np
import pytest

from train import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the oracle for these tests")
stats = pytest.importorskip("scipy.stats", reason="scipy is the oracle for these tests")


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("n", [1, 7, 101, 1000])
@pytest.mark.parametrize("k", [2, 3])
def test_classification_metrics_match_sklearn(n, k):
    rng = np.random.default_rng(1000 * n + k)
    y = rng.integers(0, k, n)
    # Correlated predictions, so that the metrics are not all near zero.
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    assert M.accuracy(p, y) == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    assert M.matthews_corr(p, y) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)
    if k == 2:
        ref = sklearn_metrics.f1_score(y, p, zero_division=0.0)
        assert M.f1_binary(p, y) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("case", ["all_same_pred", "all_same_label", "perfect", "inverted", "no_positives"])
def test_classification_degenerate(case):
    y = np.array([0, 1, 1, 0, 1, 0, 0])
    p = {"all_same_pred": np.ones_like(y), "all_same_label": y, "perfect": y,
         "inverted": 1 - y, "no_positives": np.zeros_like(y)}[case]
    if case == "all_same_label":
        y = np.zeros_like(y)
    assert M.matthews_corr(p, y) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)
    assert M.f1_binary(p, y) == pytest.approx(sklearn_metrics.f1_score(y, p, zero_division=0.0), abs=1e-12)
    if case == "perfect":
        assert M.matthews_corr(p, y) == 1.0
    if case == "inverted":
        assert M.matthews_corr(p, y) == pytest.approx(-1.0)


@pytest.mark.parametrize("n", [5, 9, 500])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(n, ties):
    rng = np.random.default_rng(n + 17 * ties)
    y = rng.normal(size=n)
    p = y + rng.normal(scale=1.0, size=n)
    if ties:
        # STS-B gold scores come in steps of 0.2, and predictions can collide too.
        y = np.round(y * 2) / 2
        p = np.round(p)
    if np.ptp(y) == 0 or np.ptp(p) == 0:
        raise AssertionError("constant draw: pick another seed")
    assert M.pearson(p, y) == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-10)
    assert M.spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0], abs=1e-10)


def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, 200).astype(np.float64)
    np.testing.assert_array_equal(M.rankdata_average(x), stats.rankdata(x, method="average"))
    np.testing.assert_array_equal(M.rankdata_average([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_correlations_degenerate():
    y = np.array([0.0, 1.0, 2.5, 5.0])
    assert M.pearson(np.full(4, 2.0), y) == 0.0  # constant prediction: no NaN in the table
    assert M.spearman(np.full(4, 2.0), y) == 0.0
    assert M.pearson(y, y) == 1.0
    assert M.spearman(-y, y) == pytest.approx(-1.0)
    assert not math.isnan(M.pearson(np.zeros(3), np.zeros(3)))


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="accuracy: preds has 3 items but labels has 2"):
        M.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        M.pearson([], [])
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        M.task_metrics("squad", [0], [0])


def test_task_and_glue_score():
    m = M.task_metrics("mrpc", [1, 1, 0, 0], [1, 0, 0, 0])
    assert set(m) == {"f1", "accuracy"}
    assert M.task_score(m) == pytest.approx((2 / 3 + 0.75) / 2)
    score, missing = M.glue_score({"sst2": 0.9, "rte": 0.6, "wnli": 0.1})
    assert score == pytest.approx(0.75)  # WNLI is left out of the average
    assert missing == ["cola", "mrpc", "stsb", "qqp", "mnli", "qnli"]
    assert M.glue_score({"wnli": 0.5}) == (None, list(M.GLUE_TASKS))
