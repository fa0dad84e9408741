"""Our UNet against the oracle: diffusers 0.24 UNet2DModel with the same weights."""
import pytest
import torch

from condiff.config import UNetConfig, preset
from condiff.unet import ConditionalUNet, count_parameters, timestep_embedding

diffusers = pytest.importorskip("diffusers")


def _pair(cfg: UNetConfig, seed=0):
    torch.manual_seed(seed)
    ours = ConditionalUNet(cfg).eval()
    # perturb every parameter so that zero-initialised biases and norms are exercised too
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ref = diffusers.UNet2DModel(**cfg.to_diffusers()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _compare(cfg, batch=3, size=None, timesteps=(0, 17, 500, 999), atol=1e-5):
    ours, ref = _pair(cfg)
    size = size or cfg.sample_size
    g = torch.Generator().manual_seed(7)
    c = cfg.image_channels
    for t in timesteps:
        x_t = torch.randn(batch, c, size, size, generator=g)
        cond = torch.rand(batch, c, size, size, generator=g)
        tt = torch.full((batch,), t, dtype=torch.int64)
        with torch.no_grad():
            a = ours(x_t, cond, tt)
            b = ref(torch.cat([x_t, cond], 1), tt).sample
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("name,channels,params", [
    ("paper", 1, 72_410_241), ("paper", 3, 72_417_155), ("symmetric", 1, 75_366_273)])
def test_parameter_counts_match_reference(name, channels, params):
    assert count_parameters(ConditionalUNet(preset(name, channels))) == params


def test_parameter_count_equals_diffusers_for_small():
    cfg = preset("small")
    ref = diffusers.UNet2DModel(**cfg.to_diffusers())
    assert count_parameters(ConditionalUNet(cfg)) == sum(p.numel() for p in ref.parameters())


def test_timestep_embedding_check_values():
    # reference-method.md §2.1: t = 10 gives component 0 = cos(10), component 64 = sin(10)
    e = timestep_embedding(torch.tensor([10]), 128, flip_sin_to_cos=True, freq_shift=0)
    assert abs(e[0, 0].item() - (-0.8391)) < 1e-4
    assert abs(e[0, 64].item() - (-0.5440)) < 1e-4


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_forward_matches_diffusers_small_presets(name):
    _compare(preset(name, 1, sample_size=32), batch=3, size=32)


def test_forward_matches_diffusers_rgb_tiny():
    _compare(preset("tiny", 3, sample_size=32), batch=2, size=32)


@pytest.mark.parametrize("name", ["paper", "symmetric"])
def test_forward_matches_diffusers_full_topology_at_32px(name):
    _compare(preset(name, 1, sample_size=32), batch=2, size=32, timesteps=(0, 980))


def test_any_block_order_and_irregular_config():
    cfg = UNetConfig(image_channels=1, sample_size=24, block_out_channels=(16, 24, 32), layers_per_block=2,
                     down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
                     attention_head_dim=4, norm_num_groups=8, norm_eps=1e-6, freq_shift=1,
                     flip_sin_to_cos=False, downsample_padding=0, mid_block_scale_factor=2.0)
    _compare(cfg, batch=2, size=24, timesteps=(3, 700))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper", "symmetric"])
def test_forward_matches_diffusers_at_128px(name):
    _compare(preset(name, 1), batch=1, size=128, timesteps=(500,))
