"""Case bootstrap of condiff-eval: a re-weighted resample equals the metrics of the explicitly concatenated cases."""
import json

import numpy as np
import pytest

from condiff.engine.bootstrap import INTERVAL_KEYS, PooledCases, bootstrap
from condiff.engine.evaluate import lesion_regions
from condiff.engine.lesions import LesionDetection
from condiff.metrics import aupro, dice_at_fpr

sk = pytest.importorskip("sklearn.metrics")
pytest.importorskip("skimage.measure")
from lesion_oracle import shifts_counts, shifts_f1  # noqa: E402  (needs skimage)

LESION_THR = 0.6  # the fixed threshold of the lesion-wise counts in these tests


def _slice_counts(masks, maps, thr):
    """(lesions, found, called, false) of a stack of slices, 8-connected per slice, by the oracle."""
    return np.sum([shifts_counts(y, x >= thr, 2) for y, x in zip(masks, maps)], axis=0)


def _cases(seed, n_cases=4):
    """Per case: (N, 12, 12) slices with lesions of several sizes (one case without any), maps with ties."""
    rng = np.random.default_rng(seed)
    cases = []
    yy, xx = np.mgrid[:12, :12]
    for k in range(n_cases):
        n = int(rng.integers(2, 5))
        masks = np.zeros((n, 12, 12), dtype=bool)
        if k != 1:
            for _ in range(int(rng.integers(1, 4))):
                j, cy, cx, r = rng.integers(n), rng.integers(2, 10), rng.integers(2, 10), rng.uniform(0.5, 3)
                masks[j] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        maps = np.round((rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)) * 30) / 30
        cases.append((masks, maps))
    return cases


def _pooled(cases):
    masks, maps = [c[0] for c in cases], [c[1] for c in cases]
    return PooledCases(masks, maps, [lesion_regions(m, per_slice=True) for m in masks],
                       [m.reshape(len(m), -1).any(1) for m in masks],
                       [x.reshape(len(x), -1).mean(1) for x in maps],
                       lesion_counts=[LesionDetection(*_slice_counts(m, x, LESION_THR)) for m, x in cases])


def _concatenated(cases, mult):
    """The resampled cohort built by hand: each drawn case repeated, its lesions given ids of their own."""
    ys, ss, ids, sy, ssc, offset = [], [], [], [], [], 0
    for (masks, maps), m in zip(cases, mult):
        for _ in range(m):
            r = lesion_regions(masks, per_slice=True)
            ids.append(np.where(r > 0, r + offset, 0).ravel())
            offset += int(r.max())
            ys.append(masks.ravel()), ss.append(maps.ravel())
            sy.append(masks.reshape(len(masks), -1).any(1)), ssc.append(maps.reshape(len(maps), -1).mean(1))
    return [np.concatenate(a) for a in (ys, ss, ids, sy, ssc)]


@pytest.mark.parametrize("mult", [(1, 1, 1, 1), (2, 0, 1, 1), (0, 3, 0, 1), (4, 0, 0, 0), (0, 1, 2, 1)])
def test_a_reweighted_resample_equals_the_concatenated_cases(mult):
    cases = _cases(0)
    got = _pooled(cases).metrics(np.array(mult))
    y, s, regions, sy, ss = _concatenated(cases, mult)
    p, r, _ = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        best = np.nanmax(2 * p * r / (p + r))
    assert abs(got["ap_pixel"] - sk.average_precision_score(y, s)) <= 1e-10
    assert abs(got["dice"] - best) <= 1e-10
    assert abs(got["dice_fpr5"] - dice_at_fpr(y, s, 0.05)[0]) <= 1e-10
    assert abs(got["aupro"] - aupro(regions, s, 0.3)) <= 1e-10
    assert abs(got["ap_image"] - sk.average_precision_score(sy, ss)) <= 1e-10
    assert abs(got["auroc"] - sk.roc_auc_score(sy, ss)) <= 1e-10
    # lesion F1: the oracle's counts of every drawn copy, added
    copies = [c for c, m in zip(cases, mult) for _ in range(m)]
    counts = np.sum([_slice_counts(masks, maps, LESION_THR) for masks, maps in copies], axis=0)
    assert counts[0] > 0 and abs(got["lesion_f1"] - shifts_f1(*counts)) <= 1e-12


