"""bench/healthy_response.py: label/healthy ratios, border bands, intensity of the top responders and
AP_p, checked against a direct numpy/scikit-learn recomputation from the written model-space files."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from _infer_helpers import FAST, invoke_infer, make_model_set, make_scans, one_torch_thread  # noqa: E402

spec = importlib.util.spec_from_file_location("healthy_response", REPO / "bench" / "healthy_response.py")
healthy_response = importlib.util.module_from_spec(spec)
spec.loader.exec_module(healthy_response)
LABELS = "{dir}/{stem}_seg.nii.gz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    models = make_model_set(root / "set", n_members=2)
    make_scans(root / "scans", n=2, with_masks=True)
    out = root / "out"
    with one_torch_thread():
        res = invoke_infer([root / "scans", "-o", out, "--models", models, *FAST, "--save-member-maps", "--mask", "none"])
    assert res.exit_code == 0, res.output + res.stderr
    return out


def _direct(out: Path):
    """Pooled map, member maps, label, input and brain straight from the npz files and label volumes."""
    from condiff.engine.writer import load_records
    from condiff.preprocess import mask_to_slices
    from condiff.io import volumes

    parts = []
    for rec in sorted(load_records(out), key=lambda r: r["case"]):
        z = np.load(out / "model_space" / f"{rec['case']}.npz")
        keep = z["slices"].reshape(len(z["slices"]), -1).sum(axis=1) != 0
        src = Path(rec["input"])
        label_path = src.with_name(src.name.replace(".nii.gz", "_seg.nii.gz"))
        like = volumes.read_volume_or_slice(src)
        label = mask_to_slices(volumes.read_mask(label_path, like), rec["geometry"])[keep]
        parts.append((z["maps"][keep], z["member_maps"][:, keep], label, z["slices"][keep, 0], z["foreground"][keep]))
    return [np.concatenate([p[i] for p in parts], axis=1 if i == 1 else 0) for i in range(5)]


def test_report_matches_a_direct_recomputation(run, tmp_path):
    from sklearn.metrics import average_precision_score

    assert healthy_response.main([str(run), "--labels", LABELS, "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "healthy_response.json").read_text())
    assert (tmp_path / "healthy_response.md").read_text().count("| member ") == 2
    amap, members, label, x, brain = _direct(run)
    amap, label, brain = amap.reshape(x.shape), label.reshape(x.shape).astype(bool), brain.reshape(x.shape).astype(bool)
    healthy = brain & ~label
    assert label.any() and healthy.any()
    p = report["pooled"]
    want = amap[label].astype(np.float64).mean() / amap[healthy].astype(np.float64).mean()
    assert p["ensemble"]["ratio"] == pytest.approx(want, rel=1e-5)
    for m, row in zip(members, p["members"]):
        m = m.reshape(x.shape)
        assert row["healthy_mean"] == pytest.approx(float(m[healthy].mean()), rel=1e-5)
    assert sum(b["pixels"] for b in p["border_bands"]) == healthy.sum()  # the bands split healthy brain
    assert p["intensity"]["healthy_all"]["dark_share"] == pytest.approx(float((x[healthy] < 0.3).mean()))
    top = p["intensity"]["healthy_top"]["pixels"]
    assert 0.04 * healthy.sum() <= top <= 0.06 * healthy.sum() + 1
    assert p["ap_pixel"]["map"] == pytest.approx(average_precision_score(label.ravel(), amap.ravel()), rel=1e-6)
    assert p["ap_pixel"]["bright"] == pytest.approx(average_precision_score(label.ravel(), (x * brain).ravel()), rel=1e-6)
    assert set(report["cases"]) == {"case0", "case1"}


def test_without_member_maps_it_says_what_to_rerun(tmp_path):
    models = make_model_set(tmp_path / "set", n_members=1)
    make_scans(tmp_path / "scans", n=1, with_masks=True)
    with one_torch_thread():
        res = invoke_infer([tmp_path / "scans", "-o", tmp_path / "out", "--models", models, *FAST, "--save-model-space"])
    assert res.exit_code == 0
    with pytest.raises(SystemExit, match="--save-member-maps"):
        healthy_response.main([str(tmp_path / "out"), "--labels", LABELS])
