"""Does an exported network make the maps eager fp32 torch makes? (ecosystem.md B.13)

The eps check in ``onnx_export`` proves the graph on one call; users see maps, made by many calls in
a row, where small differences can grow. So every export also runs a short reverse diffusion on a
fixed calibration set through eager torch and through the exported network, with the same noise,
and compares what the engine would write: the SSIM maps, the slice scores and their ranking, and
the pixel AP on a labelled sample. An export that differs beyond the tolerances below, or gives
a non-finite value, is refused (nothing is written); the figures go into the artifact's sidecar.

Calibration set: synthetic phantoms in the model's value range (MRI: [0, 1] with background
exactly 0; RGB: [-1, 1] with background -1), textured by smooth noise, half of them with a bright
disc that is the labelled anomaly; made from a seed, so every export checks the same images.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from condiff.anomaly import slice_scores, zero_background
from condiff.errors import ExportError
from condiff.metrics import average_precision
from condiff.sampler import Denoise, SamplerPlan, make_plan, restore
from condiff.ssim import ssim_map

CALIBRATION_IMAGES = 4
DEFAULT_STEPS = 10
SEED = 0
# The full check is 4 images x 10 steps, each through both networks: seconds for the bundled nets, but
# ~16 min for the paper preset on 2 CPU cores (13.7 s a torch call, ~10 s an ORT call, per image). Unless
# told a step count, a slow network gets a smaller check that fits BUDGET_S (at least 2 images x 2 steps:
# both outputs, two timesteps, the whole map pipeline).
BUDGET_S = 120.0
SIZES = ((4, 10), (4, 5), (2, 5), (2, 3), (2, 2))  # (images, steps), the largest that fits is taken
RANK_SEPARATION = 0.01  # score pairs closer than 1 % (relative) are ties, not a ranking to keep


@dataclass(frozen=True)
class Tolerance:
    """What an export must keep of eager fp32 torch's maps."""

    relative_map_diff: float   # max |Δmap| / max |map_torch|
    min_correlation: float     # Pearson correlation of each calibration map with torch's
    max_ap_delta: float        # |AP_export - AP_torch| on the labelled sample
    min_rank_agreement: float  # share of separated score pairs ordered as torch orders them


# fp32 ONNX Runtime against fp32 torch differs by rounding only: relative map difference 1e-6 to 8e-6
# and correlation > 0.99999999 on the bundled members and random tiny/small/symmetric nets (10 steps).
FP32 = Tolerance(relative_map_diff=1e-3, min_correlation=0.9999, max_ap_delta=0.005, min_rank_agreement=1.0)
# TensorRT FP16: a bf16 copy of those nets (3 mantissa bits fewer than fp16) lands at 8e-3 and 0.99995;
# eps scaled by 0.99 gives 0.02, by 0.9 0.06-0.26 (refused), so this passes rounding and refuses drift.
FP16 = Tolerance(relative_map_diff=0.05, min_correlation=0.995, max_ap_delta=0.02, min_rank_agreement=0.8)


@dataclass
class MapParity:
    """Eager fp32 torch against an exported network on the calibration set."""

    steps: int
    images: int
    max_abs_map_diff: float
    relative_map_diff: float
    min_correlation: float
    rank_agreement: float
    ap_reference: float
    ap_export: float
    finite: bool

    @property
    def ap_delta(self) -> float:
        return abs(self.ap_export - self.ap_reference)

    def failures(self, tol: Tolerance) -> list[str]:
        """Why this parity is not good enough under ``tol`` (empty when it is)."""
        if not self.finite:
            return ["the exported network's maps hold NaN or infinity"]
        out = []
        if not self.relative_map_diff <= tol.relative_map_diff:
            out.append(f"maps differ by {self.relative_map_diff:.3g} of their maximum (tolerance {tol.relative_map_diff:g})")
        if not self.min_correlation >= tol.min_correlation:
            out.append(f"map correlation {self.min_correlation:.5f} (needs {tol.min_correlation:g})")
        if not self.ap_delta <= tol.max_ap_delta:
            out.append(f"pixel AP {self.ap_export:.4f} against torch's {self.ap_reference:.4f} "
                       f"(tolerance {tol.max_ap_delta:g})")
        if not self.rank_agreement >= tol.min_rank_agreement:
            out.append(f"slice scores ranked as torch ranks them in {self.rank_agreement:.0%} of pairs "
                       f"(needs {tol.min_rank_agreement:.0%})")
        return out

    def require(self, tol: Tolerance, where, exported: str, hint: str) -> "MapParity":
        """Itself when it passes ``tol``; else ``ExportError`` naming ``where`` and every failure."""
        problems = self.failures(tol)
        if problems:
            raise ExportError(where, f"{exported} anomaly maps differ from torch's on the calibration set: "
                              + "; ".join(problems), hint)
        return self

    def to_dict(self, tol: Tolerance | None = None) -> dict:
        doc = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        doc["against"] = "torch fp32 eager (SDPA), DDPM on the calibration set, same noise"
        if tol is not None:
            doc["tolerance"] = asdict(tol)
        return doc


