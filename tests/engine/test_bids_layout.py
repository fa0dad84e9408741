"""``--layout bids``: a BIDS derivative dataset whose maps equal the flat layout's, byte for byte."""
import hashlib
import json
from pathlib import Path

import pytest

from _infer_helpers import FAST, brain_like, invoke_infer, make_model_set, one_torch_thread, write_nifti
from condiff.engine.bids import derived_stem, parse_name
from condiff.io.cases import Case


def test_bids_names_parse_and_derive():
    name = parse_name("sub-01_ses-pre_acq-mprage_run-2_T1w.nii.gz")
    assert name.entities == (("sub", "01"), ("ses", "pre"), ("acq", "mprage"), ("run", "2"))
    assert name.suffix == "T1w" and name.extension == ".nii.gz"
    assert derived_stem(name, "anomaly") == "sub-01_ses-pre_acq-mprage_run-2_desc-anomaly_T1w"
    # an existing desc stays inside the new label, still last before the suffix
    assert derived_stem(parse_name("sub-01_desc-preproc_run-1_T1w.nii"), "restored") == \
        "sub-01_run-1_desc-preprocRestored_T1w"
    for bad in ("T1w.nii.gz", "ses-1_sub-01_T1w.nii.gz", "sub-01_T1w.png", "sub-01_run-1_run-2_T1w.nii.gz",
                "sub-01_acq_T1w.nii.gz", "sub-0_1_T1w.nii.gz", "sub-01.nii.gz", "sub-01_T1-w.nii.gz"):
        assert parse_name(bad) is None, bad


