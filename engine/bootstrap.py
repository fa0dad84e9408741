"""Case-bootstrap confidence intervals for ``condiff-eval`` (``--bootstrap N``).

A cohort's pooled metrics move with which cases happen to be in it; with a few dozen cases the
difference between a model and a baseline can be smaller than that. Each resample draws the cases
with replacement (the same draw for every row, so differences between rows are paired) and
recomputes the pooled metrics as if the drawn cases had been concatenated. Pixels are sorted once
per row; a resample only re-weights them by how often their case was drawn, so a resample costs a
few passes over the pixels instead of a sort. The tests check that a re-weighted resample equals
scikit-learn on the explicitly concatenated cases. The lesion F1 is resampled from each case's
lesion-wise counts at the row's full-data best-Dice threshold (the threshold stays fixed; the Dice
columns choose theirs anew in every resample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from condiff.metrics import (ap_from_counts, average_precision, best_dice_from_counts, dice_at_fpr_from_counts,
                             partial_area, roc_auc)

from .lesions import lesion_f1

INTERVAL_KEYS = ("ap_image", "auroc", "ap_pixel", "dice", "dice_fpr5", "aupro", "lesion_f1")


class PooledCases:
    """One row's maps over the cases: pixel labels, scores and lesion ids (case-local, 0 = normal),
    and sample labels and scores, each a list with one array per case; ``lesion_counts``: each case's
    ``lesions.LesionDetection`` at the row's threshold (for the lesion F1)."""

    def __init__(self, pixel_labels: list, pixel_scores: list, pixel_regions: list, sample_labels: list,
                 sample_scores: list, max_fpr: float = 0.05, aupro_max_fpr: float = 0.3, lesion_counts: list | None = None,
                 given: float | None = None):
        self.n_cases = len(pixel_labels)
        self.given = given  # --threshold: the Dice at this fixed threshold ("dice_given") is bootstrapped too
        self.keys = INTERVAL_KEYS + (("dice_given",) if given is not None else ())
        self.lesion_counts = None if lesion_counts is None else np.array(
            [(c.lesions, c.found, c.called_regions, c.false_regions) for c in lesion_counts], dtype=np.float64)
        self.max_fpr, self.aupro_max_fpr = max_fpr, aupro_max_fpr
        case_of = np.concatenate([np.full(np.asarray(y).size, k, dtype=np.int64) for k, y in enumerate(pixel_labels)])
        y = np.concatenate([np.asarray(a, dtype=bool).ravel() for a in pixel_labels])
        s = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in pixel_scores])
        inv_size = np.zeros(y.size)
        self.regions_per_case = np.zeros(self.n_cases)
        start = 0
        for k, ids in enumerate(pixel_regions):  # 1 / size of the pixel's lesion, per case
            ids = np.asarray(ids).ravel()
            lesion = ids > 0
            _, inverse, sizes = np.unique(ids[lesion], return_inverse=True, return_counts=True)
            inv_size[start:start + ids.size][lesion] = 1.0 / sizes[inverse.ravel()]
            self.regions_per_case[k] = sizes.size
            start += ids.size
        order = np.argsort(s, kind="mergesort")[::-1]
        self.case, self.y, self.inv_size = case_of[order], y[order], inv_size[order]
        self.ends = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]
        self.thresholds = s[order][self.ends]
        self.samples = [(np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=np.float64).ravel())
                        for a, b in zip(sample_labels, sample_scores)]

    def metrics(self, mult: np.ndarray) -> dict[str, float]:
        """The pooled metrics of the cohort in which case k appears ``mult[k]`` times."""
        mult = np.asarray(mult, dtype=np.float64)
        w = mult[self.case]
        tps = np.cumsum(w * self.y)[self.ends]
        fps = np.cumsum(w * ~self.y)[self.ends]
        out = dict.fromkeys(self.keys, float("nan"))
        if self.lesion_counts is not None:
            out["lesion_f1"] = lesion_f1(*(mult @ self.lesion_counts))
        sy = np.concatenate([np.repeat(a, int(m)) for (a, _), m in zip(self.samples, mult)] or [np.zeros(0, bool)])
        ss = np.concatenate([np.repeat(b, int(m)) for (_, b), m in zip(self.samples, mult)] or [np.zeros(0)])
        if sy.any():
            out["ap_image"] = average_precision(sy, ss)
            out["auroc"] = roc_auc(sy, ss)
        n_pos, n_neg = tps[-1], fps[-1]
        if n_pos == 0 or n_neg == 0:
            return out
        out["ap_pixel"] = ap_from_counts(fps, tps)
        out["dice"] = best_dice_from_counts(fps, tps, self.thresholds)[0]
        out["dice_fpr5"] = dice_at_fpr_from_counts(fps, tps, self.thresholds, self.max_fpr)[0]
        if self.given is not None:  # "score >= given" (metrics.dice_at): the distinct thresholds at or above it
            k = int(np.searchsorted(-self.thresholds, -self.given, side="right"))
            tp, fp = (tps[k - 1], fps[k - 1]) if k else (0.0, 0.0)
            out["dice_given"] = 2.0 * float(tp) / (n_pos + tp + fp)
        n_regions = float(np.sum(mult * self.regions_per_case))
        if n_regions > 0:
            pro = np.minimum(np.cumsum(w * self.inv_size)[self.ends] / n_regions, 1.0)
            out["aupro"] = partial_area(fps / n_neg, pro, self.aupro_max_fpr)
        return out


@dataclass
class Intervals:
    """Percentile intervals per row and metric, and of each row's difference to the first row."""

    n: int
    seed: int
    level: float = 0.95
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    differences: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    undefined: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"resamples": self.n, "seed": self.seed, "level": self.level, "unit": "case",
                "rows": self.rows, "differences_to_first_row": self.differences,
                "undefined_resamples": self.undefined}


def bootstrap(rows: dict[str, PooledCases], n: int, seed: int = 0, level: float = 0.95,
              progress: Callable[[int], None] | None = None) -> Intervals:
    """``n`` case resamples shared by all ``rows`` (the first row is the reference of the
    differences). A resample in which a metric is undefined (no lesion drawn) is left out of that
    metric's interval and counted in ``undefined``."""
    names = list(rows)
    n_cases = rows[names[0]].n_cases
    if any(r.n_cases != n_cases for r in rows.values()):
        raise ValueError("every row must hold the same cases")
    rng = np.random.default_rng(seed)
    values = {name: {k: np.empty(n) for k in rows[name].keys} for name in names}
    for b in range(n):
        mult = rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases))
        for name in names:
            for k, v in rows[name].metrics(mult).items():
                values[name][k][b] = v
        if progress is not None:
            progress(1)
    tail = 100 * (1 - level) / 2
    result = Intervals(n=n, seed=seed, level=level)

    def interval(x: np.ndarray) -> list[float]:
        x = x[~np.isnan(x)]
        return [float("nan")] * 2 if x.size == 0 else [float(v) for v in np.percentile(x, [tail, 100 - tail])]

    first = names[0]
    for name in names:
        result.rows[name] = {k: interval(values[name][k]) for k in values[name]}
        result.undefined[name] = {k: int(np.isnan(values[name][k]).sum()) for k in values[name]}
        if name != first:
            result.differences[name] = {k: interval(values[first][k] - values[name][k])
                                        for k in values[name] if k in values[first]}
    return result


__all__ = ["INTERVAL_KEYS", "PooledCases", "Intervals", "bootstrap"]