def check_size(seconds_per_image_step: float, budget_s: float = BUDGET_S) -> tuple[int, int]:
    """(images, steps) of the largest check that fits ``budget_s`` when one image through one step of
    both networks (reference and export) costs ``seconds_per_image_step``."""
    for images, steps in SIZES:
        if images * steps * seconds_per_image_step <= budget_s:
            return images, steps
    return SIZES[-1]


def _smooth_field(generator: torch.Generator, n: int, channels: int, size: int) -> torch.Tensor:
    coarse = torch.randn(n, channels, max(2, size // 8), max(2, size // 8), generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def calibration_set(channels: int, size: int, modality: str | None = None, *, n: int = CALIBRATION_IMAGES,
                    seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (n, C, H, W) float32, anomaly masks (n, 1, H, W) bool)``; the odd images carry a disc.

    ``modality`` ``mri`` (or None with one channel) gives [0, 1] with background 0; otherwise [-1, 1].
    """
    mri = modality == "mri" or (modality is None and channels == 1)
    g = torch.Generator().manual_seed(seed)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    head = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1).float()
    tissue = (0.55 + 0.15 * _smooth_field(g, n, channels, size)).clamp(0.05, 0.95)
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    radius = max(2.0, size / 10) / size * 2
    for i in range(1, n, 2):
        cy, cx = (torch.rand(2, generator=g) - 0.5) * 0.6
        masks[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2
    images = torch.where(masks, (tissue + 0.35).clamp(max=1.0), tissue) * head
    if not mri:
        images = images * 2 - 1  # background -1, tissue in (-1, 1]
    return images.contiguous(), masks


def _maps(denoise: Denoise, images: torch.Tensor, noise: torch.Tensor, plan: SamplerPlan) -> torch.Tensor:
    with torch.inference_mode():
        x0 = restore(denoise, images, plan, noise)
        return zero_background(ssim_map(x0, images), images)


def _rank_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    agree = total = 0
    for i in range(len(reference)):
        for j in range(i + 1, len(reference)):
            gap = reference[i] - reference[j]
            if abs(gap) <= RANK_SEPARATION * max(abs(reference[i]), abs(reference[j])):
                continue
            total += 1
            agree += bool(np.sign(gap) == np.sign(other[i] - other[j]))
    return agree / total if total else 1.0


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; two constant maps agree (r 1) when they are equal and are unrelated (r 0) when not."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # std() of np.full(64, 0.2) is 2.8e-17, not 0
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def map_parity(reference: Denoise, exported: Denoise, channels: int, size: int, modality: str | None = None, *,
               steps: int = DEFAULT_STEPS, n: int = CALIBRATION_IMAGES, seed: int = SEED) -> MapParity:
    """Run both denoisers through ``steps`` DDPM steps on the calibration set with the same noise."""
    images, masks = calibration_set(channels, size, modality, n=n, seed=seed)
    plan = make_plan("ddpm", steps)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n, plan.n_noise_draws, channels, size, size, generator=g)
    ref = _maps(reference, images, noise, plan).double()
    out = _maps(exported, images, noise, plan).double()
    finite = bool(torch.isfinite(out).all())
    diff = (out - ref).abs().max().item() if finite else math.inf
    peak = ref.abs().max().item()
    ref_np, out_np = ref.numpy().reshape(n, -1), out.numpy().reshape(n, -1)
    labelled = masks.any(dim=(1, 2, 3)).numpy()
    pixel_labels = masks.numpy().reshape(n, -1)[labelled].ravel()
    if finite:
        correlation = min(_correlation(r, o) for r, o in zip(ref_np, out_np))
        ranks = _rank_agreement(slice_scores(ref).numpy(), slice_scores(out).numpy())
        ap_out = average_precision(pixel_labels, out_np[labelled].ravel())
    else:
        correlation, ranks, ap_out = math.nan, math.nan, math.nan
    return MapParity(steps=steps, images=n, max_abs_map_diff=diff,
                     relative_map_diff=diff / peak if peak > 0 else (0.0 if diff == 0 else math.inf),
                     min_correlation=correlation, rank_agreement=ranks,
                     ap_reference=average_precision(pixel_labels, ref_np[labelled].ravel()), ap_export=ap_out,
                     finite=finite)


__all__ = ["BUDGET_S", "CALIBRATION_IMAGES", "DEFAULT_STEPS", "FP16", "FP32", "MapParity", "Tolerance",
           "calibration_set", "check_size", "map_parity"]