def test_derivative_paths_follow_the_datatype_folder():
    from condiff.engine.bids import derivative_paths

    case = Case(name="x", path=Path("/data/sub-07/ses-2/anat/sub-07_ses-2_FLAIR.nii"), kind="volume")
    assert derivative_paths(case) == {"map": "sub-07/ses-2/anat/sub-07_ses-2_desc-anomaly_FLAIR.nii",
                                      "restoration": "sub-07/ses-2/anat/sub-07_ses-2_desc-restored_FLAIR.nii"}
    loose = Case(name="x", path=Path("/elsewhere/sub-07_T1w.nii.gz"), kind="volume")
    assert derivative_paths(loose)["map"] == "sub-07/anat/sub-07_desc-anomaly_T1w.nii.gz"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dataset(tmp_path):
    """A small BIDS dataset (two subjects, one with a session) plus a derivatives/ folder holding a
    NIfTI that must never be read as an input."""
    root = tmp_path / "ds"
    for k, rel in enumerate(("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz")):
        img, _ = brain_like(seed=k)
        write_nifti(root / rel, img)
    img, _ = brain_like(seed=5)
    write_nifti(root / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_desc-x_T1w.nii.gz", img)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    return root


def test_bids_run_writes_a_derivative_dataset_with_the_flat_runs_bytes(tmp_path, dataset):
    models = make_model_set(tmp_path / "set", n_members=2)
    out = dataset / "derivatives" / "condiff"
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", out, "--models", models, *FAST, "--layout", "bids"])
        assert res.exit_code == 0, res.output + res.stderr
        assert "2 done" in res.output  # the derivatives/ NIfTI was not an input
        # ... and is said to be left out as what it is, not as a mask
        assert "1 file(s) in the dataset's derivatives/, sourcedata/, code/ skipped" in res.output
        assert "masks or label maps" not in res.output
        log = (out / "condiff.log").read_text()
        assert "sub-01_desc-x_T1w.nii.gz: skipped (matches derivatives/*)" in log and "a mask or label map" not in log
        # the flat layout, given the subjects' folders, writes the same bytes
        flat = invoke_infer([dataset / "sub-01", dataset / "sub-02", "-o", tmp_path / "flat", "--models", models, *FAST])
        assert flat.exit_code == 0, flat.output
    for flat_name, bids_name in (("ses-1/anat/sub-01_ses-1_T1w", "sub-01/ses-1/anat/sub-01_ses-1_desc-{}_T1w"),
                                 ("anat/sub-02_T1w", "sub-02/anat/sub-02_desc-{}_T1w")):
        assert _sha(out / (bids_name.format("anomaly") + ".nii.gz")) == \
            _sha(tmp_path / "flat" / "maps" / (flat_name + ".nii.gz"))
        assert _sha(out / (bids_name.format("restored") + ".nii.gz")) == \
            _sha(tmp_path / "flat" / "restorations" / (flat_name + ".nii.gz"))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "condiff"
    assert desc["SourceDatasets"] == [{"URL": dataset.resolve().as_uri()}]
    ignored = (out / ".bidsignore").read_text().split()
    assert {"overlays/", "records/", "cases.csv", "run*.json"} <= set(ignored)
    assert not (out / "maps").exists() and not (out / "restorations").exists()
    # every file condiff wrote is either BIDS (sub-*, dataset_description.json) or listed in .bidsignore
    import fnmatch
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith("sub-") and rel not in ("dataset_description.json", ".bidsignore"):
            assert any(fnmatch.fnmatch(rel, pat.rstrip("/") + ("/*" if pat.endswith("/") else "")) for pat in ignored), rel
    # the records point at the BIDS paths, so a rerun resumes and condiff-eval finds the maps
    with one_torch_thread():
        again = invoke_infer([dataset, "-o", out, "--models", models, *FAST, "--layout", "bids"])
    assert again.exit_code == 0 and "0 done, 2 already done" in again.output
    rec = json.loads((out / "records" / "sub-02" / "anat" / "sub-02_T1w.json").read_text())
    assert rec["outputs"]["map"]["path"] == "sub-02/anat/sub-02_desc-anomaly_T1w.nii.gz"


def test_bids_layout_refuses_non_bids_inputs_and_colliding_names(tmp_path, dataset):
    models = make_model_set(tmp_path / "set", n_members=1)
    img, _ = brain_like(seed=0)
    write_nifti(tmp_path / "loose" / "scan1.nii.gz", img)
    res = invoke_infer([tmp_path / "loose", "-o", tmp_path / "o1", "--models", models, *FAST, "--layout", "bids"])
    assert res.exit_code == 2 and "scan1.nii.gz: not a BIDS-named NIfTI volume" in res.stderr
    write_nifti(tmp_path / "a" / "sub-09" / "anat" / "sub-09_T1w.nii.gz", img)  # different case names,
    write_nifti(tmp_path / "b" / "sub-09_T1w.nii.gz", img)                      # one BIDS output name
    res = invoke_infer([tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o2", "--models", models, *FAST,
                        "--layout", "bids"])
    assert res.exit_code == 2 and "would both write sub-09/anat/sub-09_desc-anomaly_T1w.nii.gz" in res.stderr
    # only the dataset's derivatives/ may hold OUT; anywhere else inside the inputs is refused as before
    res = invoke_infer([dataset, "-o", dataset / "sub-01" / "out", "--models", models, *FAST, "--layout", "bids"])
    assert res.exit_code == 2 and "inside the input folder" in res.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("folder, expected", [("func", "func"), ("dwi", "dwi"), ("perf", "perf"), ("anat", "anat"),
                                              ("scans", "anat"), ("ses-1", "anat")])
def test_derivatives_keep_the_sources_datatype_folder(folder, expected):
    from condiff.engine.bids import derivative_paths

    case = Case(name="x", path=Path(f"/data/sub-03/{folder}/sub-03_run-1_bold.nii.gz"), kind="volume")
    assert derivative_paths(case)["map"] == f"sub-03/{expected}/sub-03_run-1_desc-anomaly_bold.nii.gz"


def test_names_that_differ_only_in_letter_case_collide():
    """On a case-insensitive file system (macOS, Windows shares) the two maps would be one file."""
    from condiff.engine.bids import check_cases

    a = Case(name="a/sub-09_T1w", path=Path("/a/sub-09/anat/sub-09_T1w.nii.gz"), kind="volume")
    b = Case(name="b/sub-09_t1w", path=Path("/b/sub-09_t1w.nii.gz"), kind="volume")
    with pytest.raises(ValueError, match="would both write"):
        check_cases([a, b])
    check_cases([a])


def test_a_bids_datasets_own_folders_and_label_maps_are_never_inputs_in_any_layout(tmp_path, dataset):
    """From a BIDS user's audit: the flat layout (and condiff-train) read derivatives/, sourcedata/, code/
    of a dataset root, fMRIPrep _dseg/_probseg label maps were analysed as scans, --dry-run called the
    reserved folders' files masks, and a T2w beside the T1w ran without a word."""
    from condiff.io.cases import discover

    img, _ = brain_like(seed=6)
    write_nifti(dataset / "sourcedata" / "sub-01" / "raw_T1.nii.gz", img)
    write_nifti(dataset / "code" / "template.nii.gz", img)
    write_nifti(dataset / "sub-02" / "anat" / "sub-02_dseg.nii.gz", img)
    write_nifti(dataset / "sub-02" / "anat" / "sub-02_label-GM_probseg.nii.gz", img)
    write_nifti(dataset / "sub-02" / "anat" / "sub-02_T2w.nii.gz", img)
    excluded = []
    names = [c.name for c in discover([dataset], excluded=excluded)]
    assert names == ["sub-01/ses-1/anat/sub-01_ses-1_T1w", "sub-02/anat/sub-02_T1w", "sub-02/anat/sub-02_T2w"]
    assert {p.name for p in excluded} == {"sub-01_desc-x_T1w.nii.gz", "raw_T1.nii.gz", "template.nii.gz",
                                          "sub-02_dseg.nii.gz", "sub-02_label-GM_probseg.nii.gz"}
    # the same folder without dataset_description.json is no BIDS root: its folders are ordinary input
    (dataset / "dataset_description.json").unlink()
    assert "code/template" in [c.name for c in discover([dataset])]
    (dataset / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')

    models = make_model_set(tmp_path / "set", n_members=1)
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", tmp_path / "out", "--models", models, *FAST, "--dry-run"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "template.nii.gz  (in a BIDS dataset's derivatives/, sourcedata/ or code/)" in res.output
    assert "sub-02_dseg.nii.gz  (a mask or label map by its name)" in res.output
    assert "2 file(s) excluded as masks or label maps, 3 file(s) in the dataset's derivatives/" in res.output
    # a mask inside a derivative dataset given as the input is a mask by its name, not a reserved-folder file
    _, brain = brain_like(seed=1)
    prep = dataset / "derivatives" / "prep"
    write_nifti(prep / "sub-01" / "anat" / "sub-01_T1w.nii.gz", img)
    write_nifti(prep / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz", brain.astype("uint8"))
    with one_torch_thread():
        res2 = invoke_infer([prep, "-o", tmp_path / "out2", "--models", models, *FAST, "--dry-run"])
    assert "sub-01_desc-brain_mask.nii.gz  (a mask or label map by its name)" in res2.output, res2.output
    assert "in the dataset's derivatives/" not in res2.output
    assert "several BIDS contrasts (T1w: 2, T2w: 1)" in res.stderr
    # flat layout, OUT inside the dataset's derivatives/: allowed at a BIDS root, never read back
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", dataset / "derivatives" / "flat", "--models", models, *FAST])
    assert res.exit_code == 0 and "3 done" in res.output, res.output + res.stderr


def test_a_root_placeholder_keeps_a_moved_datasets_mask_pattern_and_its_resume(tmp_path, dataset):
    """A derivative-mask pattern that named the dataset's path made a moved dataset 'another method'
    (exit 2, only --overwrite got out); with {root} the pattern names no path and the run resumes."""
    import shutil

    from condiff.io.cases import find_mask

    for k, rel in enumerate(("sub-01/ses-1/anat/sub-01_ses-1", "sub-02/anat/sub-02")):
        _, brain = brain_like(seed=k)
        write_nifti(dataset / "derivatives" / "fmriprep" / f"{rel}_desc-brain_mask.nii.gz", brain.astype("uint8"))
    pattern = "{root}/derivatives/fmriprep/{casedir}/{base}_desc-brain_mask.nii.gz"
    case = Case(name="sub-02/anat/sub-02_T1w", path=dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz", kind="volume")
    assert find_mask(case, pattern) == dataset / "derivatives" / "fmriprep" / "sub-02" / "anat" / "sub-02_desc-brain_mask.nii.gz"
    direct = Case(name="sub-02_T1w", path=case.path, kind="volume")  # a file given directly: its folder
    assert find_mask(direct, "{root}/{stem}.nii.gz") == case.path

    models = make_model_set(tmp_path / "set", n_members=1)
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", tmp_path / "out", "--models", models, *FAST, "--mask", pattern])
        assert res.exit_code == 0 and "2 done" in res.output, res.output + res.stderr
        moved = tmp_path / "moved"
        shutil.move(dataset, moved)
        res = invoke_infer([moved, "-o", tmp_path / "out", "--models", models, *FAST, "--mask", pattern])
    assert res.exit_code == 0 and "0 done, 2 already done" in res.output, res.output + res.stderr
    rec = json.loads((tmp_path / "out" / "records" / "sub-02" / "anat" / "sub-02_T1w.json").read_text())
    assert rec["mask"].startswith(str(moved))  # the record follows the data, so condiff-eval finds the mask


def _resolve_bids_uri(uri: str, out: Path) -> Path:
    """A BIDS URI resolved as the spec says: ``bids::path`` in this dataset, ``bids:name:path`` through
    dataset_description.json's DatasetLinks (a path relative to OUT, or a file URI)."""
    from urllib.parse import unquote, urlparse

    _, name, rel = uri.split(":", 2)
    if name == "":
        return out / rel
    target = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"][name]
    base = Path(unquote(urlparse(target).path)) if target.startswith("file:") else out / target
    return (base / rel).resolve()


def test_bids_sidecars_name_their_sources_and_follow_moves_and_failures(tmp_path, dataset):
    """Each map and restoration has a sidecar whose Sources resolve (through DatasetLinks) to the very input
    and mask used; a dataset moved with OUT inside keeps them valid; a case that fails loses them."""
    import shutil

    _, brain = brain_like(seed=1)
    write_nifti(dataset / "derivatives" / "masks" / "sub-02" / "anat" / "sub-02_desc-brain_mask.nii.gz",
                brain.astype("uint8"))
    write_nifti(dataset / "derivatives" / "masks" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-brain_mask.nii.gz",
                brain_like(seed=0)[1].astype("uint8"))
    pattern = "{root}/derivatives/masks/{casedir}/{base}_desc-brain_mask.nii.gz"
    models = make_model_set(tmp_path / "set", n_members=1)
    out = dataset / "derivatives" / "condiff"
    user_json = out / "sub-02" / "anat" / "notes.json"  # not condiff's: never removed
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", out, "--models", models, *FAST, "--layout", "bids", "--mask", pattern])
        assert res.exit_code == 0 and "2 done" in res.output, res.output + res.stderr
        desc = json.loads((out / "dataset_description.json").read_text())
        assert desc["DatasetLinks"] == {"raw": "../.."}
        for rel, stem in (("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1_desc-{}_T1w"),
                          ("sub-02/anat/sub-02_T1w.nii.gz", "sub-02/anat/sub-02_desc-{}_T1w")):
            rec = json.loads((out / "records" / (rel[:-len(".nii.gz")] + ".json")).read_text())
            rest = json.loads((out / (stem.format("restored") + ".json")).read_text())
            amap = json.loads((out / (stem.format("anomaly") + ".json")).read_text())
            assert rest["Sources"] == [f"bids:raw:{rel}", f"bids:raw:{Path(rec['mask']).relative_to(dataset).as_posix()}"]
            assert amap["Sources"] == rest["Sources"] + [f"bids::{stem.format('restored')}.nii.gz"]
            resolved = [_resolve_bids_uri(u, out) for u in amap["Sources"]]
            assert resolved[:2] == [(dataset / rel).resolve(), Path(rec["mask"]).resolve()]
            assert _sha(resolved[2]) == rec["outputs"]["restoration"]["sha256"]
            assert (amap["Steps"], amap["Seed"], amap["ModelSetDigest"], amap["CaseScore"]) == \
                (rec["steps"], rec["seed"], rec["model_set_digest"], rec["score"])
            assert "anomaly map" in amap["Description"] and "restoration" in rest["Description"]
        user_json.write_text("{}")
        before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("sub-*/**/*.json")}
        assert len(before) == 5

        moved = tmp_path / "moved"
        shutil.move(dataset, moved)
        out = moved / "derivatives" / "condiff"
        res = invoke_infer([moved, "-o", out, "--models", models, *FAST, "--layout", "bids", "--mask", pattern])
        assert res.exit_code == 0 and "0 done, 2 already done" in res.output, res.output + res.stderr
        assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("sub-*/**/*.json")} == before
        assert _resolve_bids_uri("bids:raw:sub-02/anat/sub-02_T1w.nii.gz", out) == \
            (moved / "sub-02" / "anat" / "sub-02_T1w.nii.gz").resolve()

        (moved / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"not a NIfTI file")
        res = invoke_infer([moved, "-o", out, "--models", models, *FAST, "--layout", "bids", "--mask", pattern])
    assert res.exit_code == 1, res.output + res.stderr
    left = {p.relative_to(out).as_posix() for p in out.glob("sub-*/**/*.json")}
    assert left == {"sub-01/ses-1/anat/sub-01_ses-1_desc-anomaly_T1w.json",
                    "sub-01/ses-1/anat/sub-01_ses-1_desc-restored_T1w.json", "sub-02/anat/notes.json"}


def test_bids_sidecars_of_a_dataset_elsewhere_loose_files_and_merge(tmp_path, dataset):
    """OUT outside the dataset: the link is the dataset's file URI under its folder name and a digest;
    loose BIDS-named files outside any dataset have no Sources but their restoration; --merge rewrites
    sidecars that shards' runs made (here deleted)."""
    models = make_model_set(tmp_path / "set", n_members=1)
    loose = tmp_path / "loose" / "sub-09_T1w.nii.gz"
    write_nifti(loose, brain_like(seed=9)[0])
    out = tmp_path / "elsewhere"
    with one_torch_thread():
        for shard in ("0/2", "1/2"):
            res = invoke_infer([dataset, loose, "-o", out, "--models", models, *FAST, "--layout", "bids",
                                "--shard", shard])
            assert res.exit_code == 0, res.output + res.stderr
        sidecars = sorted(out.glob("sub-*/**/*.json"))
        assert len(sidecars) == 6
        texts = {p: p.read_bytes() for p in sidecars}
        for p in sidecars:
            p.unlink()
        res = invoke_infer(["--merge", out])
    assert res.exit_code == 0, res.output + res.stderr
    assert {p: p.read_bytes() for p in sorted(out.glob("sub-*/**/*.json"))} == texts
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    (name, target), = links.items()
    assert name.startswith("ds-") and len(name) == len("ds-") + 8 and target == dataset.resolve().as_uri()
    amap = json.loads((out / "sub-02" / "anat" / "sub-02_desc-anomaly_T1w.json").read_text())
    assert _resolve_bids_uri(amap["Sources"][0], out) == (dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz").resolve()
    loose_map = json.loads((out / "sub-09" / "anat" / "sub-09_desc-anomaly_T1w.json").read_text())
    assert loose_map["Sources"] == ["bids::sub-09/anat/sub-09_desc-restored_T1w.nii.gz"]
    assert "Sources" not in json.loads((out / "sub-09" / "anat" / "sub-09_desc-restored_T1w.json").read_text())


def test_flat_layout_writes_no_sidecars(tmp_path, dataset):
    models = make_model_set(tmp_path / "set", n_members=1)
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", tmp_path / "flat", "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert not list((tmp_path / "flat").glob("maps/**/*.json")) and not (tmp_path / "flat" / "sub-01").exists()


def test_sidecars_survive_a_merge_after_the_dataset_moved_and_an_older_view_of_the_records(tmp_path, dataset):
    """(review) A --merge after the dataset moved (records not yet repointed by a run) stripped Sources and
    DatasetLinks; a shard whose record list was older removed sidecars another shard had just written."""
    import shutil

    from condiff.engine import bids
    from condiff.engine.writer import load_records

    models = make_model_set(tmp_path / "set", n_members=1)
    out = dataset / "derivatives" / "condiff"
    with one_torch_thread():
        res = invoke_infer([dataset, "-o", out, "--models", models, *FAST, "--layout", "bids"])
    assert res.exit_code == 0, res.output + res.stderr
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("sub-*/**/*.json")}
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    records = load_records(out)
    bids.write_sidecars(out, [r for r in records if not r["case"].startswith("sub-02")])  # an older view
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("sub-*/**/*.json")} == before
    moved = tmp_path / "moved"
    shutil.move(dataset, moved)
    out = moved / "derivatives" / "condiff"
    res = invoke_infer(["--merge", out])
    assert res.exit_code == 0, res.output + res.stderr
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("sub-*/**/*.json")} == before
    assert json.loads((out / "dataset_description.json").read_text())["DatasetLinks"] == links
