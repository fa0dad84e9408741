"""condiff.metrics against scikit-learn (the benchmark's own metric code), on data with ties."""
import numpy as np
import pytest

from condiff.metrics import (average_precision, best_dice, detection_metrics, dice_at, precision_recall, roc_auc,
                             slice_metrics, summarise)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _data(seed, n, p=0.2, levels=20):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < p
    # quantised scores: many ties, within and across classes
    s = np.round((rng.random(n) + 0.3 * y) * levels) / levels
    return y, s


def _sk_best_dice(y, s):
    """reference-method §9: Dice = 2PR/(P+R) over precision_recall_curve, NaN ignored, max."""
    precision, recall, thresholds = sklearn_metrics.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * precision * recall / (precision + recall)
    k = int(np.nanargmax(dice))
    return dice[k], thresholds[k]


@pytest.mark.parametrize("seed,n,p,levels", [(0, 7, 0.5, 3), (1, 100, 0.2, 5), (2, 5000, 0.05, 50),
                                             (3, 20000, 0.3, 1000), (4, 50, 0.9, 2)])
def test_metrics_match_sklearn_with_ties(seed, n, p, levels):
    y, s = _data(seed, n, p, levels)
    if y.all() or not y.any():
        pytest.skip("degenerate draw")
    assert abs(roc_auc(y, s) - sklearn_metrics.roc_auc_score(y, s)) <= 1e-10
    assert abs(average_precision(y, s) - sklearn_metrics.average_precision_score(y, s)) <= 1e-10
    dice, thr = best_dice(y, s)
    sk_dice, sk_thr = _sk_best_dice(y, s)
    assert abs(dice - sk_dice) <= 1e-10
    assert thr == sk_thr


def test_precision_recall_curve_matches_sklearn():
    y, s = _data(7, 300, 0.3, 10)
    p, r, t = precision_recall(y, s)
    sp, sr, st = sklearn_metrics.precision_recall_curve(y, s)
    # scikit-learn >= 1.1 may stop the curve at full recall; compare on its points
    np.testing.assert_allclose(p[-len(sp):], sp, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r[-len(sr):], sr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t[-len(st):], st)


def test_pixel_metrics_on_maps_match_sklearn():
    rng = np.random.default_rng(11)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[1, 4:9, 5:10] = True
    masks[4, 10:14, 2:6] = True
    maps = np.where(rng.random(masks.shape) < 0.5, 0.0, rng.random(masks.shape) * 0.05).astype(np.float32)
    maps[masks] += 0.02
    maps[0] = 0.0  # an all-background slice: ties at 0
    m = slice_metrics(maps, masks)
    y_img, s_img = masks.reshape(6, -1).any(1), maps.reshape(6, -1).astype(np.float64).mean(1)
    assert abs(m.ap_pixel - sklearn_metrics.average_precision_score(masks.ravel(), maps.ravel())) <= 1e-10
    assert abs(m.auroc - sklearn_metrics.roc_auc_score(y_img, s_img)) <= 1e-10
    assert abs(m.ap_image - sklearn_metrics.average_precision_score(y_img, s_img)) <= 1e-10
    assert abs(m.dice - _sk_best_dice(masks.ravel(), maps.ravel())[0]) <= 1e-10
    assert (m.n_samples, m.n_positive_samples, m.n_pixels) == (6, 2, 6 * 256)


def test_dice_is_twice_tp_over_confusion_at_best_threshold():
    y, s = _data(5, 400, 0.25, 8)
    dice, thr = best_dice(y, s)
    pred = s >= thr
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    assert abs(dice - 2 * tp / (2 * tp + fp + fn)) <= 1e-12


def test_tied_best_dice_reports_the_lowest_of_the_tied_thresholds_as_sklearn():
    """Two lesion pixels: calling only the 0.9 one (TP 1, FP 0) and calling everything >= 0.4
    (TP 2, FP 2) both give Dice 2/3. The reference takes np.nanargmax over scikit-learn's
    precision_recall_curve, whose thresholds increase, so the lower threshold, 0.4, is reported."""
    y = np.array([1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.9, 0.4, 0.4, 0.4, 0.1])
    for thr in (0.9, 0.4):
        assert sklearn_metrics.f1_score(y, s >= thr) == pytest.approx(2 / 3, abs=1e-15)
    assert _sk_best_dice(y, s)[1] == 0.4
    dice, thr = best_dice(y, s)
    assert dice == pytest.approx(2 / 3, abs=1e-15) and thr == 0.4
    m = detection_metrics([0, 1], [0.1, 0.2], y, s)  # the table's best-Dice threshold
    assert m.threshold == 0.4 and m.dice == pytest.approx(2 / 3, abs=1e-15)


