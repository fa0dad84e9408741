"""Config and preprocessing validation at its edges (mutation audit 3: each test fails on a mutant that survived)."""
import pytest

from condiff.config import ModelConfig, ScheduleConfig, UNetConfig, preset
from condiff.errors import ModelFolderError
from condiff.preprocess import PreprocessConfig

TINY = preset("tiny", sample_size=32).to_dict()
PREPROCESSING = {"modality": "mri", "image_size": 32, "fov_mm": 64.0}


def test_values_on_the_printed_edges_of_a_closed_range_are_accepted():
    """The messages print [0.001, 1000] and [1, 1000]: both ends are allowed values."""
    for value in (1e-3, 1e3):
        assert UNetConfig.from_dict({**TINY, "mid_block_scale_factor": value}).mid_block_scale_factor == value
    assert ScheduleConfig(clip_sample_range=1e3).clip_sample_range == 1e3
    for fov in (1, 1.0, 1000):
        assert PreprocessConfig.from_dict({**PREPROCESSING, "fov_mm": fov}).fov_mm == float(fov)


def test_eight_levels_are_allowed_as_the_message_says():
    cfg = {**TINY, "sample_size": 1024, "block_out_channels": [8] * 8, "norm_num_groups": 8,
           "down_block_types": ["DownBlock2D"] * 8, "up_block_types": ["UpBlock2D"] * 8, "add_attention": False}
    assert len(UNetConfig.from_dict(cfg).block_out_channels) == 8
    with pytest.raises(ValueError, match="1..8 levels"):
        UNetConfig.from_dict({**cfg, "block_out_channels": [8] * 9, "down_block_types": ["DownBlock2D"] * 9,
                              "up_block_types": ["UpBlock2D"] * 9})


def test_attention_limits_look_only_at_levels_that_attend():
    """Without the mid block's attention (add_attention false) the last level has no attention: neither
    attention_head_dim nor attn_norm_num_groups is bounded by its width (diffusers builds such nets)."""
    cfg = {**TINY, "block_out_channels": [64, 32], "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "AttnUpBlock2D"], "add_attention": False}
    assert UNetConfig.from_dict({**cfg, "attention_head_dim": 64}).attention_head_dim == 64  # 64-channel level only
    with pytest.raises(ValueError, match=r"attention_head_dim.*1\.\.32"):  # with the mid block's attention
        UNetConfig.from_dict({**cfg, "attention_head_dim": 64, "add_attention": True})
    assert UNetConfig.from_dict({**TINY, "add_attention": False, "attn_norm_num_groups": 5}).attn_norm_num_groups == 5
    with pytest.raises(ValueError, match="must divide"):
        UNetConfig.from_dict({**TINY, "add_attention": True, "attn_norm_num_groups": 5})


def test_the_alpha_bar_check_follows_the_scaled_linear_schedule():
    """scaled_linear's betas are smaller than linear's between the same ends: beta_end 0.15 over 1000 steps
    leaves alpha_bar ~ e^-50 (fine) there, e^-75 (< 1e-30, refused) for linear."""
    ScheduleConfig(beta_end=0.15, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="alpha_bar"):
        ScheduleConfig(beta_end=0.15, beta_schedule="linear")


def test_a_config_without_a_unet_section_says_so():
    with pytest.raises(ModelFolderError) as info:
        ModelConfig.from_dict({"schema": "condiff.model/1", "schedule": {}}, "m/config.json")
    assert 'm/config.json: invalid config.json (no "unet" section)' in info.value.message


@pytest.mark.parametrize("field, value", [("fov_mm", True), ("percentiles", [False, 99]),
                                          ("min_foreground_fraction", False),
                                          ("landmarks", ["0.0"] + [i / 10 for i in range(1, 11)])])
def test_preprocessing_numbers_refuse_bools_and_strings(field, value):
    with pytest.raises(ValueError, match=field):
        PreprocessConfig.from_dict({**PREPROCESSING, "normalisation": "percentile", field: value})
