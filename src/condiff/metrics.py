"""Detection and segmentation metrics (numpy only), as the benchmark computes them.

reference-method.md §9: AUROC and AP on sample scores (scikit-learn ``roc_auc_score`` and
``average_precision_score``), pixel AP and the best Dice over *every* distinct threshold of
the pooled maps (``precision_recall_curve``; Dice = 2PR/(P+R), NaN ignored). The
implementations follow scikit-learn 1.3's formulas step for step, so they agree with it to
rounding (the tests check 1e-10 on data with ties) without importing it.

Two metrics beyond the benchmark (ecosystem B.5), for thresholds and lesions of every size:
Dice at a fixed pixel false-positive rate (``dice_at_fpr``; 5 % by default) and the area under
the per-region overlap curve up to 30 % FPR (``aupro``; Bergmann et al., MVTec AD), where every
connected lesion counts equally whatever its size. The caller labels the regions.

All inputs are flattened; labels must be binary (0/1 or bool), scores finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if y.dtype != bool:
        values = np.unique(y)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"labels must be binary (0/1), found values {values[:5].tolist()}")
        y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    return y, s


def binary_clf_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive counts at every distinct score, highest score first.

    Returns ``(fps, tps, thresholds)``: at threshold k everything with score >= thresholds[k]
    is called positive (scikit-learn's ``_binary_clf_curve``).
    """
    y, s = _check(labels, scores)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s))
    ends = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[ends]
    fps = 1.0 + ends - tps
    return fps, tps, s[ends]


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (trapezoids, ties as diagonal steps); NaN without both classes."""
    fps, tps, _ = binary_clf_curve(labels, scores)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def precision_recall(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``precision_recall_curve``: (precision, recall, thresholds), recall decreasing,
    with the final (precision 1, recall 0) point that has no threshold."""
    fps, tps, thr = binary_clf_curve(labels, scores)
    ps = tps + fps
    precision = np.zeros_like(tps)
    np.divide(tps, ps, out=precision, where=ps != 0)
    recall = np.ones_like(tps) if tps.size == 0 or tps[-1] == 0 else tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def average_precision(labels, scores) -> float:
    """Step-wise AP, -sum_k (R_{k+1} - R_k) P_k (= scikit-learn); NaN without positives."""
    y, s = _check(labels, scores)
    return ap_from_counts(*binary_clf_curve(y, s)[:2])


def ap_from_counts(fps: np.ndarray, tps: np.ndarray) -> float:
    """``average_precision`` from ``binary_clf_curve``'s counts (highest threshold first). The
    ``*_from_counts`` functions also take weighted counts (``engine.bootstrap``): a run of weight 0
    repeats the previous point and changes nothing."""
    if tps.size == 0 or tps[-1] == 0:
        return float("nan")
    called = tps + fps
    precision = np.divide(tps, called, out=np.zeros_like(tps), where=called != 0)
    return float(np.sum(np.diff(np.r_[0.0, tps / tps[-1]]) * precision))


def best_dice(labels, scores) -> tuple[float, float]:
    """Maximum over all thresholds of 2PR/(P+R) and the threshold reaching it (reference §9).

    "score >= threshold" is the prediction. NaN (P + R = 0) is ignored; with no positive pixel
    the result is (NaN, NaN).
    """
    y, s = _check(labels, scores)
    return best_dice_from_counts(*binary_clf_curve(y, s))


