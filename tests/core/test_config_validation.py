"""config.json values are checked when the config is read: a bad value is refused naming its field and
the allowed range (ValueError from the dataclasses, ModelFolderError naming config.json from
``read_config``, exit 2 from condiff-infer), instead of a ZeroDivisionError/TypeError traceback, a
multi-GiB allocation while the network is built, or "non-finite output" on every scan."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from condiff.config import ModelConfig, ScheduleConfig, UNetConfig, preset
from condiff.errors import ModelFolderError
from condiff.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from _infer_helpers import FAST, PREPROCESSING, invoke_infer, make_model_set, make_scans, one_torch_thread  # noqa: E402

TINY = preset("tiny", sample_size=32).to_dict()  # 16/32 channels, 8 groups, attention at 32 channels
NAN, INF = float("nan"), float("inf")

UNET_BAD = [
    ("norm_num_groups", 0, "1..4096"),
    ("norm_num_groups", "8", "1..4096"),
    ("norm_num_groups", 8.0, "1..4096"),
    ("norm_num_groups", True, "1..4096"),
    ("norm_num_groups", 3, "multiple of norm_num_groups=3"),
    ("block_out_channels", [-16, 32], "1..4096"),
    ("block_out_channels", [65536, 65536], "1..4096"),
    ("block_out_channels", [16, "32"], "1..4096"),
    ("block_out_channels", [16.5, 32], "1..4096"),
    ("block_out_channels", [4096, 4096], "M parameters"),  # each width allowed, together 100s of GiB
    ("block_out_channels", "16", "must be a list"),
    ("block_out_channels", [], "1..8 levels"),
    ("layers_per_block", 100000, "1..16"),
    ("layers_per_block", 0, "1..16"),
    ("layers_per_block", "2", "1..16"),
    ("norm_eps", "x", "(0, 1)"),
    ("norm_eps", NAN, "(0, 1)"),
    ("norm_eps", INF, "(0, 1)"),
    ("norm_eps", -1, "(0, 1)"),
    ("norm_eps", 0, "(0, 1)"),
    ("norm_eps", True, "(0, 1)"),
    ("flip_sin_to_cos", "no", "true or false"),
    ("flip_sin_to_cos", 1, "true or false"),
    ("add_attention", "yes", "true or false"),
    ("attention_head_dim", 0, "1..32"),
    ("attention_head_dim", 64, "1..32"),  # more than the 32 channels that attend: zero heads
    ("attn_norm_num_groups", 0, "1..4096"),
    ("attn_norm_num_groups", 5, "must divide"),
    ("freq_shift", 8, "0..7"),  # 16 channels: the embedding divides by 8 - freq_shift
    ("freq_shift", -1, "0..7"),
    ("freq_shift", 0.5, "0..7"),
    ("downsample_padding", 2, "0..1"),
    ("mid_block_scale_factor", 0, "[0.001, 1000]"),
    ("mid_block_scale_factor", INF, "[0.001, 1000]"),
    ("sample_size", 100000, "16..1024"),
    ("sample_size", 0, "16..1024"),
    ("sample_size", "32", "16..1024"),
    ("sample_size", None, "16..1024"),
    ("sample_size", 33, "multiple of 2"),  # two levels: 33 px does not halve evenly
    ("image_channels", 2, "1 (MRI) or 3 (RGB)"),
    ("image_channels", True, "1..3"),
    ("down_block_types", "DownBlock2D", "must be a list"),
]

SCHEDULE_BAD = [
    ("num_train_timesteps", "1000", "1..100000"),
    ("num_train_timesteps", 10 ** 12, "1..100000"),
    ("num_train_timesteps", 0, "1..100000"),
    ("num_train_timesteps", 1000.0, "1..100000"),
    ("num_train_timesteps", True, "1..100000"),
    ("beta_start", -1, "(0, 1)"),
    ("beta_start", 0, "(0, 1)"),
    ("beta_start", NAN, "(0, 1)"),
    ("beta_start", "0.0001", "(0, 1)"),
    ("beta_end", 2.0, "(0, 1)"),
    ("beta_end", 1.0, "(0, 1)"),
    ("beta_end", 0.00001, "must not be below beta_start"),
    ("beta_end", 0.5, "alpha_bar"),  # 1000 steps up to 0.5: alpha_bar underflows, sampling divides by 0
    ("clip_sample_range", -1, "(0, 1000]"),
    ("clip_sample_range", 0, "(0, 1000]"),
    ("clip_sample_range", INF, "(0, 1000]"),
    ("clip_sample", "yes", "true or false"),
    ("beta_schedule", "cosine", "['linear', 'scaled_linear']"),
    ("prediction_type", "v_prediction", "['epsilon']"),
]

PREPROCESSING_BAD = [
    ("image_size", 1000000, "16..1024"),
    ("image_size", 2048, "16..1024"),
    ("fov_mm", 1e-9, "[1, 1000]"),
    ("fov_mm", INF, "[1, 1000]"),
    ("fov_mm", NAN, "[1, 1000]"),
    ("fov_mm", 5000, "[1, 1000]"),
    ("fov_mm", "192", "[1, 1000]"),
    ("min_foreground_fraction", "0.1", "finite number"),
    ("percentiles", ["1", 99], "finite number"),
]


def _model_config_dict(section: str, field: str, value) -> dict:
    d = {"schema": "condiff.model/1", "unet": dict(TINY), "schedule": ScheduleConfig().to_dict(),
         "preprocessing": dict(PREPROCESSING)}
    d[section] = {**d[section], field: value}
    return d


SECTIONS = {"unet": (UNetConfig, TINY), "schedule": (ScheduleConfig, ScheduleConfig().to_dict()),
            "preprocessing": (PreprocessConfig, PREPROCESSING)}
BAD = ([("unet", *case) for case in UNET_BAD] + [("schedule", *case) for case in SCHEDULE_BAD]
       + [("preprocessing", *case) for case in PREPROCESSING_BAD])


@pytest.mark.parametrize("section, field, value, fragment", BAD, ids=[f"{s}-{f}={v!r}" for s, f, v, _ in BAD])
def test_bad_values_are_refused_naming_the_section_field_and_range(section, field, value, fragment):
    """Each bad value: refused by its dataclass, and when a model's config.json is read (naming the file)."""
    klass, good = SECTIONS[section]
    with pytest.raises(ValueError) as info:
        klass.from_dict({**good, field: value})
    assert field in str(info.value) and fragment in str(info.value), str(info.value)
    with pytest.raises(ModelFolderError) as info:
        ModelConfig.from_dict(_model_config_dict(section, field, value), "m/config.json")
    assert info.value.message.startswith(f"m/config.json: invalid config.json ({section}: ")
    assert field in info.value.message and fragment in info.value.message


