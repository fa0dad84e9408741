"""Model folders and sets: round trips, validation, and the diffusers import."""
import json

import pytest
import safetensors.torch  # noqa: F401  (diffusers 0.24's save_pretrained calls it without importing it)
import torch

from condiff.config import ModelConfig, preset
from condiff.errors import ModelFolderError, ModelSetError
from condiff.modelset import load_model, open_model_set, save_model, save_model_set
from condiff.unet import ConditionalUNet


def _model(seed=0, name="tiny"):
    torch.manual_seed(seed)
    cfg = preset(name, 1, sample_size=32)
    return ConditionalUNet(cfg).eval(), ModelConfig(unet=cfg, preprocessing={"modality": "mri"}, fold=seed)


def _out(m):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 32, 32, generator=g)
    with torch.no_grad():
        return m(x, x.abs(), torch.tensor([3, 900]))


def test_save_load_round_trip_is_exact(tmp_path):
    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    m2, cfg2 = load_model(tmp_path / "m")
    assert cfg2.to_dict() == cfg.to_dict()
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(_out(m), _out(m2))


def test_unknown_schema_major_is_refused(tmp_path):
    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    doc = json.loads((tmp_path / "m/config.json").read_text())
    doc["schema"] = "condiff.model/2"
    (tmp_path / "m/config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFolderError, match="condiff.model/2"):
        load_model(tmp_path / "m")


def test_shape_mismatch_and_extra_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    state = load_file(str(tmp_path / "m/model.safetensors"))
    state["conv_in.weight"] = torch.zeros(16, 2, 5, 5)
    save_file(state, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(ModelFolderError, match="conv_in.weight"):
        load_model(tmp_path / "m")
    state = {k: v for k, v in load_file(str(tmp_path / "m/model.safetensors")).items()}
    save_model(tmp_path / "m", m, cfg)
    state = load_file(str(tmp_path / "m/model.safetensors"))
    state["surprise"] = torch.zeros(1)
    save_file(state, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(ModelFolderError, match="surprise"):
        load_model(tmp_path / "m")


def test_pickle_only_folder_is_refused(tmp_path):
    d = tmp_path / "m"
    m, cfg = _model()
    save_model(d, m, cfg)
    (d / "model.safetensors").unlink()
    torch.save(m.state_dict(), d / "model.ckpt")
    with pytest.raises(ModelFolderError, match="never loaded"):
        load_model(d)


def test_model_set_digest_and_consistency(tmp_path):
    for i in range(3):
        m, cfg = _model(i)
        save_model(tmp_path / f"fold{i}", m, cfg)
    save_model_set(tmp_path, [tmp_path / f"fold{i}" for i in range(3)])
    ms = open_model_set(tmp_path)
    assert len(ms) == 3 and ms.image_channels == 1 and len(ms.digest) == 64
    # tamper with one member's weights
    m, cfg = _model(9)
    save_model(tmp_path / "fold1", m, cfg)
    with pytest.raises(ModelSetError, match="digest"):
        open_model_set(tmp_path)


def test_model_set_refuses_mixed_preprocessing(tmp_path):
    m, cfg = _model(0)
    save_model(tmp_path / "a", m, cfg)
    cfg.preprocessing = {"modality": "rgb"}
    save_model(tmp_path / "b", m, cfg)
    save_model_set(tmp_path, [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ModelSetError, match="preprocessing"):
        open_model_set(tmp_path)


def _perturbed_diffusers_unet(diffusers, cfg, seed: int, scale: float):
    """A diffusers UNet2DModel of ``cfg`` whose weights are moved off their initial values (zero-initialised
    layers included), so an import that drops or swaps any tensor changes the output."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


def _assert_same_network(ours, ref, seed: int, t: tuple[int, int]):
    """Every tensor equal, and ours(x_t, cond, t) equals diffusers on the channel-concatenated input."""
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, c, torch.tensor(t)), ref(torch.cat([x, c], 1), torch.tensor(t)).sample,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_diffusers_folder_import_is_lossless(tmp_path, fmt):
    diffusers = pytest.importorskip("diffusers")
    from condiff.export.diffusers_import import import_diffusers_unet

    cfg = preset("tiny", 1, sample_size=32)
    ref = _perturbed_diffusers_unet(diffusers, cfg, seed=1, scale=0.01)
    ref.save_pretrained(tmp_path / "unet_ema", safe_serialization=(fmt == "safetensors"))
    import_diffusers_unet(tmp_path / "unet_ema", tmp_path / "ours")
    ours, _ = load_model(tmp_path / "ours")
    _assert_same_network(ours, ref, seed=0, t=(10, 600))
    # saved again and reloaded: bit-identical
    save_model(tmp_path / "again", ours, open_model_set(tmp_path / "ours").configs[0])
    again, _ = load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_saving_identical_weights_gives_identical_bytes_in_every_process(tmp_path):
    """The safetensors library orders its metadata map differently per process; save_model writes a
    canonical header, so a re-saved set keeps its bytes and digest (resume trusts the digest)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = (
        "import sys, torch\n"
        "from condiff.config import ModelConfig, preset\n"
        "from condiff.modelset import save_model\n"
        "from condiff.unet import ConditionalUNet\n"
        "torch.manual_seed(0)\n"
        "cfg = preset('tiny', 1, sample_size=32)\n"
        "save_model(sys.argv[1], ConditionalUNet(cfg), ModelConfig(unet=cfg, preprocessing={'modality': 'mri', "
        "'image_size': 32}), dtype=torch.float16)\n"
    )
    blobs = []
    for k in range(4):  # four processes: four draws of the library's hash order
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{k}")], check=True)
        blobs.append((tmp_path / f"m{k}" / "model.safetensors").read_bytes())
    assert all(b == blobs[0] for b in blobs[1:])
    tensors = load_file(tmp_path / "m0" / "model.safetensors")  # still a valid file for the library
    torch.manual_seed(0)
    want = ConditionalUNet(preset("tiny", 1, sample_size=32)).state_dict()
    assert set(tensors) == set(want) and all(torch.equal(tensors[k], want[k].half()) for k in want)


def test_canonical_header_keeps_length_and_data():
    from safetensors.torch import save

    from condiff.modelset import canonical_safetensors

    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    one = save(t, metadata={"x": "1", "y": "2", "z": "3"})
    two = save(t, metadata={"z": "3", "x": "1", "y": "2"})
    c1, c2 = canonical_safetensors(one), canonical_safetensors(two)
    n = int.from_bytes(one[:8], "little")
    assert c1 == c2 and len(c1) == len(one) and c1[:8] == one[:8]
    assert c1[8 + n:] == one[8 + n:]  # the data buffer, byte for byte
    assert json.loads(c1[8:8 + n]) == json.loads(one[8:8 + n])


# ------------------------------------------------------------------ broken model sets: ModelSetError, never a traceback

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


def test_set_json_that_is_not_an_object_is_refused(tmp_path):
    _edit_set(_valid_set(tmp_path), lambda doc: [doc])
    err = _refused(tmp_path, "set.json", "not a JSON object", "an array")
    assert err.path == str(tmp_path / "set.json")


@pytest.mark.parametrize("members, fragment", [
    ({"fold0": "x"}, '"members" is not a list'),
    ("fold0", '"members" is not a list'),
])
def test_set_members_that_are_not_a_list_are_refused(tmp_path, members, fragment):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "members": members})
    err = _refused(tmp_path, "set.json", fragment)
    assert err.path == str(tmp_path / "set.json")


@pytest.mark.parametrize("member, fragment", [
    ("fold1", "member 2 is not an object"),
    (["fold1"], "member 2 is not an object"),
    ({"sha256": "0" * 64}, 'member 2 has no "path"'),
    ({"path": 1, "sha256": "0" * 64}, 'member 2 has a "path" that is not a string'),
    ({"path": None}, 'member 2 has a "path" that is not a string'),
    ({"path": "fold1\u0000x"}, 'member 2 has an unusable "path"'),
    ({"path": "  "}, 'member 2 has an unusable "path"'),
])
def test_set_member_without_a_usable_path_is_refused(tmp_path, member, fragment):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "members": [doc["members"][0], member]})
    err = _refused(tmp_path, "set.json", fragment)
    assert err.path == str(tmp_path / "set.json")


