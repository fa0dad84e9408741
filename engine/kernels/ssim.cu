// Fused SSIM anomaly map (reference-method.md §6); the specification is condiff/ssim.py::ssim_map.
//
//   x, y : (B, C, H, W) contiguous, float32 or float16 (passed as raw 16-bit words), any mix
//   out  : (B, 1, H, W) float32, out = mean over c of clamp(1 - SSIM(x[b,c], y[b,c]), 0, 1)
//
// SSIM uses an 11x11 Gaussian window (sigma 1.5) with zero padding 5 and the reference's constants
// C1 = (0.01*255)^2, C2 = (0.03*255)^2 (images are NOT scaled to 0-255; the quirk is kept on purpose).
//
// Bytes: the grouped-conv reference reads x, y, writes and re-reads a 5C-channel stack and its filtered
// copy (about 2 + 4*5 = 22 passes over a C-channel image); this kernel reads x and y once from DRAM
// (halo re-reads hit L1/L2) and writes the 1-channel map once.
//
// One block = one TILE_H x TILE_W output tile of one image; per channel:
//   1. load the tile plus a RADIUS halo of x and y into shared memory, zeros outside the image
//      (this IS the reference's zero padding),
//   2. horizontal pass: the five 1-D window sums (x, y, x*x, y*y, x*y) for every halo row,
//   3. vertical pass: each thread slides the 1-D window down ROWS_PER_THREAD adjacent outputs,
//      so every horizontal sum is read from shared memory once per thread, not once per output,
//   4. SSIM, clamp, accumulate over channels in registers.
// The 2-D window is the outer product of the 1-D one, so the separable sums equal the reference's 2-D
// correlation up to fp32 rounding: max |diff| 2.4e-7 against the torch map on the host shim of
// tests/engine/test_ssim_cuda.py (random and MRI-like images); the test bound is 1e-5.
//
// No #include: compiles unchanged under nvcc and NVRTC (CuPy), and under a host shim in the CPU test.

#define WIN 11
#define RADIUS 5
#define TILE_W 32
#define TILE_H 32
#define THREADS_X 32                          // one warp per row of the tile: conflict-free smem
#define THREADS_Y 8
#define N_THREADS (THREADS_X * THREADS_Y)
#define ROWS_PER_THREAD (TILE_H / THREADS_Y)  // 4 outputs per thread, stacked vertically
#define HALO_W (TILE_W + 2 * RADIUS)          // 42
#define HALO_H (TILE_H + 2 * RADIUS)          // 42
#define SSIM_C1 6.5025f                       // (0.01 * 255)^2, as float32 (torch casts the scalar)
#define SSIM_C2 58.5225f                      // (0.03 * 255)^2

// 1-D window: float32 exp(-(i-5)^2 / (2*1.5^2)) normalised to sum 1, exactly the values torch computes
// in condiff/ssim.py::_window (9 significant digits round-trip float32). engine/ssim_cuda.py refuses to
// compile unless they are bit-identical to torch's values, and a CPU test checks the same.
__constant__ float c_window[WIN] = {
    0.00102838036f, 0.00759875821f, 0.0360007733f, 0.109360687f, 0.213005528f, 0.266011715f,
    0.213005528f,   0.109360687f,   0.0360007733f, 0.00759875821f, 0.00102838036f};

__device__ __forceinline__ float _load(const float* p, long long i) { return p[i]; }