def test_unknown_schedule_keys_and_non_object_sections_are_named():
    with pytest.raises(ModelFolderError, match=r"schedule: unknown schedule keys \['beta_max'\]"):
        ModelConfig.from_dict(_model_config_dict("schedule", "beta_max", 0.02), "m/config.json")
    d = _model_config_dict("unet", "norm_eps", 1e-5)
    d["preprocessing"] = ["mri"]
    with pytest.raises(ModelFolderError, match="preprocessing: must be a JSON object"):
        ModelConfig.from_dict(d, "m/config.json")


def test_diffusers_import_refuses_bad_values_with_a_value_error():
    """export/diffusers_import.py turns only ValueError from from_diffusers into a ModelFolderError."""
    src = {**preset("tiny", sample_size=32).to_diffusers(), "_class_name": "UNet2DModel"}
    for field, value in (("norm_num_groups", 0), ("norm_eps", -1.0), ("sample_size", 33), ("flip_sin_to_cos", "no")):
        with pytest.raises(ValueError, match=field):
            UNetConfig.from_diffusers({**src, field: value})
    assert UNetConfig.from_diffusers(src) == preset("tiny", sample_size=32)


def test_good_configs_still_load_unchanged():
    from condiff.modelset import open_model_set

    bundled = open_model_set(REPO / "examples" / "models")
    for cfg in bundled.configs:
        assert PreprocessConfig.from_dict(cfg.preprocessing).image_size == cfg.unet.sample_size
    assert ScheduleConfig.from_dict(ScheduleConfig().to_dict()) == ScheduleConfig()
    ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ScheduleConfig(num_train_timesteps=4000)  # alpha_bar ~ e^-40 at the end: fine
    ScheduleConfig(num_train_timesteps=1, beta_start=0.02, beta_end=0.02)
    for name in ("paper", "symmetric", "small", "compact", "tiny"):
        for channels in (1, 3):
            for size in (16, 128, 1024):
                cfg = preset(name, channels, sample_size=size)
                assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # the irregular config of test_unet, and values at the edges of the limits
    UNetConfig.from_dict({**TINY, "sample_size": 24, "block_out_channels": [16, 24, 32], "layers_per_block": 16,
                          "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                          "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
                          "norm_eps": 1e-6, "freq_shift": 1, "flip_sin_to_cos": False,
                          "downsample_padding": 0, "mid_block_scale_factor": 2, "attention_head_dim": 16,
                          "attn_norm_num_groups": 2})
    UNetConfig.from_dict({**TINY, "attention_head_dim": None, "freq_shift": 7, "norm_eps": 0.5})
    preset("tiny", sample_size=33)  # condiff-train builds presets at any size to give its own --image-size hint
    for pre in ({**PREPROCESSING, "fov_mm": None}, {**PREPROCESSING, "fov_mm": 29.2}, {**PREPROCESSING, "fov_mm": 1000},
                {**PREPROCESSING, "image_size": 1024}, {"modality": "rgb", "image_size": 16}):
        PreprocessConfig.from_dict(pre)
    assert ModelConfig.from_dict(_model_config_dict("preprocessing", "fov_mm", 64.0)).preprocessing == PREPROCESSING
    assert ModelConfig.from_dict({**_model_config_dict("unet", "norm_eps", 1e-5), "preprocessing": {}}).preprocessing == {}


