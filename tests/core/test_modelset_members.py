"""Model-set members and weights refused with messages naming the file (mutation audit 3)."""
import json

import pytest
import torch

from condiff.config import ModelConfig, preset
from condiff.errors import ModelFolderError, ModelSetError
from condiff.modelset import load_model, open_model_set, save_model, save_model_set
from condiff.unet import ConditionalUNet


def _model(seed=0, name="tiny"):  # test_modelset.py's helpers, copied
    torch.manual_seed(seed)
    cfg = preset(name, 1, sample_size=32)
    return ConditionalUNet(cfg).eval(), ModelConfig(unet=cfg, preprocessing={"modality": "mri"}, fold=seed)


def _valid_set(root, n=2):
    for i in range(n):
        m, cfg = _model(i)
        save_model(root / f"fold{i}", m, cfg)
    save_model_set(root, [root / f"fold{i}" for i in range(n)])
    assert len(open_model_set(root)) == n
    return root


def _edit_set(root, edit):
    doc = json.loads((root / "set.json").read_text())
    doc = edit(doc)
    (root / "set.json").write_text(json.dumps(doc))


def _refused(root, *fragments):
    with pytest.raises(ModelSetError) as info:
        open_model_set(root)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return info.value


def test_an_unreadable_config_json_is_a_model_error_naming_it(tmp_path, monkeypatch):
    from pathlib import Path

    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    real = Path.read_bytes

    def denied(self):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ModelFolderError) as info:
        load_model(tmp_path / "m")
    assert info.value.message.startswith(f"{tmp_path / 'm' / 'config.json'}: cannot be read (Permission denied)")


def test_several_non_float_tensors_are_counted_in_the_message(tmp_path):
    from safetensors.torch import load_file, save_file

    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    for key in ("conv_in.weight", "conv_in.bias", "conv_out.bias"):
        state[key] = state[key].to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(ModelFolderError) as info:
        load_model(tmp_path / "m")
    assert "tensor conv_in.bias is stored as int32 (and 2 more): weights must be" in info.value.message


def test_a_member_path_with_a_windows_drive_is_refused(tmp_path):
    root = _valid_set(tmp_path / "set")

    def drive(doc):
        doc["members"][1]["path"] = "C:\\models\\fold1"
        return doc

    _edit_set(root, drive)
    _refused(root, "leaves the set folder", "C:")


def test_a_member_listed_twice_through_a_symlink_is_refused(tmp_path):
    """One network under two names (a symlinked folder) would still count as two ensemble members."""
    root = _valid_set(tmp_path / "set")
    (root / "alias").symlink_to(root / "fold0", target_is_directory=True)

    def twice(doc):
        doc["members"] = [doc["members"][0], {**doc["members"][0], "path": "alias"}, doc["members"][1]]
        return doc

    _edit_set(root, twice)
    _refused(root, "member 2 ('alias') is the same folder as member 1")