@pytest.mark.parametrize("given", [0.5, 0.51, 1.7, -1.0])  # a tied map value, between values, above all, below all
@pytest.mark.parametrize("mult", [(1, 1, 1, 1), (2, 0, 1, 1), (0, 3, 0, 1)])
def test_the_dice_at_a_given_threshold_is_resampled_as_metrics_dice_at_scores_it(mult, given):
    """--threshold's Dice@given has a bootstrap interval too: each resample's value equals "score >= t"
    counted on the concatenated cases (a float64 numpy count, the definition of metrics.dice_at)."""
    cases = _cases(0)
    masks, maps = [c[0] for c in cases], [c[1] for c in cases]
    pooled = PooledCases(masks, maps, [lesion_regions(m, per_slice=True) for m in masks],
                         [m.reshape(len(m), -1).any(1) for m in masks], [x.reshape(len(x), -1).mean(1) for x in maps],
                         given=given)
    y, s, *_ = _concatenated(cases, mult)
    called = s >= given
    want = 2.0 * np.sum(y & called) / (y.sum() + called.sum())
    assert abs(pooled.metrics(np.array(mult))["dice_given"] - want) <= 1e-12
    assert "dice_given" not in _pooled(cases).metrics(np.array(mult))  # only where a threshold was given
    iv = bootstrap({"ensemble": pooled, "other": _pooled(cases)}, 30, seed=2)
    assert "dice_given" in iv.rows["ensemble"] and "dice_given" not in iv.differences["other"]


def test_a_resample_without_lesions_is_undefined_and_left_out():
    cases = _cases(1)
    alone = _pooled(cases).metrics(np.array([0, 4, 0, 0]))  # case 1 has no lesion
    assert all(np.isnan(v) for k, v in alone.items() if k != "lesion_f1")
    assert alone["lesion_f1"] == 0.0  # defined: its called regions are all false
    iv = bootstrap({"a": _pooled(cases)}, 200, seed=3)
    assert 0 < iv.undefined["a"]["ap_pixel"] < 200
    for k in INTERVAL_KEYS:
        lo, hi = iv.rows["a"][k]
        assert 0 <= lo <= hi <= 1


def test_differences_are_paired_and_seeded():
    cases = _cases(2)
    same = bootstrap({"a": _pooled(cases), "b": _pooled(cases)}, 50, seed=1)
    assert all(same.differences["b"][k] == [0.0, 0.0] for k in INTERVAL_KEYS)  # paired: identical rows differ by 0
    worse = [(m, np.where(np.random.default_rng(5).random(x.shape) < 0.5, x, x[::-1])) for m, x in cases]
    a = bootstrap({"a": _pooled(cases), "b": _pooled(worse)}, 50, seed=1)
    b = bootstrap({"a": _pooled(cases), "b": _pooled(worse)}, 50, seed=1)
    assert a.to_dict() == b.to_dict()
    assert a.differences["b"]["ap_pixel"][0] > 0  # the scrambled maps are worse in every resample


