"""bench/quality.py in smoke mode: the report is produced and agrees with scikit-learn on the written maps."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _quality_module():
    """bench/quality.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_smoke_report_is_self_consistent(tmp_path):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality.md").is_file()
    res = report["lesions"]["brats-t1c"]
    rows = {r["row"]: r for r in res["evaluation"]["rows"]}
    for row in rows.values():
        for k in ("ap_image", "auroc", "ap_pixel", "dice"):
            if row.get(k) is not None:
                assert 0.0 <= row[k] <= 1.0
    # recompute the ensemble row from the written model-space maps with scikit-learn
    from condiff.engine.evaluate import benchmark_arrays
    from condiff.engine.writer import load_records

    out = tmp_path / "brats-t1c"
    maps, masks, scores = [], [], []
    for rec in load_records(out):
        m, y, s, _ = benchmark_arrays(out, rec, "{dir}/{base}_seg.nii.gz")
        maps.append(m), masks.append(y), scores.append(s)
    maps, masks, scores = np.concatenate(maps), np.concatenate(masks), np.concatenate(scores)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    ens = rows["ensemble"]
    assert ens["ap_pixel"] == pytest.approx(sklearn_metrics.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert ens["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-9)
    assert ens["ap_image"] == pytest.approx(sklearn_metrics.average_precision_score(labels, scores), abs=1e-9)
    p, r, _ = sklearn_metrics.precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.nanmax(2 * p * r / (p + r))
    assert ens["dice"] == pytest.approx(dice, abs=1e-9)
    # lesion by lesion at the recorded threshold: skimage's 8-connected components per slice
    from lesion_oracle import shifts_counts, shifts_f1

    det = res["evaluation"]["lesion_detection"]
    assert det["threshold"] == ens["threshold"]
    n_lesions, found, n_regions, false = np.sum([shifts_counts(y, m >= det["threshold"], 2)
                                                 for y, m in zip(masks, maps)], axis=0)
    assert (det["lesions"], det["found"], det["called_regions"], det["false_regions"]) == (n_lesions, found, n_regions, false)
    assert n_lesions > 0 and f"{found} of {n_lesions} lesions found" in (tmp_path / "quality.md").read_text()
    assert ens["lesion_f1"] == pytest.approx(shifts_f1(n_lesions, found, n_regions, false))
    # members avg is the mean of the member rows
    members = [r for name, r in rows.items() if name.startswith("member ")]
    assert rows["members avg"]["ap_pixel"] == pytest.approx(np.mean([m["ap_pixel"] for m in members]), abs=1e-12)
    base = res["baselines"]
    assert base["chance"]["ap_pixel"] == pytest.approx(masks.mean(), abs=1e-12)
    # the healthy-response summary scores the same pixels: its AP_p is the ensemble row's
    hr = res["healthy_response"]
    assert hr["ap_pixel"]["map"] == pytest.approx(ens["ap_pixel"], abs=1e-9)
    assert len(hr["members"]) == len(members) and "Mean map inside the label" in (tmp_path / "quality.md").read_text()
    # per label class: the enhancing core alone (value 4), recomputed from the written maps
    region = res["regions"]["enhancing tumour"]
    core_maps, core_masks = [], []
    for rec in load_records(out):
        m, y, _, _ = benchmark_arrays(out, rec, "{dir}/{base}_seg.nii.gz", (4,))
        core_maps.append(m), core_masks.append(y)
    core_maps, core_masks = np.concatenate(core_maps), np.concatenate(core_masks)
    assert 0 < core_masks.sum() < masks.sum() and region["counts"]["positive_pixels"] == core_masks.sum()
    assert region["rows"]["ensemble"]["ap_pixel"] == pytest.approx(
        sklearn_metrics.average_precision_score(core_masks.ravel(), core_maps.ravel()), abs=1e-9)
    assert region["baselines"]["chance"]["ap_pixel"] == pytest.approx(core_masks.mean(), abs=1e-12)
    assert "| enhancing tumour (4) |" in (tmp_path / "quality.md").read_text()
    # case bootstrap (--smoke: 20 resamples): the ensemble and its paired differences to the baselines
    boot = res["bootstrap"]
    assert boot["resamples"] == 20 and set(boot["rows"]) >= {"ensemble", "baseline: bright", "baseline: dark"}
    for row in list(boot["rows"].values()) + list(boot["differences_to_first_row"].values()):
        for lo, hi in row.values():
            assert (lo is None and hi is None) or lo <= hi
    assert "| ensemble − bright |" in (tmp_path / "quality.md").read_text()


def test_quality_smoke_draws_one_equals_the_plain_healing_report(tmp_path):
    """--draws: K = 1 restores with noise seed 0 like the plain report (bit-identical figures); every
    count reports every task, with finite numbers, and the Markdown shows the table."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--synthetic",
                           "--draws", "1", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["lesions"] == {}  # --smoke --synthetic: the healing part alone
    syn = report["synthetic"]
    assert set(syn["by_draws"]) == {"1", "2"}
    for name, row in syn["tasks"].items():
        for key in ("removed", "ap", "clean_error", "copier_removed"):
            assert syn["by_draws"]["1"][name][key] == row[key]
            assert np.isfinite(syn["by_draws"]["2"][name][key])
        assert syn["by_draws"]["2"][name]["clean_error"] != row["clean_error"]  # another draw was averaged in
    assert "noise draws averaged" in (tmp_path / "quality.md").read_text()


def test_quality_smoke_per_member_rows_sit_beside_the_ensemble(tmp_path):
    """--per-member: one healing report per member, and the summary's mean / min / max are those of the
    member rows; the ensemble rows (averaged from the members' restorations) are the plain report's."""
    for flags, out in ((["--per-member"], tmp_path), ([], tmp_path / "plain")):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--synthetic",
                               *flags, "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    syn = json.loads((tmp_path / "quality.json").read_text())["synthetic"]
    plain = json.loads((tmp_path / "plain" / "quality.json").read_text())["synthetic"]["tasks"]
    assert set(plain) == set(syn["tasks"])
    for name, row in plain.items():
        for key in ("removed", "ap", "clean_error", "copier_removed"):
            assert syn["tasks"][name][key] == pytest.approx(row[key], abs=1e-5)
    assert [m["member"] for m in syn["members"]] == ["fold0", "fold1"]
    for name, row in syn["tasks"].items():
        summary = syn["member_summary"][name]
        assert summary["ensemble_removed"] == row["removed"] and summary["ensemble_ap"] == row["ap"]
        for key in ("removed", "ap"):
            vals = [m["tasks"][name][key] for m in syn["members"]]
            assert all(np.isfinite(vals))
            assert summary[f"members_{key}"]["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
            assert summary[f"members_{key}"]["min"] == min(vals) and summary[f"members_{key}"]["max"] == max(vals)
        assert 0.0 <= row["ap"] <= 1.0
    assert "Ensemble against its members" in (tmp_path / "quality.md").read_text()


def test_member_restorers_average_to_the_ensemble_restorer(tmp_path):
    """Each member restores alone with the noise it draws inside the set, so the members' mean restoration
    and map equal the ensemble's (a member keyed with another member's noise would not)."""
    quality = _quality_module()
    from condiff.engine.backends import open_denoiser
    from condiff.engine.runner import run_slices
    from condiff.modelset import open_model_set
    from condiff.sampler import make_plan

    set_dir, _ = quality.make_smoke_inputs(tmp_path)
    ms = open_model_set(set_dir)
    dens = [open_denoiser("torch", d, device="cpu", precision="fp32", max_batch=8) for d in ms.member_dirs]
    plan = make_plan("ddim", 3)
    rng = np.random.default_rng(0)
    cond = (rng.random((3, 1, 32, 32)) * (rng.random((3, 1, 32, 32)) > 0.3)).astype(np.float32)
    ens_rest, ens_map = quality.healing_restorer(lambda jobs: run_slices(dens, jobs, plan, seed=0, batch_size=8))(cond)
    outs = [fn(cond) for fn in quality.member_restorers(dens, plan, 8)]
    np.testing.assert_allclose(np.mean([o[0] for o in outs], axis=0), ens_rest, atol=1e-6)
    np.testing.assert_allclose(np.mean([o[1] for o in outs], axis=0), ens_map, atol=1e-6)
    # what --per-member reports as the ensemble: the mean of the members' outputs
    mean_rest, mean_map = quality.members_mean(quality.member_restorers(dens, plan, 8))(cond)
    np.testing.assert_allclose(mean_rest, ens_rest, atol=1e-6)
    np.testing.assert_allclose(mean_map, ens_map, atol=1e-6)
    # the members differ from each other (else the equality above would prove nothing)
    assert np.abs(outs[0][0] - outs[1][0]).max() > 1e-3


def test_remembering_restores_each_distinct_input_once():
    quality = _quality_module()
    calls = []

    def restore(cond):
        calls.append(cond.copy())
        return cond * 2, cond[:, 0] + 1

    fn = quality.remembering(restore)
    a, b = np.zeros((2, 1, 4, 4), np.float32), np.ones((2, 1, 4, 4), np.float32)
    first = fn(a)
    assert fn(a.copy())[0] is first[0] and len(calls) == 1  # equal content: remembered
    np.testing.assert_array_equal(fn(b)[0], b * 2)  # new content: restored
    assert len(calls) == 2


# ------------------------------------------------- the report without running a network
# what is skipped is said, empty classes read "–", and the versions line names the CPU


def test_synthetic_without_ixi_data_is_reported_as_not_run(tmp_path):
    data, out = tmp_path / "emptydata", tmp_path / "out"
    data.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--models", str(REPO / "examples" / "models"),
                           "--data", str(data), "--out", str(out), "--synthetic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    reason = report["synthetic"]["skipped"]
    assert str(data / "ixi-t1") in reason and "not found" in reason
    md = (out / "quality.md").read_text()
    assert f"not run: {reason}" in md and f"not run: {reason}" in proc.stdout


def _empty_class_report() -> dict:
    quality = _quality_module()
    nan = float("nan")
    rows = [{"row": "ensemble", "ap_image": 0.5, "auroc": 0.5, "ap_pixel": 0.4, "dice": 0.3}]
    region = {"label_values": [4], "counts": {"positive_pixels": 0},
              "rows": {"ensemble": {"ap_pixel": nan}, "members avg": {"ap_pixel": nan},
                       "members max": {"ap_pixel": nan}},
              "baselines": {name: {"ap_pixel": nan} for name in (*quality.BASELINES, "chance")}}
    return {"date": "d", "command": "c", "versions": {}, "lesions": {"brats-t1c": {
        "evaluation": {"protocol": "benchmark", "description": "x", "counts": {}, "rows": rows},
        "baselines": {"chance": {"ap_pixel": 0.1}}, "regions": {"enhancing tumour": region}}}}


def test_empty_label_class_prints_dashes_not_nan(tmp_path):
    quality = _quality_module()
    quality.write_markdown(_empty_class_report(), tmp_path / "quality.md")
    md = (tmp_path / "quality.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| enhancing tumour (4) |")]
    assert "nan" not in line
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "–" and cells[3] == "– / –"


def test_versions_name_the_cpu():
    versions = _quality_module()._versions()
    assert versions["cpu"]  # platform.processor() alone is '' on Linux


def test_healing_slices_are_the_held_out_subjects_thinned_evenly(tmp_path):
    """The healing metric runs on the subjects condiff-train holds out (the last ones in its case order),
    never on training subjects, and --max-slices keeps slices spread over the whole stack."""
    quality = _quality_module()
    from condiff.preprocess import PreprocessConfig
    from condiff.train import data as tdata

    folder = quality.make_smoke_healthy(tmp_path, n_subjects=3)
    pre = PreprocessConfig(modality="mri", image_size=32, fov_mm=64.0, normalisation="percentile",
                           use_mask=True).to_dict()
    names, full = quality.held_out_slices(pre, folder, holdout=1, max_slices=None)
    cases = tdata.list_cases(folder)
    trained = {c.name for c in tdata._training_cases(cases, 1)}
    assert names == [cases[-1].name] and not set(names) & trained
    n = len(full)
    assert n >= 5
    k = 3
    _, thin = quality.held_out_slices(pre, folder, holdout=1, max_slices=k)
    picked = [next(i for i in range(n) if np.array_equal(full[i], s)) for s in thin]
    assert picked[0] == 0 and picked[-1] == n - 1 and picked == sorted(picked) and len(picked) == k


def test_healing_table_cells_sit_under_their_headers(tmp_path):
    quality = _quality_module()
    row = {"task": 2, "removed": 0.111, "copier_removed": 0.222, "clean_error": 0.333, "ap": 0.444,
           "chance": 0.055, "n_slices": 7}
    report = {"date": "d", "command": "c", "versions": {}, "lesions": {},
              "synthetic": {"n_clean_slices": 7, "subjects": ["s"], "tasks": {"sink": row}}}
    quality.write_markdown(report, tmp_path / "quality.md")
    lines = (tmp_path / "quality.md").read_text().splitlines()
    (head,) = [x for x in lines if x.startswith("| task | removed")]
    (body,) = [x for x in lines if x.startswith("| 2 sink |")]
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in body.strip("|").split("|")]))
    assert cells == {"task": "2 sink", "removed": "0.111", "copier reference": "0.222",
                     "own error on healthy input": "0.333", "map AP": "0.444", "chance": "0.055", "slices": "7"}


def test_healing_slices_hold_a_real_brain_section(tmp_path):
    """Slices whose brain mask covers 15 % of the model's field of view or less (the ends of the brain) are
    left out; oracle: the contract's own foreground of each prepared slice."""
    import nibabel as nib

    quality = _quality_module()
    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import PreprocessConfig, prepare_volume

    folder = tmp_path / "ixi-t1"
    folder.mkdir()
    x, y, z = np.mgrid[:40, :40, :14]
    brain = ((x - 20) / 16) ** 2 + ((y - 20) / 14) ** 2 + ((z - 7) / 7.5) ** 2 <= 1  # tapers towards both ends
    img = np.where(brain, 0.5 + 0.1 * np.sin(x / 3.0), 0.0).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), folder / "IXI001-T1.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), aff), folder / "IXI001-T1_brainmask.nii.gz")
    cfg = PreprocessConfig(modality="mri", image_size=32, fov_mm=64.0, normalisation="percentile", use_mask=True)
    _, got = quality.held_out_slices(cfg.to_dict(), folder, holdout=1, max_slices=None)
    vol = read_volume(folder / "IXI001-T1.nii.gz")
    prep = prepare_volume(vol, cfg, mask=read_mask(folder / "IXI001-T1_brainmask.nii.gz", vol))
    share = prep.foreground.reshape(len(prep.slices), -1).mean(axis=1)
    assert (share <= 0.15).any() and (share > 0.15).any()  # the phantom has both kinds
    np.testing.assert_array_equal(got, prep.slices[share > 0.15])