@pytest.mark.parametrize("schema", ["condiff.modelset/10", "condiff.modelset/1x", "condiff.modelset/2",
                                    "condiff.modelset/2.0", "condiff.modelset/1.2.3", "condiff.modelset/",
                                    "condiff.model/1", None, 1])
def test_set_schema_major_is_parsed_not_prefix_matched(tmp_path, schema):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "schema": schema})
    err = _refused(tmp_path, "set.json")
    assert err.path == str(tmp_path / "set.json")
    if schema in ("condiff.modelset/10", "condiff.modelset/2", "condiff.modelset/2.0"):
        assert f"schema {schema} is not supported by this condiff (reads condiff.modelset/1)" in str(err)
        assert "written by a newer condiff; upgrade condiff" in str(err)
    elif isinstance(schema, str) and schema.startswith("condiff.modelset/"):
        assert "unreadable schema version" in str(err)
    else:
        assert "no condiff model-set schema" in str(err)


@pytest.mark.parametrize("schema", ["condiff.modelset/1.7", "condiff.modelset/1.0", "condiff.modelset/1"])
def test_set_schema_same_major_other_minor_is_accepted(tmp_path, schema):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "schema": schema})
    ms = open_model_set(tmp_path)
    assert len(ms) == 2 and [d.name for d in ms.member_dirs] == ["fold0", "fold1"]


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "pytorch_model.bin", "last.ckpt", "state.pkl", "EMA.PT"])
def test_pickle_weights_beside_safetensors_in_a_set_member_are_refused(tmp_path, name):
    _valid_set(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "fold1" / name)
    assert (tmp_path / "fold1" / "model.safetensors").is_file()  # digest still matches set.json
    err = _refused(tmp_path, name, "pickle-format weight file", "condiff loads only safetensors",
                   "condiff-export --import-diffusers")
    assert err.path == str(tmp_path / "fold1" / name)