def best_dice_from_counts(fps: np.ndarray, tps: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """``best_dice`` from ``binary_clf_curve``: 2PR/(P+R) = 2TP/(TP+FP+positives) wherever TP > 0;
    of tied thresholds the lowest wins, as the reference's nanargmax over scikit-learn's
    increasing-threshold curve picks it."""
    if tps.size == 0 or tps[-1] == 0:
        return float("nan"), float("nan")
    dice = np.where(tps > 0, 2.0 * tps / (tps + fps + tps[-1]), np.nan)
    k = dice.size - 1 - int(np.nanargmax(dice[::-1]))  # sklearn's curve runs lowest threshold first
    return float(dice[k]), float(thr[k])


def dice_at(labels, scores, threshold: float) -> float:
    """Dice of "score >= threshold" against the labels; NaN where both are empty (no lesion, none called)."""
    y, s = _check(labels, scores)
    called = s >= threshold
    denominator = int(y.sum()) + int(called.sum())
    return float("nan") if denominator == 0 else 2.0 * float(np.sum(y & called)) / denominator


def dice_at_fpr(labels, scores, max_fpr: float = 0.05) -> tuple[float, float]:
    """Dice of the largest call set "score >= t" whose false-positive rate (called normal pixels /
    normal pixels) is at most ``max_fpr``, and that t; (NaN, NaN) without lesion or normal pixels.
    Where even the top score exceeds the rate (ties), nothing is called: (0, inf)."""
    y, s = _check(labels, scores)
    return dice_at_fpr_from_counts(*binary_clf_curve(y, s), max_fpr)


def dice_at_fpr_from_counts(fps: np.ndarray, tps: np.ndarray, thr: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """``dice_at_fpr`` from ``binary_clf_curve``'s counts and thresholds."""
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan"), float("nan")
    n_pos, n_neg = tps[-1], fps[-1]
    within = np.flatnonzero(fps <= max_fpr * n_neg)
    if within.size == 0:
        return 0.0, float("inf")
    k = int(within[-1])  # fps grows as the threshold falls: the last one within is the largest call set
    return 2.0 * float(tps[k]) / (n_pos + tps[k] + fps[k]), float(thr[k])


def pro_curve(regions, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap against false-positive rate at every distinct score, highest first.

    ``regions``: integer region id per pixel, 0 = normal, each lesion (connected component) its
    own id > 0. At threshold t the PRO is the mean over regions of the share of the region's pixels
    with score >= t; it is a cumulative sum of weights 1 / (n_regions * region size), so one sort
    gives the exact curve. Returns ``(fpr, pro, thresholds)``.
    """
    r = np.asarray(regions).ravel()
    if not np.issubdtype(r.dtype, np.integer) or (r.size and r.min() < 0):
        raise ValueError("regions must be non-negative integer ids (0 = normal)")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if r.shape != s.shape:
        raise ValueError(f"regions and scores differ in size: {r.size} vs {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    lesion = r > 0
    _, inverse, sizes = np.unique(r[lesion], return_inverse=True, return_counts=True)  # lesion pixels only: few
    n_regions, n_neg = int(sizes.size), int(r.size - lesion.sum())
    if n_regions == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    weights = np.zeros(r.size)
    weights[lesion] = 1.0 / (n_regions * sizes[inverse.ravel()])
    order = np.argsort(s, kind="mergesort")[::-1]
    s, weights, normal = s[order], weights[order], (r[order] == 0)
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    pro = np.cumsum(weights)[ends]
    fpr = np.cumsum(normal, dtype=np.float64)[ends] / n_neg
    return fpr, np.minimum(pro, 1.0), s[ends]


def aupro(regions, scores, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve from FPR 0 to ``max_fpr`` (trapezoids; the curve is interpolated
    linearly at ``max_fpr``), divided by ``max_fpr``: 1 for a perfect map, about ``max_fpr / 2``
    for a random one. NaN without lesion regions or normal pixels."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro, _ = pro_curve(regions, scores)
    return float("nan") if fpr.size == 0 else partial_area(fpr, pro, max_fpr)


def partial_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """``aupro``'s integral of a curve given highest threshold first (fpr non-decreasing, from the
    implicit point (0, 0)), to ``max_fpr``, divided by ``max_fpr``."""
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    inside = fpr <= max_fpr
    x, y = fpr[inside], pro[inside]
    if x[-1] < max_fpr:  # close the area at max_fpr on the segment that crosses it
        j = int(np.flatnonzero(~inside)[0])
        y_end = pro[j - 1] + (pro[j] - pro[j - 1]) * (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0) / max_fpr)


@dataclass
class DetectionMetrics:
    """One row of the evaluation table."""

    ap_image: float   # AP_i: sample (slice/image) scores vs "any positive pixel"
    auroc: float      # AUROC on the same
    ap_pixel: float   # AP_p over all pooled pixels
    dice: float       # best Dice over all thresholds
    threshold: float  # the threshold of the best Dice (chosen on the evaluated data, as the benchmark does)
    n_samples: int
    n_positive_samples: int
    n_pixels: int
    n_positive_pixels: int
    dice_fpr5: float = float("nan")  # Dice of the largest call set at <= 5 % pixel FPR (dice_at_fpr)
    aupro: float = float("nan")      # per-region overlap area to 30 % FPR (aupro); NaN without regions given
    n_regions: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def detection_metrics(image_labels, image_scores, pixel_labels, pixel_scores, pixel_regions=None) -> DetectionMetrics:
    """All four reference metrics from sample labels/scores and pooled pixel labels/scores, and
    Dice at 5 % FPR; AUPRO too where ``pixel_regions`` (lesion ids per pixel, ``pro_curve``) are given."""
    yi, si = _check(image_labels, image_scores)
    yp, sp = _check(pixel_labels, pixel_scores)
    curve = binary_clf_curve(yp, sp)  # one sort of the pooled pixels for AP, best Dice and Dice at 5 % FPR
    dice, thr = best_dice_from_counts(*curve)
    ap_pixel, dice_fpr5 = ap_from_counts(*curve[:2]), dice_at_fpr_from_counts(*curve, 0.05)[0]
    del curve  # released before AUPRO's own sort: peak memory is what limits a cohort
    n_regions, area = 0, float("nan")
    if pixel_regions is not None:
        regions = np.asarray(pixel_regions).ravel()
        if regions.shape != yp.shape or not np.array_equal(regions > 0, yp):
            raise ValueError("pixel regions must be > 0 exactly on the positive pixels")
        n_regions = int(np.unique(regions[regions > 0]).size)
        area = aupro(regions, sp)
    return DetectionMetrics(
        ap_image=average_precision(yi, si), auroc=roc_auc(yi, si), ap_pixel=ap_pixel,
        dice=dice, threshold=thr, n_samples=int(yi.size), n_positive_samples=int(yi.sum()),
        n_pixels=int(yp.size), n_positive_pixels=int(yp.sum()), dice_fpr5=dice_fpr5,
        aupro=area, n_regions=n_regions,
    )


def slice_metrics(maps: np.ndarray, masks: np.ndarray, scores: np.ndarray | None = None,
                  regions: np.ndarray | None = None) -> DetectionMetrics:
    """The benchmark protocol on model-space slices: maps, masks ``(N, H, W)`` pooled.

    Sample label = the slice's mask has a positive pixel; sample score = ``scores`` or the mean
    of the map over all pixels (reference §6 item 5); pixels include background (§9).
    ``regions`` (``(N, H, W)`` lesion ids): also AUPRO.
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    if scores is None:
        scores = maps.reshape(len(maps), -1).astype(np.float64).mean(axis=1)
    return detection_metrics(masks.reshape(len(masks), -1).any(axis=1), scores, masks, maps, regions)


def summarise(values) -> dict[str, float]:
    """avg / max / std (population, ddof 0) of per-member metric values, NaN ignored."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"avg": float("nan"), "max": float("nan"), "std": float("nan")}
    return {"avg": float(v.mean()), "max": float(v.max()), "std": float(v.std())}


__all__ = ["binary_clf_curve", "roc_auc", "precision_recall", "average_precision", "best_dice", "dice_at",
           "dice_at_fpr", "pro_curve", "aupro", "partial_area", "ap_from_counts", "best_dice_from_counts",
           "dice_at_fpr_from_counts",
           "DetectionMetrics", "detection_metrics", "slice_metrics", "summarise"]