// float16 arrives as raw bits (no cuda_fp16.h, so NVRTC needs no include path).
__device__ __forceinline__ float _load(const unsigned short* p, long long i) {
    const unsigned short h = p[i];
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else  // host shim only (CPU test): exact IEEE half -> float
    const unsigned int sign = (unsigned int)(h >> 15) << 31;
    int exp = (h >> 10) & 0x1f;
    unsigned int man = h & 0x3ff;
    unsigned int bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            bits = sign | ((unsigned int)(exp - 15 + 127) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((unsigned int)(exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

template <typename TX, typename TY>
__device__ __forceinline__ void _ssim_map_tile(const TX* __restrict__ x, const TY* __restrict__ y,
                                               float* __restrict__ out, int B, int C, int H, int W) {
    __shared__ float s_x[HALO_H][HALO_W];
    __shared__ float s_y[HALO_H][HALO_W];
    __shared__ float s_h[5][HALO_H][TILE_W];  // horizontal sums of x, y, x*x, y*y, x*y

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * THREADS_X + tx;
    const int col0 = blockIdx.x * TILE_W, row0 = blockIdx.y * TILE_H;
    const int r_first = ty * ROWS_PER_THREAD;  // first output row of this thread inside the tile
    const long long plane = (long long)H * W;

    for (int b = blockIdx.z; b < B; b += gridDim.z) {  // grid.z is capped at 65535 by the launcher
        float acc[ROWS_PER_THREAD];
#pragma unroll
        for (int j = 0; j < ROWS_PER_THREAD; ++j) acc[j] = 0.f;

        for (int c = 0; c < C; ++c) {
            const long long base = ((long long)b * C + c) * plane;

            // 1. tile + halo; out-of-image pixels are the reference's zero padding
            for (int i = tid; i < HALO_H * HALO_W; i += N_THREADS) {
                const int r = i / HALO_W, q = i - r * HALO_W;
                const int gr = row0 - RADIUS + r, gq = col0 - RADIUS + q;
                const bool inside = gr >= 0 && gr < H && gq >= 0 && gq < W;
                const long long off = base + (long long)gr * W + gq;
                s_x[r][q] = inside ? _load(x, off) : 0.f;
                s_y[r][q] = inside ? _load(y, off) : 0.f;
            }
            __syncthreads();

            // 2. horizontal 1-D sums for every halo row; products formed in fp32 before weighting,
            //    as the reference convolves the fp32 tensors x*x, y*y, x*y
            for (int r = ty; r < HALO_H; r += THREADS_Y) {
                float sx = 0.f, sy = 0.f, sxx = 0.f, syy = 0.f, sxy = 0.f;
#pragma unroll
                for (int k = 0; k < WIN; ++k) {
                    const float w = c_window[k];
                    const float a = s_x[r][tx + k], v = s_y[r][tx + k];
                    sx += w * a;
                    sy += w * v;
                    sxx += w * (a * a);
                    syy += w * (v * v);
                    sxy += w * (a * v);
                }
                s_h[0][r][tx] = sx;
                s_h[1][r][tx] = sy;
                s_h[2][r][tx] = sxx;
                s_h[3][r][tx] = syy;
                s_h[4][r][tx] = sxy;
            }
            __syncthreads();

            // 3. vertical 1-D sums: halo row r_first + i feeds outputs j with window tap k = i - j
            float m[5][ROWS_PER_THREAD];
#pragma unroll
            for (int s = 0; s < 5; ++s)
#pragma unroll
                for (int j = 0; j < ROWS_PER_THREAD; ++j) m[s][j] = 0.f;
#pragma unroll
            for (int i = 0; i < ROWS_PER_THREAD + WIN - 1; ++i) {
                float h[5];
#pragma unroll
                for (int s = 0; s < 5; ++s) h[s] = s_h[s][r_first + i][tx];
#pragma unroll
                for (int j = 0; j < ROWS_PER_THREAD; ++j) {
                    const int k = i - j;
                    if (k >= 0 && k < WIN) {  // resolved at compile time after unrolling
                        const float w = c_window[k];
#pragma unroll
                        for (int s = 0; s < 5; ++s) m[s][j] += w * h[s];
                    }
                }
            }

            // 4. SSIM in the reference's operation order, clamp, accumulate the channel
#pragma unroll
            for (int j = 0; j < ROWS_PER_THREAD; ++j) {
                const float mu_x = m[0][j], mu_y = m[1][j];
                const float mu_xx = mu_x * mu_x, mu_yy = mu_y * mu_y, mu_xy = mu_x * mu_y;
                const float var_x = m[2][j] - mu_xx, var_y = m[3][j] - mu_yy, cov = m[4][j] - mu_xy;
                const float num = (2.f * mu_xy + SSIM_C1) * (2.f * cov + SSIM_C2);
                const float den = (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2);
                const float d = 1.f - num / den;
                acc[j] += fminf(fmaxf(d, 0.f), 1.f);
            }
            __syncthreads();  // s_x / s_h are overwritten by the next channel or image
        }

        const int gq = col0 + tx;
#pragma unroll
        for (int j = 0; j < ROWS_PER_THREAD; ++j) {
            const int gr = row0 + r_first + j;
            if (gr < H && gq < W) out[(long long)b * plane + (long long)gr * W + gq] = acc[j] / (float)C;
        }
    }
}

// One entry point per input dtype pair: f32 = float32, f16 = float16 (restoration under autocast).
#define SSIM_ENTRY(NAME, TX, TY)                                                                      \
    extern "C" __global__ void __launch_bounds__(N_THREADS)                                           \
        NAME(const TX* __restrict__ x, const TY* __restrict__ y, float* __restrict__ out, int B,      \
             int C, int H, int W) {                                                                   \
        _ssim_map_tile<TX, TY>(x, y, out, B, C, H, W);                                                \
    }

SSIM_ENTRY(ssim_map_f32_f32, float, float)
SSIM_ENTRY(ssim_map_f16_f32, unsigned short, float)
SSIM_ENTRY(ssim_map_f32_f16, float, unsigned short)
SSIM_ENTRY(ssim_map_f16_f16, unsigned short, unsigned short)
