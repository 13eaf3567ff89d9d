import math

import numpy as np
import pytest

from perceptclip.core.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    json_ready,
    macro_f1,
    plcc,
    regression_metrics,
    srcc,
    undefined,
)


def test_correlations_of_known_pairs():
    x = np.arange(10.0)
    assert srcc(x, x ** 3) == pytest.approx(1.0)          # monotone, not linear
    assert plcc(x, x ** 3) < 0.95
    assert plcc(x, 2 * x + 7) == pytest.approx(1.0)
    assert srcc(x, -x) == pytest.approx(-1.0)
    # a hand-checked small case: ranks (1,2,3,4) vs (2,1,4,3): 1 - 6*4/(4*15) = 0.6
    assert srcc([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)


def test_degenerate_inputs_give_nan_not_an_exception():
    assert math.isnan(srcc([1, 1, 1], [1, 2, 3]))
    assert math.isnan(plcc([1.0], [2.0]))
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        srcc([1, 2, 3], [1, 2])


def test_regression_metrics_with_bootstrap_intervals():
    rng = np.random.default_rng(0)
    target = rng.normal(size=300)
    pred = target + rng.normal(scale=0.7, size=300)
    m = regression_metrics(pred, target, resamples=300)
    assert m["n"] == 300
    assert m["mse"] == pytest.approx(np.mean((pred - target) ** 2))
    for name in ("srcc", "plcc"):
        low, high = m[f"{name}_ci"]
        assert low < m[name] < high
        assert 0.02 < high - low < 0.3
    # the interval is reproducible for a seed and narrows with more data
    assert bootstrap_ci(pred, target, srcc, 300, seed=1) == bootstrap_ci(pred, target, srcc, 300, seed=1)
    low, high = bootstrap_ci(pred[:40], target[:40], srcc, 300)
    assert high - low > m["srcc_ci"][1] - m["srcc_ci"][0]


def test_confusion_matrix_rows_are_true_classes():
    c = confusion_matrix(pred=[0, 1, 1, 2], target=[0, 0, 1, 2], classes=3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([3], [0], classes=3)


def test_macro_f1_matches_hand_computation():
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 0 -> 2/3; class 2: 1; class 3 absent
    c = confusion_matrix(pred=[0, 1, 1, 2], target=[0, 0, 1, 2], classes=4)
    assert macro_f1(c) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_classification_metrics_from_logits():
    logits = np.array([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [5.0, 0, 0]])
    m = classification_metrics(logits, [0, 1, 2, 2], labels=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m["labels"] == ["a", "b", "c"] and m["n"] == 4


def test_why_a_metric_cannot_be_computed_names_the_labels_or_the_predictions():
    assert undefined([0.1, 0.2], [1.0, 2.0], classification=False) is None
    assert undefined([], [], classification=False) == ("labels", "no usable sample")
    assert undefined([0.3], [1.0], classification=False) == ("labels", "1 usable sample; a correlation needs 2 or more")
    assert undefined([0.1, 0.2, 0.3], [2, 2, 2], classification=False) == ("labels", "all 3 usable labels are equal (2)")
    assert undefined([0.5, 0.5], [1, 2], classification=False) == ("predictions", "all 2 predictions are equal (0.5)")
    assert undefined(np.zeros((0, 8)), [], classification=True) == ("labels", "no usable sample")
    assert undefined(np.zeros((1, 8)), [3], classification=True) is None


def test_json_ready_writes_what_cannot_be_computed_as_null():
    import json

    metrics = regression_metrics([0.1, 0.9], [1.0, 2.0], resamples=10)
    assert math.isnan(metrics["srcc_ci"][0])
    text = json.dumps(json_ready({**metrics, "n": np.int64(2), "inf": float("inf")}), allow_nan=False)
    assert json.loads(text)["srcc_ci"] == [None, None] and json.loads(text)["inf"] is None
