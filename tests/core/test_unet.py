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


@pytest.mark.parametrize("dim", [7, 8, 33])
@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1), (True, 1)])
def test_timestep_embedding_matches_diffusers_for_odd_and_even_widths(dim, flip, shift):
    """Oracle: diffusers' get_timestep_embedding (an odd width is zero-padded by one column there too)."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    got = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    assert got.shape == (5, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_mid_block_attention_takes_its_own_group_count():
    """attn_norm_num_groups (diffusers' mid-block attention GroupNorm) differs from norm_num_groups here:
    the parameter shapes are the same either way, so only the outputs tell them apart."""
    cfg = UNetConfig(image_channels=1, sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                     norm_num_groups=8, attn_norm_num_groups=2)
    _compare(cfg, batch=2, size=16, timesteps=(5, 800))


def test_a_scalar_timestep_applies_to_every_slice_of_the_batch():
    ours, ref = _pair(preset("tiny", 1, sample_size=16))
    g = torch.Generator().manual_seed(3)
    x_t, cond = torch.randn(3, 1, 16, 16, generator=g), torch.rand(3, 1, 16, 16, generator=g)
    with torch.no_grad():
        a = ours(x_t, cond, torch.tensor(321))
        b = ours(x_t, cond, torch.full((3,), 321, dtype=torch.int64))
        c = ref(torch.cat([x_t, cond], 1), torch.tensor(321)).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_a_half_precision_network_takes_the_float32_timestep_embedding():
    """The engine runs bf16 (CPU) and fp16 (GPU) copies of the weights; the sinusoidal embedding is
    float32 and must be cast to the weights' type before the time MLP."""
    ours, _ = _pair(preset("tiny", 1, sample_size=16))
    g = torch.Generator().manual_seed(4)
    x_t, cond = torch.randn(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        want = ours(x_t, cond, t)
        got = ours.to(torch.bfloat16)(x_t.bfloat16(), cond.bfloat16(), t)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.1 * want.abs().max().item())
