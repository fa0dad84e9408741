"""Model-set members and weights refused with messages naming the file (mutation audit 3)."""
import pytest
import torch

from condiff.errors import ModelFolderError
from condiff.modelset import load_model, save_model
from test_modelset import _edit_set, _model, _refused, _valid_set  # its helpers


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