def test_parameter_count_matches_the_built_network():
    from condiff.config import parameter_count
    from condiff.unet import ConditionalUNet

    irregular = UNetConfig(image_channels=3, sample_size=24, block_out_channels=(16, 24, 32), layers_per_block=2,
                           down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
                           attention_head_dim=5, norm_num_groups=8, add_attention=False)
    for cfg in (preset("tiny"), preset("small", 3), preset("compact"), irregular):
        assert parameter_count(cfg) == sum(p.numel() for p in ConditionalUNet(cfg).parameters())
    assert parameter_count(preset("paper")) == 72_410_241


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    with one_torch_thread():
        root = tmp_path_factory.mktemp("cfgval")
        models = make_model_set(root / "set", n_members=1)
        make_scans(root / "scans", n=1)
        return models, root / "scans" / "case0.nii.gz"


E2E = [
    ("unet", "norm_num_groups", 0),  # was a ZeroDivisionError traceback
    ("unet", "flip_sin_to_cos", "no"),  # was read as true
    ("unet", "norm_eps", -1.0),  # was "non-finite output" on every case
    ("schedule", "num_train_timesteps", "1000"),  # was a TypeError traceback
    ("schedule", "beta_start", -1),  # was "non-finite output" on every case
    ("preprocessing", "fov_mm", 1e-9),  # was accepted
]


@pytest.mark.parametrize("section, field, value", E2E, ids=[f"{s}.{f}={v!r}" for s, f, v in E2E])
def test_condiff_infer_exits_2_naming_config_json_and_the_field(tmp_path, tiny_set, section, field, value):
    from condiff.modelset import save_model_set

    models, scan = tiny_set
    root = tmp_path / "set"
    shutil.copytree(models, root)
    cfg_path = root / "fold_0" / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc[section][field] = value
    cfg_path.write_text(json.dumps(doc))
    # set.json's sha256 covers model.safetensors, not config.json; re-signed anyway, so that the
    # refusal seen is the config value's and not a digest mismatch
    save_model_set(root, [root / "fold_0"], name="edited")
    with one_torch_thread():
        res = invoke_infer([scan, "-o", tmp_path / "out", "--models", root, *FAST])
    text = res.output + (res.stderr or "")
    assert res.exit_code == 2, text
    assert str(cfg_path) in text and f"{section}: {field}" in text and "Traceback" not in text, text


def test_the_network_and_the_contract_share_one_size_range():
    from condiff import config, preprocess

    assert (config.MIN_SIZE, config.MAX_SIZE) == (preprocess.MIN_IMAGE_SIZE, preprocess.MAX_IMAGE_SIZE)
