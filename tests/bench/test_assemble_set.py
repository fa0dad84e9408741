"""bench/assemble_set.py: members of separate runs become one fp16 set that loads and checks out."""
import importlib.util
from pathlib import Path

import pytest
import torch

from condiff.config import ModelConfig, preset
from condiff.modelset import load_model, open_model_set, save_model
from condiff.unet import ConditionalUNet

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("assemble_set", REPO / "bench" / "assemble_set.py")
assemble_set = importlib.util.module_from_spec(spec)
spec.loader.exec_module(assemble_set)


def _member(folder, seed, fold, modality="mri"):
    torch.manual_seed(seed)
    cfg = preset("tiny", 1, sample_size=32)
    return save_model(folder, ConditionalUNet(cfg), ModelConfig(unet=cfg, preprocessing={"modality": modality},
                                                                fold=fold))


def test_members_of_separate_runs_become_one_fp16_set(tmp_path):
    members = [_member(tmp_path / "run-a" / "fold0", 1, 0), _member(tmp_path / "run-b" / "fold0", 2, 0),
               _member(tmp_path / "run-c" / "fold9", 3, 9)]
    out = tmp_path / "set"
    assert assemble_set.main(["--out", str(out), "--name", "three runs", *map(str, members)]) == 0
    ms = open_model_set(out)
    assert [d.name for d in ms.member_dirs] == ["fold0", "fold0b", "fold9"]
    assert [c.fold for c in ms.configs] == [0, 0, 9]
    for src, dst in zip(members, ms.member_dirs):
        a, _ = load_model(src)
        b, _ = load_model(dst)
        for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert vb.dtype == torch.float32 and torch.equal(vb, va.half().float()), k  # stored fp16, loaded fp32
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(SystemExit, match="exists"):
        assemble_set.assemble(out, members, "again")


def test_members_with_other_preprocessing_are_refused_by_name(tmp_path):
    a = _member(tmp_path / "a" / "fold0", 1, 0)
    b = _member(tmp_path / "b" / "fold1", 2, 1, modality="rgb")
    with pytest.raises(SystemExit, match=str(b)):
        assemble_set.assemble(tmp_path / "set", [a, b], "mixed")
    assert not (tmp_path / "set").exists()


def test_landmarks_are_fitted_on_the_recorded_training_subjects(tmp_path):
    import nibabel as nib
    import numpy as np

    from condiff.preprocess import LANDMARK_PERCENTILES

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    brain = np.zeros((24, 24, 6), bool)
    brain[3:21, 3:21, 1:5] = True
    scans = {}
    # Different histogram shapes (the percentile step removes mere scale), so fitting on the held-out
    # subject too would change the landmarks.
    for name, shape in (("subj-a", 3.0), ("subj-b", 6.0), ("subj-held-out", 0.7)):
        vol = np.where(brain, rng.gamma(shape, 100.0, brain.shape), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), data / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), np.eye(4)), data / f"{name}_brainmask.nii.gz")
        scans[name] = vol
    pre = {"modality": "mri", "normalisation": "percentile", "use_mask": True, "image_size": 32}
    trained = {"data": {"train": {"subjects": ["subj-a", "subj-b"]}, "mask_pattern": "{dir}/{stem}_brainmask.nii.gz"}}
    members = []
    for i, fold in enumerate((0, 5)):
        torch.manual_seed(i)
        cfg = preset("tiny", 1, sample_size=32)
        members.append(save_model(tmp_path / f"run{fold}" / f"fold{fold}", ConditionalUNet(cfg),
                                  ModelConfig(unet=cfg, preprocessing=pre, fold=fold, trained=trained)))
    out = tmp_path / "set"
    assert assemble_set.main(["--out", str(out), "--landmarks", str(data), *map(str, members)]) == 0
    ms = open_model_set(out)
    expect = []
    for name in ("subj-a", "subj-b"):  # numpy oracle: percentiles of the percentile-scaled brain, averaged
        v = scans[name][brain].astype(np.float64)
        lo, hi = np.percentile(v, (0.5, 99.5))
        expect.append(np.percentile(np.clip((v - lo) / (hi - lo), 0, 1), LANDMARK_PERCENTILES))
    for c in ms.configs:
        assert c.preprocessing["landmarks"] == pytest.approx(np.mean(expect, axis=0).tolist(), abs=1e-6)
        assert c.trained["landmarks_added"]["after_training"] is True
    # A folder without the recorded subjects is refused by name.
    (data / "subj-b.nii.gz").unlink()
    with pytest.raises(SystemExit, match="subj-b"):
        assemble_set.assemble(tmp_path / "set2", members, "x", landmarks_data=data)
    assert not (tmp_path / "set2").exists()
