"""Fused CUDA SSIM kernel against condiff.ssim.ssim_map (its specification) and scikit-image.

GPU tests (marker ``gpu``) compare the kernel with the torch reference evaluated on the CPU in fp32, so
cuDNN's TF32 convolutions cannot blur the comparison. CPU tests check the fallback, the input checks,
the window literals, the nvcc build, and run the kernel source itself on the CPU through a small host
shim (one std::thread per CUDA thread, std::barrier for __syncthreads), so tiling and halo logic are
tested on machines without a GPU. Measured there: max |diff| vs the torch map 2.4e-7 (bound 1e-5).
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from condiff.engine import ssim_cuda
from condiff.engine.ssim_cuda import KERNEL_PATH, best_ssim_map, kernel_window, ssim_map_cuda, window_1d
from condiff.ssim import ssim_map

ATOL = 1e-5  # STYLE.md test table: CUDA SSIM kernel vs core ssim.py, fp32


def _pair(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    y = (x + 0.3 * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)
    return x, y


def _mri_like(b, h, w, seed=0):
    """Zero background around an elliptical 'head' with texture; x is a noisy restoration with a lesion."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    head = ((rows / 0.8) ** 2 + (cols / 0.6) ** 2 < 1).float()
    y = head * (0.4 + 0.4 * torch.rand(b, 1, h, w, generator=g))
    x = (y + 0.05 * torch.randn(b, 1, h, w, generator=g)).clamp(0, 1) * head
    x[:, :, h // 3: h // 3 + 9, w // 2: w // 2 + 7] = 0.9
    return x, y


# ---------------------------------------------------------------- CPU: fallback, checks, source

def test_best_ssim_map_on_cpu_is_the_reference_exactly():
    x, y = _pair(3, 3, 37, 53)
    assert torch.equal(best_ssim_map(x, y), ssim_map(x, y))


def test_inputs_are_refused_with_their_shapes():
    x, y = _pair(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\).*\(2, 1, 16, 15\)"):
        best_ssim_map(x, y[..., :15])
    with pytest.raises(ValueError, match="floating-point.*torch.int64"):
        best_ssim_map(x, y.long())
    with pytest.raises(ValueError, match=r"CUDA device.*\(2, 1, 16, 16\)"):
        ssim_map_cuda(x, y)


def test_window_literals_in_the_kernel_are_torchs_float32_weights():
    literals = kernel_window()
    assert literals.shape == (11,)
    np.testing.assert_array_equal(literals.view(np.uint32), window_1d().view(np.uint32))
    assert abs(float(window_1d().astype(np.float64).sum()) - 1) < 1e-6


def test_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    ptx = tmp_path / "ssim.ptx"
    res = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ptx", str(KERNEL_PATH), "-o", str(ptx)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    for name in ("ssim_map_f32_f32", "ssim_map_f16_f32", "ssim_map_f32_f16", "ssim_map_f16_f16"):
        assert f".entry {name}(" in text


_SHIM = r"""
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
struct dim3_ { unsigned int x, y, z; };
static thread_local dim3_ threadIdx;
static dim3_ blockIdx, gridDim;
static std::barrier<>* block_barrier;
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __launch_bounds__(n)
#include "ssim.cu"

typedef unsigned short half_bits;
extern "C" void emulate(int kind, const void* x, const void* y, float* out, int B, int C, int H, int W,
                        unsigned int grid_z) {
    gridDim = {(unsigned)((W + TILE_W - 1) / TILE_W), (unsigned)((H + TILE_H - 1) / TILE_H), grid_z};
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
            for (unsigned bx = 0; bx < gridDim.x; ++bx) {  // blocks run one after another
                blockIdx = {bx, by, bz};
                std::barrier<> bar(N_THREADS);
                block_barrier = &bar;
                std::vector<std::thread> threads;
                for (unsigned ty = 0; ty < THREADS_Y; ++ty)
                    for (unsigned tx = 0; tx < THREADS_X; ++tx)
                        threads.emplace_back([=] {
                            threadIdx = {tx, ty, 0};
                            if (kind == 0) ssim_map_f32_f32((const float*)x, (const float*)y, out, B, C, H, W);
                            else ssim_map_f16_f32((const half_bits*)x, (const float*)y, out, B, C, H, W);
                        });
                for (auto& t : threads) t.join();
            }
}
"""


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """ssim.cu compiled for the host; returns emulate(x, y, grid_z) on numpy arrays."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    folder = tmp_path_factory.mktemp("ssim_shim")
    (folder / "shim.cpp").write_text(_SHIM)
    lib = folder / "libssim_shim.so"
    res = subprocess.run([gxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-I{KERNEL_PATH.parent}",
                          str(folder / "shim.cpp"), "-o", str(lib)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"host shim does not build here (needs C++20 <barrier>): {res.stderr[-300:]}")
    fn = ctypes.CDLL(str(lib)).emulate
    fn.restype = None

    def run(x: np.ndarray, y: np.ndarray, grid_z: int | None = None) -> np.ndarray:
        b, c, h, w = y.shape
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.float32)
        out = np.full((b, 1, h, w), np.nan, dtype=np.float32)
        kind = 0 if x.dtype == np.float32 else 1
        fn(ctypes.c_int(kind), x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p),
           out.ctypes.data_as(ctypes.c_void_p), *(ctypes.c_int(v) for v in (b, c, h, w)),
           ctypes.c_uint(grid_z or b))
        return out

    return run


@pytest.mark.parametrize("b,c,h,w,grid_z", [(3, 1, 37, 53, None), (3, 3, 37, 53, 2), (2, 2, 70, 45, None),
                                            (1, 1, 5, 7, None)])
def test_kernel_source_on_host_shim_matches_reference(emulated_kernel, b, c, h, w, grid_z):
    x, y = _pair(b, c, h, w, seed=b * 100 + h)
    out = emulated_kernel(x.numpy(), y.numpy(), grid_z)  # grid_z < B exercises the loop over images
    np.testing.assert_allclose(out, ssim_map(x, y).numpy(), rtol=0, atol=ATOL)


def test_kernel_source_on_host_shim_mri_like_and_half_restoration(emulated_kernel):
    x, y = _mri_like(2, 64, 48)
    np.testing.assert_allclose(emulated_kernel(x.numpy(), y.numpy()), ssim_map(x, y).numpy(), rtol=0, atol=ATOL)
    xh = x.half()
    np.testing.assert_allclose(emulated_kernel(xh.numpy(), y.numpy()), ssim_map(xh, y).numpy(), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- GPU: the kernel itself

@pytest.fixture
def cuda_kernel():
    pytest.importorskip("cupy")
    assert ssim_cuda.cuda_ssim_available()
    return ssim_map_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1, 3])
def test_kernel_matches_reference_on_irregular_random_images(cuda_kernel, channels):
    x, y = _pair(3, channels, 37, 53)
    out = cuda_kernel(x.cuda(), y.cuda())
    assert out.shape == (3, 1, 37, 53) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ssim_map(x, y), rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_kernel_matches_reference_on_mri_like_background(cuda_kernel):
    x, y = _mri_like(5, 128, 128)
    torch.testing.assert_close(cuda_kernel(x.cuda(), y.cuda()).cpu(), ssim_map(x, y), rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_kernel_reference_check_values(cuda_kernel):
    # reference-method.md §6: x = 0 vs y = 0.5 on 32x32
    m = cuda_kernel(torch.zeros(1, 1, 32, 32, device="cuda"), torch.full((1, 1, 32, 32), 0.5, device="cuda"))[0, 0]
    assert abs(m[16, 16].item() - 0.0370234) < 1e-6
    assert abs(m[0, 16].item() - 0.0161481) < 1e-6
    assert abs(m[0, 0].item() - 0.0071536) < 1e-6


@pytest.mark.gpu
def test_kernel_matches_skimage_away_from_border(cuda_kernel):
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair(2, 3, 40, 52, seed=7)
    out = cuda_kernel(x.cuda(), y.cuda()).cpu().numpy()
    xd, yd = x.double().numpy(), y.double().numpy()
    for i in range(2):
        maps = [np.clip(1 - metrics.structural_similarity(
            xd[i, ch], yd[i, ch], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, full=True)[1], 0, 1) for ch in range(3)]
        # skimage pads by reflection, the reference by zeros: compare the interior only
        np.testing.assert_allclose(out[i, 0, 5:-5, 5:-5], np.mean(maps, axis=0)[5:-5, 5:-5], rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_kernel_accepts_half_restoration_and_odd_layouts(cuda_kernel):
    x, y = _pair(3, 2, 37, 53, seed=3)
    xh = x.half()
    torch.testing.assert_close(cuda_kernel(xh.cuda(), y.cuda()).cpu(), ssim_map(xh, y), rtol=0, atol=ATOL)
    torch.testing.assert_close(cuda_kernel(xh.cuda(), y.half().cuda()).cpu(), ssim_map(xh, y.half()),
                               rtol=0, atol=ATOL)
    # non-contiguous and float64 inputs are made contiguous float32 first, as ssim_map's .float() does
    xt = x.double().cuda().transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(cuda_kernel(xt, y.cuda()).cpu(), ssim_map(x.double(), y), rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_kernel_loops_over_images_beyond_grid_z_limit(cuda_kernel):
    x, y = _pair(ssim_cuda.MAX_GRID_Z + 100, 1, 8, 8, seed=5)
    torch.testing.assert_close(cuda_kernel(x.cuda(), y.cuda()).cpu(), ssim_map(x, y), rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_kernel_runs_on_torchs_current_stream(cuda_kernel):
    x, y = _pair(8, 1, 128, 128, seed=9)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        a = torch.randn(4096, 4096, device="cuda")
        xs = x.cuda() + 0 * (a @ a).sum()  # queued work the kernel must wait for on this stream
        out = cuda_kernel(xs, y.cuda())
    side.synchronize()
    torch.testing.assert_close(out.cpu(), ssim_map(x, y), rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_best_ssim_map_uses_kernel_on_cuda_and_torch_for_gradients(cuda_kernel):
    x, y = _pair(2, 1, 33, 40, seed=11)
    xc, yc = x.cuda(), y.cuda()
    torch.testing.assert_close(best_ssim_map(xc, yc), cuda_kernel(xc, yc), rtol=0, atol=0)
    xg = xc.clone().requires_grad_(True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions in the reference
        out = best_ssim_map(xg, yc)  # the kernel has no backward: the reference is used
    assert out.requires_grad
    torch.testing.assert_close(out.detach().cpu(), ssim_map(x, y), rtol=0, atol=ATOL)