def test_pickle_weights_in_a_single_model_folder_are_refused(tmp_path):
    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    assert len(open_model_set(tmp_path / "m")) == 1
    torch.save(m.state_dict(), tmp_path / "m" / "model.pt")
    err = _refused(tmp_path / "m", "model.pt", "pickle-format weight file", "condiff loads only safetensors")
    assert err.path == str(tmp_path / "m" / "model.pt")


def test_exported_sidecars_in_a_member_stay_allowed(tmp_path):
    _valid_set(tmp_path)
    for name in ("model.onnx", "model.onnx.json", "model.fp16.plan", "model.fp16.plan.json", "model.onnx.data"):
        (tmp_path / "fold0" / name).write_bytes(b"not weights")
    (tmp_path / "fold0" / "notes").mkdir()
    (tmp_path / "fold0" / "notes" / "old.pt").write_bytes(b"below the top level")
    assert len(open_model_set(tmp_path)) == 2


def test_bundled_example_set_has_no_pickles_and_opens():
    from pathlib import Path

    from condiff.modelset import PICKLE_SUFFIXES

    root = Path(__file__).resolve().parents[2] / "examples" / "models"
    assert not [p for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    assert len(open_model_set(root)) == 3


def test_cli_list_valued_set_json_exits_2_naming_it(tmp_path):
    from click.testing import CliRunner

    from condiff.engine.cli import infer_main

    _edit_set(_valid_set(tmp_path / "set"), lambda doc: [doc])
    import numpy as np
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "in" / "scan.png")
    res = CliRunner().invoke(infer_main, [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--models",
                                          str(tmp_path / "set"), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert str(tmp_path / "set" / "set.json") in res.stderr and "not a JSON object" in res.stderr
    assert "Traceback" not in res.stderr


def test_non_finite_weights_are_refused_at_load_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    state["conv_in.bias"][:2] = float("inf")
    save_file(state, str(weights))
    with pytest.raises(ModelFolderError) as info:
        load_model(tmp_path / "m")
    message = info.value.message
    assert message.startswith(f"{weights}: holds 3 non-finite weights (NaN/Inf): the training diverged")
    assert "lower learning rate" in message and "earlier checkpoint" in message


def test_members_keep_the_order_set_json_lists_them_in(tmp_path):
    """--members indices and the records' member list follow set.json, not the folders' names."""
    _valid_set(tmp_path, n=3)
    _edit_set(tmp_path, lambda doc: {**doc, "members": [doc["members"][2], doc["members"][0], doc["members"][1]]})
    ms = open_model_set(tmp_path)
    assert [d.name for d in ms.member_dirs] == ["fold2", "fold0", "fold1"]
    assert [c.fold for c in ms.configs] == [2, 0, 1]


def test_a_set_whose_members_differ_in_size_or_noise_schedule_is_refused(tmp_path):
    from condiff.config import ScheduleConfig

    m, cfg = _model(0)
    save_model(tmp_path / "a", m, cfg)
    torch.manual_seed(1)
    big = preset("tiny", 1, sample_size=64)
    save_model(tmp_path / "b", ConditionalUNet(big), ModelConfig(unet=big, preprocessing=cfg.preprocessing, fold=1))
    save_model_set(tmp_path, [tmp_path / "a", tmp_path / "b"])
    _refused(tmp_path, "member has 1 channels at 64 px; the first member has 1 at 32")

    other = tmp_path / "sched"
    save_model(other / "a", m, cfg)
    cfg_b = ModelConfig(unet=cfg.unet, preprocessing=cfg.preprocessing, fold=1,
                        schedule=ScheduleConfig(beta_schedule="scaled_linear"))
    save_model(other / "b", m, cfg_b)
    save_model_set(other, [other / "a", other / "b"])
    _refused(other, "noise schedule differs")


@pytest.mark.parametrize("schema", ["condiff.modelset/0", "condiff.modelset/0.9"])
def test_an_older_set_schema_major_is_refused_too(tmp_path, schema):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "schema": schema})
    err = _refused(tmp_path, f"schema {schema} is not supported by this condiff (reads condiff.modelset/1)")
    assert "use a condiff release that reads condiff.modelset/0" in str(err)