def test_condiff_eval_bootstrap_block_and_json(tmp_path):
    from click.testing import CliRunner

    from _infer_helpers import FAST, make_model_set, make_scans, one_torch_thread
    from condiff.engine.cli import eval_main, infer_main

    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=2)
        make_scans(tmp_path / "scans", n=3, with_masks=True)
        res = CliRunner().invoke(infer_main, [str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--models",
                                              str(models), *FAST, "--save-member-maps"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--protocol", "benchmark",
                                         "--baselines", "--bootstrap", "40"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "intervals over 40 case resamples" in res.stdout and "ensemble - baseline: bright" in res.stdout
    doc = json.loads((out / "metrics-benchmark.json").read_text())
    boot = doc["bootstrap"]
    assert boot["resamples"] == 40 and boot["unit"] == "case"
    assert set(boot["rows"]) == {"ensemble", "member 0", "member 1", "baseline: bright", "baseline: dark",
                                 "baseline: median", "baseline: area"}
    # the same resamples rebuilt by hand from the saved model-space arrays give the same intervals
    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import mask_to_slices

    masks, maps, scores, bright = [], [], [], []
    for k in range(3):
        rec = json.loads((out / "records" / f"case{k}.json").read_text())
        z = np.load(out / "model_space" / f"case{k}.npz")
        keep = z["slices"].reshape(len(z["slices"]), -1).sum(1) != 0
        scan = tmp_path / "scans" / f"case{k}.nii.gz"
        masks.append(mask_to_slices(read_mask(tmp_path / "scans" / f"case{k}_seg.nii.gz", read_volume(scan)),
                                    rec["geometry"])[keep])
        maps.append(z["maps"][keep]), scores.append(z["scores"][keep])
        bright.append(z["slices"][keep][:, 0].astype(np.float64) * z["foreground"][keep])
    regions = [lesion_regions(m, per_slice=True) for m in masks]
    positive = [m.reshape(len(m), -1).any(1) for m in masks]
    thr = {r["row"]: r.get("threshold") for r in doc["rows"]}
    rows = {"ensemble": PooledCases(masks, maps, regions, positive, scores, lesion_counts=[
                LesionDetection(*_slice_counts(m, x, thr["ensemble"])) for m, x in zip(masks, maps)]),
            "baseline: bright": PooledCases(masks, bright, regions, positive,
                                            [b.reshape(len(b), -1).mean(1) for b in bright], lesion_counts=[
                LesionDetection(*_slice_counts(m, x, thr["baseline: bright"])) for m, x in zip(masks, bright)])}
    ours = bootstrap(rows, 40, seed=0).to_dict()
    for name in rows:
        for k in INTERVAL_KEYS:
            np.testing.assert_allclose(boot["rows"][name][k], ours["rows"][name][k], rtol=0, atol=1e-12)
    np.testing.assert_allclose(boot["differences_to_first_row"]["baseline: bright"]["aupro"],
                               ours["differences_to_first_row"]["baseline: bright"]["aupro"], rtol=0, atol=1e-12)
    given = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--protocol", "benchmark",
                                           "--threshold", "0.05", "--bootstrap", "40"], catch_exceptions=False)
    assert given.exit_code == 0, given.output
    assert "Dice@given" in given.stdout.split("case resamples")[1]  # the interval block has the column
    rows_given = {"ensemble": PooledCases(masks, maps, regions, positive, scores, given=0.05)}
    np.testing.assert_allclose(json.loads((out / "metrics-benchmark.json").read_text())["bootstrap"]["rows"]
                               ["ensemble"]["dice_given"],
                               bootstrap(rows_given, 40, seed=0).rows["ensemble"]["dice_given"], rtol=0, atol=1e-12)
    negative = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--bootstrap", "5",
                                              "--bootstrap-seed", "-1"])
    assert negative.exit_code == 2 and "--bootstrap-seed" in negative.output  # a usage error, not a traceback
    plain = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz"], catch_exceptions=False)
    assert "intervals" not in plain.stdout
    assert json.loads((out / "metrics-native.json").read_text())["bootstrap"] is None


@pytest.mark.parametrize("level, seed", [(0.9, 7), (0.95, 11)])
def test_intervals_are_percentiles_of_whole_cohort_resamples_scored_by_sklearn(level, seed):
    """Oracle: each resample drawn as condiff documents it (n cases with replacement, as multinomial counts
    from the seeded generator), the drawn cases concatenated and scored by scikit-learn, and numpy's
    percentiles at (1 - level) / 2 and (1 + level) / 2; a resample without a lesion pixel is left out."""
    cases = _cases(4, n_cases=5)
    n = 30
    iv = bootstrap({"a": _pooled(cases)}, n, seed=seed, level=level)
    rng = np.random.default_rng(seed)
    ap, auroc = [], []
    for _ in range(n):
        mult = rng.multinomial(len(cases), np.full(len(cases), 1.0 / len(cases)))
        assert mult.sum() == len(cases)
        y, s, _, sy, ss = _concatenated(cases, mult)
        ap.append(sk.average_precision_score(y, s) if y.any() else np.nan)
        auroc.append(sk.roc_auc_score(sy, ss) if 0 < sy.sum() < sy.size else np.nan)
    for key, values in (("ap_pixel", ap), ("auroc", auroc)):
        values = np.array(values)
        kept = values[~np.isnan(values)]
        want = np.percentile(kept, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
        np.testing.assert_allclose(iv.rows["a"][key], want, rtol=0, atol=1e-10)
        assert iv.undefined["a"][key] == n - kept.size
