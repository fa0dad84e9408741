"""SSIM anomaly map against scikit-image and an independent float64 numpy implementation."""
import numpy as np
import pytest
import torch
from scipy.ndimage import correlate

from condiff.anomaly import background_mask, ensemble_mean, slice_scores, zero_background
from condiff.ssim import ssim_map

skimage_metrics = pytest.importorskip("skimage.metrics")


def _numpy_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64, zero padding, written from reference-method.md §6 (not from condiff's code)."""
    i = np.arange(11) - 5
    g = np.exp(-(i ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    k = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for xc, yc in zip(x, y):
        f = lambda a: correlate(a, k, mode="constant", cval=0.0)
        mx, my = f(xc), f(yc)
        vx, vy, cxy = f(xc * xc) - mx * mx, f(yc * yc) - my * my, f(xc * yc) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        out.append(np.clip(1 - s, 0, 1))
    return np.mean(out, axis=0)


def _skimage_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    maps = []
    for xc, yc in zip(x, y):
        _, m = skimage_metrics.structural_similarity(
            xc, yc, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True)
        maps.append(np.clip(1 - m, 0, 1))
    return np.mean(maps, axis=0)


def _check(x, y):
    ours = ssim_map(torch.from_numpy(x[None]).float(), torch.from_numpy(y[None]).float())[0, 0].numpy()
    np.testing.assert_allclose(ours, _numpy_ssim_map(x.astype(np.float64), y.astype(np.float64)), rtol=0, atol=1e-6)
    # skimage pads by reflection; compare away from the 5-pixel border
    sk = _skimage_map(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(ours[5:-5, 5:-5], sk[5:-5, 5:-5], rtol=0, atol=1e-5)
    return ours


def test_reference_check_values():
    # reference-method.md §6: x = 0 vs y = 0.5 on 32x32
    m = ssim_map(torch.zeros(1, 1, 32, 32), torch.full((1, 1, 32, 32), 0.5))[0, 0]
    assert abs(m[16, 16].item() - 0.0370234) < 1e-6
    assert abs(m[0, 16].item() - 0.0161481) < 1e-6
    assert abs(m[0, 0].item() - 0.0071536) < 1e-6


@pytest.mark.parametrize("channels,shape", [(1, (37, 53)), (3, (64, 64))])
def test_random_images_match_oracles(channels, shape):
    rng = np.random.default_rng(0)
    x = rng.random((channels, *shape)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    _check(x, y)


def test_real_mri_slice_matches_oracles(shared_data):
    nib = pytest.importorskip("nibabel")
    vol = np.asarray(nib.load(shared_data / "ixi-t1" / "IXI132-HH-1415-T1.nii.gz").get_fdata(), dtype=np.float32)
    y = vol[:, :, 45] / vol.max()
    x = np.clip(y + 0.05 * np.random.default_rng(1).standard_normal(y.shape), 0, 1).astype(np.float32)
    x[40:60, 40:60] = 0.9  # a bright "lesion" in the restoration
    _check(x[None], y[None].astype(np.float32))


def test_real_fundus_rgb_matches_oracles(shared_data):
    from PIL import Image

    img = Image.open(shared_data / "fundus" / "IDRiD_01.jpg").convert("RGB").resize((96, 64))
    y = (np.asarray(img, dtype=np.float32) / 255 * 2 - 1).transpose(2, 0, 1)
    x = np.clip(y[:, ::-1, :] * 0.9, -1, 1).copy()
    _check(x, y)


def test_background_zeroing_scores_and_ensemble():
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, 2:5, 2:5] = 0.5
    y[1, 0, :, :4] = 1.0
    amap = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = zero_background(amap, y)
    assert torch.equal(background_mask(y), y > 0)
    assert torch.all(z[y == 0] == 0) and torch.equal(z[y > 0], amap[y > 0])
    np.testing.assert_allclose(slice_scores(z).numpy(), z.numpy().reshape(2, -1).mean(1), rtol=1e-6)
    members = torch.stack([z, 2 * z, 3 * z])
    torch.testing.assert_close(ensemble_mean(members), 2 * z)
    # ensemble score equals the mean of member scores
    torch.testing.assert_close(slice_scores(ensemble_mean(members)),
                               torch.stack([slice_scores(m) for m in members]).mean(0))


def test_background_mask_of_rgb_images_is_per_image_and_any_channel():
    """reference-method.md §10 D2: a pixel is foreground where any channel lies above its own image's
    minimum (over channels and pixels), not the batch's. Two RGB images in [-1, 1] with minima -1 and
    -0.6, and pixels with a single channel above the minimum; float64 numpy oracle."""
    y = np.full((2, 3, 4, 5), 0.2)
    y[0, :, 0, :] = -1.0              # image 0: its minimum, background
    y[0, 1, 0, 2] = -0.99             # only the green channel above it: foreground
    y[0, :, 1, 1] = -0.5              # all channels below 0 but above the minimum: foreground
    y[1, :, 2, :] = -0.6              # image 1: its minimum (above image 0's): background
    y[1, 2, 2, 3] = -0.59             # only blue above it: foreground
    y[1, :, 3, 0] = -0.3
    y[1, 0, 3, 4], y[1, 1:, 3, 4] = 0.9, -0.6  # only red above the minimum
    minima = y.reshape(2, -1).min(axis=1)
    expected = np.stack([(y[b] > minima[b]).any(axis=0, keepdims=True) for b in range(2)])
    assert expected[0, 0, 0].tolist() == [False, False, True, False, False]
    assert expected[1, 0, 2].tolist() == [False, False, False, True, False] and expected[1, 0, 3].all()
    got = background_mask(torch.from_numpy(y).float())
    assert got.shape == (2, 1, 4, 5) and got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), expected)
    amap = torch.full((2, 1, 4, 5), 0.25)
    np.testing.assert_array_equal(zero_background(amap, torch.from_numpy(y).float()).numpy(), 0.25 * expected)