@pytest.mark.parametrize("members", [[], None])
def test_a_set_without_members_is_refused(tmp_path, members):
    _edit_set(_valid_set(tmp_path), lambda doc: {**doc, "members": members})
    err = _refused(tmp_path, "set.json", "lists no members")
    assert err.path == str(tmp_path / "set.json")


def test_diffusers_folder_with_pre_0_15_attention_names_imports_to_the_same_network(tmp_path):
    """diffusers < 0.15 saved the attention layers as query/key/value/proj_attn: the import renames them
    (to_q/to_k/to_v/to_out.0), so the network computes what the renamed state computes in diffusers 0.24."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from condiff.export.diffusers_import import import_diffusers_unet

    cfg = preset("tiny", 1, sample_size=32)
    ref = _perturbed_diffusers_unet(diffusers, cfg, seed=2, scale=0.02)
    ref.save_pretrained(tmp_path / "unet_ema", safe_serialization=True)
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in old_names.items():
            if ".attentions." in k and new in k:
                k = k.replace(new, old)
        legacy[k] = v.contiguous()
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    import_diffusers_unet(tmp_path / "unet_ema", tmp_path / "ours")
    ours, _ = load_model(tmp_path / "ours")
    _assert_same_network(ours, ref, seed=1, t=(5, 700))


def test_diffusers_import_refuses_a_contract_for_other_slices_and_other_classes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from condiff.export.diffusers_import import import_diffusers_unet

    cfg = preset("tiny", 1, sample_size=32)
    diffusers.UNet2DModel(**cfg.to_diffusers()).save_pretrained(tmp_path / "unet_ema")
    with pytest.raises(ModelFolderError, match="1-channel 32-px slices, the preprocessing contract gives 1-channel 64-px"):
        import_diffusers_unet(tmp_path / "unet_ema", tmp_path / "o1",
                              preprocessing={"modality": "mri", "image_size": 64})
    assert not (tmp_path / "o1").exists()
    doc = json.loads((tmp_path / "unet_ema" / "config.json").read_text())
    (tmp_path / "unet_ema" / "config.json").write_text(json.dumps({**doc, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelFolderError, match="UNet2DConditionModel, condiff imports UNet2DModel only"):
        import_diffusers_unet(tmp_path / "unet_ema", tmp_path / "o2")


def test_diffusers_import_reads_the_safetensors_file_before_a_pickle_beside_it(tmp_path):
    """A folder holding both formats (diffusers wrote both for years) is imported from the safetensors file,
    so a damaged or stale .bin beside it is never unpickled."""
    diffusers = pytest.importorskip("diffusers")
    from condiff.export.diffusers_import import import_diffusers_unet

    cfg = preset("tiny", 1, sample_size=32)
    torch.manual_seed(3)
    ref = diffusers.UNet2DModel(**cfg.to_diffusers()).eval()
    ref.save_pretrained(tmp_path / "unet_ema", safe_serialization=True)
    (tmp_path / "unet_ema" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle at all")
    import_diffusers_unet(tmp_path / "unet_ema", tmp_path / "ours")
    ours, _ = load_model(tmp_path / "ours")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("member", ["../elsewhere/foreign", "fold0/../../x", "/abs/fold0", "..\\\\x"])
def test_a_member_outside_the_set_folder_is_refused(tmp_path, member):
    """condiff-export copied such a member to OUT/<its path>, i.e. outside OUT, overwriting what was there."""
    root = _valid_set(tmp_path / "set")

    def move(doc):
        doc["members"][1]["path"] = member
        return doc

    _edit_set(root, move)
    _refused(root, "leaves the set folder", repr(member))


def test_a_member_listed_twice_is_refused(tmp_path):
    """fold0 three times ran as a three-member ensemble of one network, each copy with its own noise."""
    root = _valid_set(tmp_path / "set")

    def twice(doc):
        doc["members"] = [doc["members"][0], {**doc["members"][0], "path": "./fold0/"}, doc["members"][1]]
        return doc

    _edit_set(root, twice)
    _refused(root, "member 2 ('./fold0/') is the same folder as member 1")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.uint8])
def test_weights_stored_as_integers_or_bools_are_refused(tmp_path, dtype):
    """They were cast to float and ran as wrong weights (an audit's bool weights: score 0.078 against 0.015)."""
    from safetensors.torch import load_file, save_file

    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["conv_in.weight"] = state["conv_in.weight"].to(dtype)
    save_file(state, str(weights))
    with pytest.raises(ModelFolderError) as info:
        load_model(tmp_path / "m")
    assert f"tensor conv_in.weight is stored as {str(dtype).replace('torch.', '')}" in info.value.message
    for ok in (torch.float16, torch.bfloat16, torch.float64):  # stored floats still load
        state["conv_in.weight"] = m.state_dict()["conv_in.weight"].to(ok)
        save_file(state, str(weights))
        load_model(tmp_path / "m")


@pytest.mark.parametrize("content, fragment", [
    (b"[1, 2]", "is not a JSON object (found an array)"),
    (b"null", "is not a JSON object"),
    (b'{"schema": "\xff"}', "invalid JSON"),
    (b'{"schema": NaN}', "NaN is not a JSON number"),
])
def test_a_config_that_is_not_a_json_object_is_refused_naming_it(tmp_path, content, fragment):
    m, cfg = _model()
    save_model(tmp_path / "m", m, cfg)
    (tmp_path / "m" / "config.json").write_bytes(content)
    with pytest.raises(ModelFolderError) as info:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m" / "config.json") in info.value.message and fragment in info.value.message


def test_unreadable_set_files_and_unmappable_weights_are_model_errors_not_tracebacks(tmp_path, monkeypatch):
    from pathlib import Path

    import safetensors.torch

    root = _valid_set(tmp_path / "set")
    real = Path.read_bytes

    def denied(self):
        if self.name == "set.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    _refused(root, "set.json", "cannot be read (Permission denied)")
    monkeypatch.setattr(Path, "read_bytes", real)

    def no_memory(path, *a, **k):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(safetensors.torch, "load_file", no_memory)
    with pytest.raises(ModelFolderError, match="cannot be mapped into memory"):
        load_model(root / "fold0")


def test_the_network_digest_follows_config_json_not_only_the_weights(tmp_path):
    """set.json's digest covers the weights only: a config edited in place (norm_eps) gave a new network
    whose results resume treated as current."""
    root = _valid_set(tmp_path / "set")
    before = open_model_set(root)
    cfg_path = root / "fold0" / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["unet"]["norm_eps"] = doc["unet"]["norm_eps"] * 10
    cfg_path.write_text(json.dumps(doc))
    after = open_model_set(root)
    assert after.digest == before.digest and after.network_digest != before.network_digest