def test_dice_at_a_given_threshold_matches_sklearn_f1():
    y, s = _data(6, 300, 0.2, 10)
    for thr in (0.0, 0.35, 0.6, 2.0):  # everything called, a tie level, a middle, nothing called
        expected = sklearn_metrics.f1_score(y, s >= thr, zero_division=0.0)
        assert abs(dice_at(y, s, thr) - expected) <= 1e-12, thr
    assert dice_at([0, 0, 0], [0.1, 0.5, 0.9], 0.4) == 0.0  # no lesion, two pixels called: Dice 0
    assert np.isnan(dice_at([0, 0], [0.1, 0.2], 0.5))       # no lesion, none called: undefined


def test_degenerate_inputs_give_nan_or_errors():
    assert np.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert all(np.isnan(best_dice([0, 0], [0.1, 0.2])))
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([0, 1], [np.nan, 0.2])
    m = detection_metrics([0, 1], [0.1, 0.2], [0, 1, 1], [0.0, 0.5, 0.5])
    assert m.auroc == 1.0 and m.dice == 1.0 and m.threshold == 0.5


def test_summarise_population_std():
    s = summarise([0.5, 0.7, np.nan, 0.9])
    assert s["avg"] == pytest.approx(0.7) and s["max"] == 0.9
    assert s["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))


@pytest.mark.slow
def test_pixel_metrics_on_ten_million_pixels_match_sklearn():
    """condiff-eval pools every pixel of a cohort: 10^7 pixels with ties, against scikit-learn (1e-9)."""
    import time

    from sklearn.metrics import average_precision_score, precision_recall_curve

    from condiff.metrics import average_precision, best_dice

    rng = np.random.default_rng(7)
    n = 10_000_000
    labels = rng.random(n) < 0.02
    scores = np.round(rng.random(n) * 0.05 + 0.02 * labels, 4).astype(np.float32)  # quantised: many ties
    t0 = time.perf_counter()
    ap = average_precision(labels, scores)
    dice, _ = best_dice(labels, scores)
    ours_s = time.perf_counter() - t0
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_dice = np.nanmax(2 * p * r / (p + r))
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert dice == pytest.approx(ref_dice, abs=1e-9)
    print(f"AP + best Dice on 1e7 pixels: {ours_s:.2f} s")  # recorded, not asserted (no timing thresholds)


# ---------------------------------------------------------------- Dice at a fixed FPR, AUPRO


def _brute_dice_at_fpr(y, s, max_fpr):
    """Every distinct threshold tried: the lowest whose FPR is within max_fpr, scored by scikit-learn's F1."""
    n_neg = (~y).sum()
    best = None
    for t in np.unique(s)[::-1]:
        if ((s >= t) & ~y).sum() / n_neg <= max_fpr:
            best = t
    if best is None:
        return 0.0
    return sklearn_metrics.f1_score(y, s >= best)


@pytest.mark.parametrize("seed,n,p,levels,max_fpr", [(0, 50, 0.3, 4, 0.05), (1, 2000, 0.1, 30, 0.05),
                                                     (2, 3000, 0.05, 1000, 0.2), (3, 400, 0.5, 3, 0.0)])
def test_dice_at_fpr_matches_a_threshold_sweep(seed, n, p, levels, max_fpr):
    from condiff.metrics import dice_at_fpr

    y, s = _data(seed, n, p, levels)
    dice, thr = dice_at_fpr(y, s, max_fpr)
    assert abs(dice - _brute_dice_at_fpr(y, s, max_fpr)) <= 1e-12
    if np.isfinite(thr):
        assert ((s >= thr) & ~y).sum() <= max_fpr * (~y).sum()
        lower = s[s < thr]
        if lower.size:  # one more level would exceed the rate
            assert ((s >= lower.max()) & ~y).sum() > max_fpr * (~y).sum()


def test_dice_at_fpr_degenerate_cases():
    from condiff.metrics import dice_at_fpr

    assert dice_at_fpr([0, 1, 1, 0], [0.9, 0.9, 0.9, 0.1], 0.05) == (0.0, float("inf"))  # the top tie holds a normal
    assert all(np.isnan(dice_at_fpr([0, 0], [0.1, 0.2])))
    assert dice_at_fpr([0, 1], [0.1, 0.2])[0] == 1.0


def _blobs(seed, shape=(4, 24, 24), n_blobs=7):
    """Lesion masks of several sizes (some touching only diagonally) and a map with ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    for _ in range(n_blobs):
        k, cy, cx, r = rng.integers(shape[0]), rng.integers(3, shape[1] - 3), rng.integers(3, shape[2] - 3), rng.uniform(0.6, 4)
        masks[k] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    masks[0, 1, 1] = masks[0, 2, 2] = True  # two pixels joined by a corner: one 8-connected lesion
    maps = np.round((rng.random(shape) + 0.5 * masks * rng.random(shape)) * 40) / 40
    return masks, maps


def _brute_aupro(masks, maps, max_fpr):
    """Independent PRO curve: every threshold, every lesion (scipy 8-connected components per slice), then
    trapezoids segment by segment up to max_fpr, divided by max_fpr."""
    from scipy import ndimage

    regions = []
    for k in range(len(masks)):
        ids, n = ndimage.label(masks[k], structure=np.ones((3, 3)))
        regions += [(k, ids == j) for j in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[k] & region).sum() / region.sum() for k, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed,max_fpr", [(0, 0.3), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_aupro_matches_a_per_threshold_per_lesion_sweep(seed, max_fpr):
    from condiff.engine.evaluate import lesion_regions
    from condiff.metrics import aupro

    masks, maps = _blobs(seed)
    regions = lesion_regions(masks, per_slice=True)
    assert len(np.unique(regions[regions > 0])) >= 4
    assert abs(aupro(regions, maps, max_fpr) - _brute_aupro(masks, maps, max_fpr)) <= 1e-12


def test_aupro_weighs_every_lesion_equally():
    from condiff.metrics import aupro

    # a big lesion found and a small one missed: PRO 0.5, while pixel recall would be 16/17
    regions = np.zeros((8, 8), dtype=np.int64)
    regions[:4, :4] = 1
    regions[7, 7] = 2
    scores = np.where(regions == 1, 1.0, 0.0) + np.linspace(0, 0.01, 64).reshape(8, 8)
    scores[7, 7] = 0.0
    # the big lesion is called before any normal pixel, the small one after all of them: PRO 0.5 throughout
    assert abs(aupro(regions, scores, 0.3) - 0.5) <= 1e-12


def test_aupro_with_one_lesion_over_the_whole_fpr_range_is_the_roc_auc():
    from condiff.metrics import aupro

    y, s = _data(9, 3000, 0.2, 25)
    assert abs(aupro(y.astype(np.int64), s, 1.0) - sklearn_metrics.roc_auc_score(y, s)) <= 1e-12


def test_aupro_bounds_perfect_random_and_checks():
    from condiff.metrics import aupro, detection_metrics

    masks, _ = _blobs(4)
    regions = np.arange(1, masks.sum() + 1)
    ids = np.zeros(masks.shape, dtype=np.int64)
    ids[masks] = regions
    assert aupro(ids, masks.astype(float)) == 1.0
    rng = np.random.default_rng(0)
    big = np.zeros(200_000, dtype=np.int64)
    big[rng.random(big.size) < 0.1] = 1
    assert abs(aupro(big, rng.random(big.size), 0.3) - 0.15) < 0.005  # random map: max_fpr / 2
    assert np.isnan(aupro(np.zeros(5, dtype=np.int64), np.arange(5.0)))
    with pytest.raises(ValueError, match="integer"):
        aupro(np.array([0.0, 1.0]), [0.1, 0.2])
    with pytest.raises(ValueError, match="positive pixels"):
        detection_metrics([0, 1], [0.1, 0.2], [0, 1, 1], [0.0, 0.5, 0.5], pixel_regions=[0, 1, 0])
