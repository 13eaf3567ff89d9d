"""Evaluation metrics over a whole set of predictions: never averaged over batches or workers.

Regression (iqa, memorability): SRCC and PLCC from scipy, MSE, and percentile bootstrap intervals
for the two correlations. Classification (emotion): accuracy, macro-F1 and the confusion matrix
(rows are true classes, columns predicted classes).

A metric that cannot be computed is NaN here; ``undefined`` says why (and whether the labels or the
predictions are to blame), and ``json_ready`` turns NaN into null for the JSON a command writes.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"{pred.size} predictions for {target.size} labels")
    return pred, target


def srcc(pred, target) -> float:
    """Spearman's rank correlation; NaN when either side is constant or there are fewer than 2 samples."""
    pred, target = _pair(pred, target)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float("nan")
    return float(stats.spearmanr(pred, target).statistic)


def plcc(pred, target) -> float:
    """Pearson's linear correlation; NaN when either side is constant or there are fewer than 2 samples."""
    pred, target = _pair(pred, target)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float("nan")
    return float(stats.pearsonr(pred, target).statistic)


def mse(pred, target) -> float:
    pred, target = _pair(pred, target)
    return float(np.mean((pred - target) ** 2)) if pred.size else float("nan")


def bootstrap_ci(pred, target, statistic, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(pred, target)``, resampling (pred, target) pairs."""
    pred, target = _pair(pred, target)
    if pred.size < 3:
        return float("nan"), float("nan")
    res = stats.bootstrap((pred, target), statistic, paired=True, vectorized=False, n_resamples=resamples,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def regression_metrics(pred, target, resamples: int = 0, seed: int = 0) -> dict:
    """``srcc``, ``plcc``, ``mse`` and ``n``; with ``resamples`` > 0 also ``srcc_ci`` and ``plcc_ci`` (95%)."""
    pred, target = _pair(pred, target)
    out = {"srcc": srcc(pred, target), "plcc": plcc(pred, target), "mse": mse(pred, target), "n": int(pred.size)}
    if resamples:
        out["srcc_ci"] = list(bootstrap_ci(pred, target, srcc, resamples, seed=seed))
        out["plcc_ci"] = list(bootstrap_ci(pred, target, plcc, resamples, seed=seed))
    return out


def confusion_matrix(pred, target, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    target = np.asarray(target, dtype=np.int64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"{pred.size} predictions for {target.size} labels")
    if pred.size and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= classes):
        raise ValueError(f"class indices must lie in [0, {classes})")
    return np.bincount(target * classes + pred, minlength=classes * classes).reshape(classes, classes)


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur (as a label or a prediction); absent classes are left out,
    as scikit-learn does with ``labels`` set to the classes present."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp[present] / (predicted[present] + actual[present])
    return float(f1.mean())


def classification_metrics(pred, target, labels: list[str] | tuple[str, ...]) -> dict:
    """``pred``: class indices (N,) or logits (N, K). Returns accuracy, macro_f1, confusion, labels, n."""
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred.argmax(1)
    confusion = confusion_matrix(pred, target, len(labels))
    n = int(confusion.sum())
    return {
        "accuracy": float(np.trace(confusion) / n) if n else float("nan"),
        "macro_f1": macro_f1(confusion),
        "confusion": confusion.tolist(),
        "labels": list(labels),
        "n": n,
    }


def undefined(pred, target, classification: bool) -> tuple[str, str] | None:
    """Why the task's primary metric (accuracy, or SRCC for a score) cannot be computed over these
    pairs, and whose doing that is: ``("labels", why)`` when the usable labels are too few or all equal,
    ``("predictions", why)`` when the predictions are all equal. None when it can be computed."""
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if target.size == 0:
        return "labels", "no usable sample"
    if classification:
        return None
    if target.size < 2:
        return "labels", "1 usable sample; a correlation needs 2 or more"
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    for side, values, what in (("labels", target, "usable labels"), ("predictions", pred, "predictions")):
        if np.ptp(values) == 0:
            return side, f"all {values.size} {what} are equal ({values[0]:g})"
    return None


def json_ready(obj):
    """Metrics as JSON can hold them: a value that could not be computed (NaN, infinite) becomes null,
    NumPy numbers become Python's. ``json.dumps`` would otherwise write ``NaN``, which is not JSON."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj
