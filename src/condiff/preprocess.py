"""The preprocessing contract: input scan or photo -> model slices, and back.

A model's ``config.json`` records a ``PreprocessConfig``; training and inference apply it
with the same functions, and ``invert_to_input`` maps anything computed on the slices (an
anomaly map, a restoration) back onto the input's own voxel or pixel grid.

MRI (``prepare_volume``), in this order:

1. Reorient to ``orientation`` (default RAS) by an exact axis permutation/flip (nibabel
   ``io_orientation`` + ``apply_orientation``, no resampling); axial slices run along the
   3rd axis, a slice is ``canonical[:, :, k]`` with H = 1st axis, W = 2nd axis.
2. Intensities on the native grid. ``max`` (reference-method §8): values < 1e-4 -> 0, and
   after resampling divide by the volume maximum. ``percentile``: inside the brain mask (or,
   without a mask, the automatic foreground, ``auto_foreground``) take the ``percentiles`` and
   map them to 0 and 1, clipping. With ``landmarks`` (histogram standardisation, Nyúl & Udupa
   2000) the brain's own ``LANDMARK_PERCENTILES`` are then mapped piecewise-linearly onto the
   model's stored landmarks, so healthy tissue lands where it did in training even when a few
   very bright voxels (contrast enhancement, vessels) set the upper percentile. With
   ``use_mask`` everything outside the mask is 0.
3. In-plane resampling of every axial slice to ``image_size`` px. ``fov_mm`` set: a square of
   ``fov_mm`` mm centred on the in-plane bounding box of the brain mask (or of the foreground),
   so a brain covers the same number of pixels whatever the voxel size (DESIGN §5, "Physical
   scale"); when a pixel is larger than a voxel the slice is first smoothed with the Gaussian
   skimage's ``resize`` uses (sigma = (factor - 1) / 2 voxels), then sampled linearly, zero
   outside the volume. ``fov_mm=None``: the reference's centre crop to the square of the
   shorter side and skimage ``resize`` with its defaults.
4. Background: outside the (resampled, > 0.5) mask exactly 0; values clipped to [0, 1].
   Slices whose share of pixels > 0 is <= ``min_foreground_fraction`` are dropped (0 drops the
   empty slices, as the reference does).

RGB (``prepare_image``, reference-method §8): shorter side to ``image_size`` with Lanczos
(PIL, on the 8-bit values when the image is 8-bit), centre crop, then ``(x - 0.5) * 2``.

Every in-plane mapping is ``input_coordinate = offset + scale * output_pixel`` per axis (pixel
centres), recorded in ``Prepared.geometry`` together with the reorientation, so the geometry
dict alone (JSON, e.g. from a case record) suffices to invert or to bring a label mask into
slice space.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from condiff.errors import InputImageError

MODALITIES = ("mri", "rgb")
NORMALISATIONS = ("max", "percentile")
ZERO_BELOW = 1e-4  # reference-method §8 step 3: interpolation residue below this is background
LANDMARK_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
MASK_THRESHOLD = 0.5  # a resampled brain mask is inside where it is > 0.5
LABEL_THRESHOLD = 0.4  # reference-method §8 item 6: resampled lesion masks are binarised at > 0.4
# Contract limits, checked when a config is read. image_size: the paper uses 128; every slice is resampled
# to it and the network's attention memory grows with its 4th power, so 1024 px is far past any use
# (1000000 failed with a MemoryError mid-run, 2048 ran for minutes). fov_mm: a slice's side in mm, from
# small-animal scans (~10-20 mm) to a whole-body slice (~500 mm); beyond that the anti-aliasing Gaussian
# (sigma ~ pixel/voxel size) grows without bound, and Infinity failed deep in the resampling.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
MIN_FOV_MM, MAX_FOV_MM = 1.0, 1000.0


def _is_number(value: Any) -> bool:
    """A finite real number (JSON's numbers); a string, a bool, NaN or Infinity is not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _number(name: str, value: Any) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects its input to look like; stored as ``config.json["preprocessing"]``."""

    modality: str
    image_size: int = 128
    orientation: str = "RAS"
    fov_mm: float | None = 192.0
    normalisation: str = "max"
    percentiles: tuple[float, float] = (0.5, 99.5)
    use_mask: bool = False
    min_foreground_fraction: float = 0.0
    landmarks: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)) \
                or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, not {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        code = str(self.orientation).upper()
        if len(code) != 3 or sorted(_AXIS_OF[c] for c in code if c in _AXIS_OF) != [0, 1, 2]:
            raise ValueError(f"orientation must be three axis codes such as 'RAS' or 'LPS', not {self.orientation!r}")
        object.__setattr__(self, "orientation", code)
        if self.fov_mm is not None:  # None: the reference's centre crop (condiff-train --fov-mm 0 writes None)
            if not _is_number(self.fov_mm) or not MIN_FOV_MM <= self.fov_mm <= MAX_FOV_MM:
                raise ValueError(f"fov_mm must be a number of millimetres in [{MIN_FOV_MM:g}, {MAX_FOV_MM:g}] "
                                 f"or null (centre crop), not {self.fov_mm!r}")
            object.__setattr__(self, "fov_mm", float(self.fov_mm))
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {self.normalisation!r}")
        lo, hi = (_number("percentiles", p) for p in self.percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, not {self.percentiles!r}")
        object.__setattr__(self, "percentiles", (lo, hi))
        if not isinstance(self.use_mask, bool):
            raise ValueError(f"use_mask must be true or false, not {self.use_mask!r}")
        f = _number("min_foreground_fraction", self.min_foreground_fraction)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"min_foreground_fraction must be in [0, 1), not {self.min_foreground_fraction!r}")
        object.__setattr__(self, "min_foreground_fraction", f)
        if self.landmarks is not None:
            if self.modality != "mri" or self.normalisation != "percentile":
                raise ValueError("landmarks apply to MRI with 'percentile' normalisation only")
            marks = tuple(_number("landmarks", v) for v in self.landmarks)
            if len(marks) != len(LANDMARK_PERCENTILES) or not all(0.0 <= v <= 1.0 for v in marks) \
                    or any(b <= a for a, b in zip(marks, marks[1:])):
                raise ValueError(f"landmarks must be {len(LANDMARK_PERCENTILES)} increasing values in [0, 1] "
                                 f"(at percentiles {LANDMARK_PERCENTILES}), not {self.landmarks!r}")
            object.__setattr__(self, "landmarks", marks)

    @property
    def channels(self) -> int:
        return 1 if self.modality == "mri" else 3

    @property
    def value_range(self) -> tuple[float, float]:
        """The nominal range of prepared slices: MRI [0, 1] (background 0), RGB photos [-1, 1]."""
        return (0.0, 1.0) if self.modality == "mri" else (-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["percentiles"] = list(self.percentiles)
        if self.landmarks is None:
            del d["landmarks"]  # configs written before landmarks existed stay byte-identical
        else:
            d["landmarks"] = list(self.landmarks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(names)}")
        if "modality" not in d:
            raise ValueError("preprocessing needs a 'modality' ('mri' or 'rgb')")
        d = dict(d)
        if "percentiles" in d:
            p = d["percentiles"]
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f"percentiles must be a pair [low, high], not {p!r}")
            d["percentiles"] = tuple(p)
        if d.get("landmarks") is not None:
            if not isinstance(d["landmarks"], (list, tuple)):
                raise ValueError(f"landmarks must be a list of numbers, not {d['landmarks']!r}")
            d["landmarks"] = tuple(d["landmarks"])
        return cls(**d)


_AXIS_OF = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


@dataclass
class Prepared:
    """Model input for one case.

    ``slices``: float32 ``(S, C, H, W)`` — MRI C=1 in [0, 1] with background exactly 0; RGB C=3
    in [-1, 1] and S=1. ``foreground``: bool ``(S, H, W)`` — the brain mask in slice space, or
    ``slices > 0`` without a mask; all True for RGB (no background handling, reference §1).
    ``slice_index``: int64 ``(S,)`` — index of each slice along the canonical axial axis (0 for
    an image). ``geometry``: JSON-safe dict with everything ``invert_to_input`` and
    ``mask_to_slices`` need (slice_index included).
    """

    slices: np.ndarray
    foreground: np.ndarray
    slice_index: np.ndarray
    geometry: dict[str, Any]


Geometry = Union[Prepared, dict]


# ----------------------------------------------------------------------------------------- helpers


def _orientation(affine: np.ndarray, shape: tuple[int, ...], code: str) -> np.ndarray:
    """(3, 2) nibabel orientation transform input -> ``code``; identity for a single slice that it would tip over."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    t = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(code)))
    if shape[2] == 1 and int(t[2, 0]) != 2:
        # A 2-D image stored as (H, W, 1) whose affine says it is not axial: keep it as stored
        # rather than turning the single slice into a 1-pixel-wide image.
        t = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return t


def _inverse_orientation(t: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(t)
    for axis, (new_axis, flip) in enumerate(t):
        inv[int(new_axis)] = [axis, flip]
    return inv


def _apply_orientation(arr: np.ndarray, t: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(arr, t))


def auto_foreground(data: np.ndarray) -> np.ndarray:
    """Voxels that differ from a constant background: bool, same shape as ``data``.

    The background is the value shared by most of the 8 corner voxels when at least 4 agree
    (0 for skull-stripped data, a negative constant for z-scored data such as the BraTS kit);
    otherwise everything above the minimum counts as foreground.
    """
    corners = data[np.ix_([0, -1], [0, -1], [0, -1])].ravel()
    values, counts = np.unique(corners, return_counts=True)
    if counts.max() >= 4:
        return data != values[np.argmax(counts)]
    return data > data.min()


def intensity_landmarks(values: np.ndarray) -> np.ndarray:
    """The ``LANDMARK_PERCENTILES`` of ``values`` (float64), made strictly increasing."""
    marks = np.percentile(np.asarray(values, dtype=np.float64), LANDMARK_PERCENTILES)
    # Ties (quantised data, a clipped tail) would make the piecewise map undefined; separate them minutely.
    return np.maximum.accumulate(marks + 1e-9 * np.arange(len(marks)))


LANDMARK_CHUNK = 1 << 20  # values mapped at a time: float64 temporaries stay ~40 MiB, not ~40 B per voxel


def map_landmarks(values: np.ndarray, source: np.ndarray, target: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Piecewise-linear map sending ``source`` landmarks to ``target``, continued linearly past both ends.

    Computed in float64 a chunk at a time and stored as ``dtype`` (a whole 0.5 mm volume at once made
    five float64 copies of it: 1.9 GB of the peak for a 512x512x300 scan)."""
    values = np.asarray(values)
    src, dst = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    low_slope = (dst[1] - dst[0]) / max(src[1] - src[0], 1e-9)
    high_slope = (dst[-1] - dst[-2]) / max(src[-1] - src[-2], 1e-9)
    flat_in = values.reshape(-1)
    result = np.empty(values.shape, dtype=dtype)
    flat_out = result.reshape(-1)  # a view: result is new and contiguous
    for start in range(0, flat_in.size, LANDMARK_CHUNK):
        v = flat_in[start:start + LANDMARK_CHUNK].astype(np.float64)
        out = np.interp(v, src, dst)
        out = np.where(v < src[0], dst[0] + (v - src[0]) * low_slope, out)
        flat_out[start:start + LANDMARK_CHUNK] = np.where(v > src[-1], dst[-1] + (v - src[-1]) * high_slope, out)
    return result


def _bbox_centre(inside: np.ndarray) -> tuple[float, float]:
    """Centre (axis 0, axis 1) of the in-plane bounding box of a (X, Y, Z) bool array, in voxels."""
    proj = inside.any(axis=2)
    if not proj.any():
        return (inside.shape[0] - 1) / 2, (inside.shape[1] - 1) / 2
    xs = np.flatnonzero(proj.any(axis=1))
    ys = np.flatnonzero(proj.any(axis=0))
    return (xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2


def _resample_forward(vol: np.ndarray, scale, offset, n: int) -> np.ndarray:
    """(X, Y, Z) -> (Z, n, n): slice pixel (u, v) samples (offset0 + scale0*u, offset1 + scale1*v).

    Gaussian anti-aliasing as skimage's ``resize`` does when a pixel spans more than a voxel;
    linear interpolation; zero outside the volume.
    """
    from scipy import ndimage as ndi

    src = np.asarray(vol, dtype=np.float32)
    sigma = [max(0.0, (s - 1.0) / 2.0) for s in scale] + [0.0]
    if any(s > 0 for s in sigma):
        src = ndi.gaussian_filter(src, sigma, mode="constant", cval=0.0)
    out = _diagonal_affine(src, np.array([scale[0], scale[1], 1.0]), offset=np.array([offset[0], offset[1], 0.0]),
                           output_shape=(n, n, src.shape[2]), order=1, mode="grid-constant", cval=0.0)
    return np.ascontiguousarray(np.moveaxis(out, 2, 0), dtype=np.float32)


def _diagonal_affine(array: np.ndarray, diagonal: np.ndarray, **kw) -> np.ndarray:
    """scipy's ``affine_transform`` with a diagonal matrix given as its 1-D diagonal (the fast zoom-and-shift
    path). SciPy before 1.16 (the newest on Python 3.10) warns on every such call that 1-D matrices
    changed meaning in SciPy 0.18; this is the meaning meant, so the warning is not shown to users."""
    import warnings

    from scipy import ndimage as ndi

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The behavior of affine_transform with a 1-D array",
                                category=UserWarning)
        return ndi.affine_transform(array, diagonal, **kw)


def _resample_back(stack: np.ndarray, scale, offset, out_hw: tuple[int, int], fill: float) -> np.ndarray:
    """(n, n, K) -> (X, Y, K): the inverse of the in-plane mapping, linear; ``fill`` outside the square."""
    n0, n1, k = stack.shape
    out = _diagonal_affine(np.asarray(stack, dtype=np.float32), np.array([1 / scale[0], 1 / scale[1], 1.0]),
                           offset=np.array([-offset[0] / scale[0], -offset[1] / scale[1], 0.0]),
                           output_shape=(out_hw[0], out_hw[1], k), order=1, mode="nearest")
    u = (np.arange(out_hw[0]) - offset[0]) / scale[0]
    v = (np.arange(out_hw[1]) - offset[1]) / scale[1]
    out[(u < -0.5) | (u > n0 - 0.5)] = fill
    out[:, (v < -0.5) | (v > n1 - 0.5)] = fill
    return out


def _reference_crop(shape_xy: tuple[int, int]) -> tuple[int, int, int]:
    """The reference's ``rectangularize``: start (axis 0), start (axis 1) and side of the centre square."""
    w, h = shape_xy
    if w < h:
        return 0, (h - w) // 2, w
    if h < w:
        return (w - h) // 2, 0, h
    return 0, 0, w


def _resize_reference(vol: np.ndarray, x0: int, y0: int, side: int, n: int) -> np.ndarray:
    """(X, Y, Z) -> (Z, n, n) exactly as the reference: crop, then skimage ``resize`` with defaults."""
    from skimage.transform import resize

    stack = np.moveaxis(vol, 2, 0)[:, x0:x0 + side, y0:y0 + side]
    return np.asarray(resize(stack, [stack.shape[0], n, n]), dtype=np.float32)


def _geometry(g: Geometry) -> dict[str, Any]:
    return g.geometry if isinstance(g, Prepared) else g


# ----------------------------------------------------------------------------------------- MRI


def _normalise_native(vol: np.ndarray, mask: np.ndarray | None, cfg: PreprocessConfig, path: str) -> tuple[np.ndarray, dict]:
    """Intensity step on the native (reoriented) grid; returns the volume and how to undo it."""
    if cfg.normalisation == "max":
        vol[vol < ZERO_BELOW] = 0.0
        intensity = {"offset": 0.0, "scale": 1.0}  # scale set after resampling, when the maximum is known
    else:
        region = mask if mask is not None else auto_foreground(vol)
        if not region.any():
            raise InputImageError(path, "no foreground voxels to normalise", "Check the image and its brain mask")
        lo, hi = (float(v) for v in np.percentile(vol[region].astype(np.float64), cfg.percentiles))
        if not hi > lo:
            raise InputImageError(path, f"constant intensity ({lo:g}) inside the brain mask", "Check the image and its brain mask")
        vol = ((np.clip(vol, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        intensity = {"offset": lo, "scale": hi - lo}
        if cfg.landmarks is not None:
            own = intensity_landmarks(vol[region])
            # Only inside the region: the background keeps its value (0 after the clip above).
            vol[region] = np.clip(map_landmarks(vol[region], own, cfg.landmarks), 0.0, 1.0)
            intensity["landmarks_own"] = [float(v) for v in own]
            intensity["landmarks_to"] = list(cfg.landmarks)
    if cfg.use_mask:
        vol[~mask] = 0.0
    return vol, intensity


def normalised_intensities(volume, mask: np.ndarray | None, cfg: PreprocessConfig) -> np.ndarray:
    """The contract's intensity step alone (percentiles, landmarks, mask) on the volume's own grid: float32,
    same shape as ``volume.data``; for inspecting where tissue lands on the model's scale."""
    data = np.asarray(volume.data, dtype=np.float32).copy()
    region = None if mask is None else np.asarray(mask, dtype=bool)
    return _normalise_native(data, region, cfg, volume.path)[0]


def fit_landmarks(cases, cfg: PreprocessConfig) -> tuple[float, ...]:
    """Standard landmarks for ``cfg``: the mean over ``cases`` ((volume, brain mask or None) pairs,
    the training scans) of each scan's ``intensity_landmarks`` after the percentile step."""
    base = dataclasses.replace(cfg, landmarks=None)
    if base.modality != "mri" or base.normalisation != "percentile":
        raise ValueError("landmarks apply to MRI with 'percentile' normalisation only")
    marks = []
    for volume, mask in cases:
        region = np.asarray(mask, dtype=bool) if mask is not None else auto_foreground(np.asarray(volume.data))
        marks.append(intensity_landmarks(normalised_intensities(volume, mask, base)[region]))
    if not marks:
        raise ValueError("fit_landmarks needs at least one scan")
    # Each scan's landmarks are increasing and in [0, 1] (up to the 1e-9 tie breaks), so their mean is too.
    return tuple(float(v) for v in np.clip(np.mean(np.asarray(marks), axis=0), 0.0, 1.0))


def prepare_volume(volume, cfg: PreprocessConfig, mask: np.ndarray | None = None) -> Prepared:
    """Apply the MRI contract to a ``condiff.io.volumes.Volume``.

    ``mask``: optional bool brain mask on the volume's grid (``read_mask``); required when
    ``cfg.use_mask``. Returns ``Prepared`` with ``slices`` ``(S, 1, N, N)`` in [0, 1].
    """
    if cfg.modality != "mri":
        raise ValueError(f"prepare_volume needs an 'mri' contract, got {cfg.modality!r}")
    data = np.asarray(volume.data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"volume data must be 3-D, got {data.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from volume shape {data.shape}")
        if not mask.any():
            raise InputImageError(volume.path, "the brain mask is empty", "Check the mask file")
    elif cfg.use_mask:
        raise InputImageError(volume.path, "this model's preprocessing uses a brain mask and none was given",
                              "Pass the brain mask (e.g. --mask '{dir}/{stem}_brainmask.nii.gz')")
    from nibabel.orientations import aff2axcodes

    t = _orientation(volume.affine, data.shape, cfg.orientation)
    vol = _apply_orientation(data, t).astype(np.float32, copy=True)
    m = None if mask is None else _apply_orientation(mask, t)
    zooms_in = np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0)
    zooms = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(t):
        zooms[int(new_axis)] = float(zooms_in[axis])

    vol, intensity = _normalise_native(vol, m, cfg, volume.path)
    n = cfg.image_size
    if cfg.fov_mm is None:
        x0, y0, side = _reference_crop(vol.shape[:2])
        stack = _resize_reference(vol, x0, y0, side, n)
        fg_stack = None if m is None else _resize_reference(m.astype(np.float32), x0, y0, side, n)
        scale = [side / n, side / n]
        offset = [x0 + 0.5 * side / n - 0.5, y0 + 0.5 * side / n - 0.5]
        mode = "reference"
    else:
        cx, cy = _bbox_centre(m if m is not None else vol > 0)
        pixel_mm = cfg.fov_mm / n
        scale = [pixel_mm / zooms[0], pixel_mm / zooms[1]]
        offset = [cx - (n - 1) / 2 * scale[0], cy - (n - 1) / 2 * scale[1]]
        stack = _resample_forward(vol, scale, offset, n)
        fg_stack = None if m is None else _resample_forward(m.astype(np.float32), scale, offset, n)
        mode = "fov"

    if cfg.normalisation == "max":
        peak = float(stack.max())
        if peak > 0:
            stack /= np.float32(peak)
            intensity["scale"] = peak
    if fg_stack is not None:
        foreground = fg_stack > MASK_THRESHOLD
        if cfg.use_mask:
            stack[~foreground] = 0.0
    np.clip(stack, 0.0, 1.0, out=stack)
    if fg_stack is None:
        foreground = stack > 0
    share = (stack > 0).mean(axis=(1, 2))
    keep = np.flatnonzero(share > cfg.min_foreground_fraction).astype(np.int64)

    geometry = {
        "kind": "volume", "mode": mode, "image_size": n, "orientation": cfg.orientation,
        "input_shape": [int(s) for s in data.shape], "input_axcodes": list(aff2axcodes(volume.affine)),
        "canonical_shape": [int(s) for s in vol.shape], "ornt": [[int(a), int(f)] for a, f in t],
        "scale": [float(s) for s in scale], "offset": [float(o) for o in offset],
        "voxel_size_mm": zooms, "pixel_size_mm": [float(scale[0] * zooms[0]), float(scale[1] * zooms[1])],
        "intensity": {k: (float(v) if np.isscalar(v) else [float(x) for x in v]) for k, v in intensity.items()},
        "slice_index": [int(k) for k in keep],
    }
    return Prepared(slices=np.ascontiguousarray(stack[keep][:, None]), foreground=np.ascontiguousarray(foreground[keep]),
                    slice_index=keep, geometry=geometry)


# ----------------------------------------------------------------------------------------- RGB


def _rgb_layout(h: int, w: int, n: int) -> tuple[int, int, int, int]:
    """torchvision ``Resize(n)`` + ``CenterCrop(n)`` on an h x w image: (new_h, new_w, top, left)."""
    if w <= h:
        new_w, new_h = n, int(n * h / w)
    else:
        new_h, new_w = n, int(n * w / h)
    return new_h, new_w, int(round((new_h - n) / 2.0)), int(round((new_w - n) / 2.0))


def prepare_image(rgb_hw3: np.ndarray, cfg: PreprocessConfig) -> Prepared:
    """Apply the RGB contract to an ``(H, W, 3)`` float image in [0, 1] (``read_image``).

    Returns ``Prepared`` with ``slices`` ``(1, 3, N, N)`` in [-1, 1].
    """
    from PIL import Image

    if cfg.modality != "rgb":
        raise ValueError(f"prepare_image needs an 'rgb' contract, got {cfg.modality!r}")
    img = np.asarray(rgb_hw3, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {img.shape}")
    h, w = img.shape[:2]
    n = cfg.image_size
    new_h, new_w, top, left = _rgb_layout(h, w, n)
    u8 = np.round(img * 255.0)
    if np.array_equal(u8 / np.float32(255.0), img) or np.abs(u8 / 255.0 - img).max() < 1e-6:
        # 8-bit source: resize the bytes, as the reference does on the PIL image.
        small = np.asarray(Image.fromarray(u8.astype(np.uint8), "RGB").resize((new_w, new_h), Image.LANCZOS))
        small = small.astype(np.float32) / np.float32(255.0)
    else:  # 16-bit or float source: the same filter in float, per channel
        small = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c]), "F")
                                     .resize((new_w, new_h), Image.LANCZOS)) for c in range(3)], axis=2)
        small = np.clip(small, 0.0, 1.0).astype(np.float32)
    crop = small[top:top + n, left:left + n]
    slices = ((crop - np.float32(0.5)) * np.float32(2.0)).transpose(2, 0, 1)[None]
    scale = [h / new_h, w / new_w]
    geometry = {
        "kind": "image", "mode": "rgb", "image_size": n, "input_shape": [h, w],
        "resized_shape": [new_h, new_w], "crop": [top, left],
        "scale": [float(s) for s in scale],
        "offset": [float((top + 0.5) * scale[0] - 0.5), float((left + 0.5) * scale[1] - 0.5)],
        "slice_index": [0],
    }
    return Prepared(slices=np.ascontiguousarray(slices, dtype=np.float32), foreground=np.ones((1, n, n), dtype=bool),
                    slice_index=np.zeros(1, dtype=np.int64), geometry=geometry)


def analysed_box(geometry: dict) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)``: the part of a photograph the model saw (the RGB contract's centre
    square, as the reference crops), in input pixels; the whole photo when it is square."""
    h, w = geometry["input_shape"]
    (top, left), (sh, sw), n = geometry["crop"], geometry["scale"], geometry["image_size"]
    return (int(round(top * sh)), min(h, int(round((top + n) * sh))), int(round(left * sw)),
            min(w, int(round((left + n) * sw))))


# ----------------------------------------------------------------------------------------- inverse


def invert_to_input(prepared: Geometry, maps: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Bring slice-space values back onto the input's grid (float32).

    ``maps``: ``(S, H, W)`` or ``(S, C, H, W)`` matching ``prepared.slices``; ``prepared`` may be
    the ``Prepared`` or its ``geometry`` dict. Volumes: returns the input volume's shape
    (``Volume.data.shape``, C must be 1), in its voxel order so it overlays the input with the
    input's affine; slices not kept and voxels outside the field of view are ``fill``.
    Images: ``(H, W)`` for 3-D ``maps``, ``(H, W, C)`` for 4-D. Linear interpolation.
    """
    g = _geometry(prepared)
    maps = np.asarray(maps, dtype=np.float32)
    n = g["image_size"]
    s = len(g["slice_index"])
    channels = maps.ndim == 4
    if maps.ndim not in (3, 4) or maps.shape[0] != s or maps.shape[-2:] != (n, n):
        raise ValueError(f"maps must be ({s}, [C,] {n}, {n}), got {maps.shape}")
    stack = np.moveaxis(maps.reshape(s, -1, n, n), (0, 1), (2, 3)).reshape(n, n, -1)  # (n, n, S*C)
    if g["kind"] == "image":
        h, w = g["input_shape"]
        out = _resample_back(stack, g["scale"], g["offset"], (h, w), fill)
        return out if channels else out[:, :, 0]
    if channels and maps.shape[1] != 1:
        raise ValueError(f"volume maps have one channel, got {maps.shape[1]}")
    cx, cy, cz = g["canonical_shape"]
    canonical = np.full((cx, cy, cz), fill, dtype=np.float32)
    if s:
        canonical[:, :, g["slice_index"]] = _resample_back(stack, g["scale"], g["offset"], (cx, cy), fill)
    t = np.asarray(g["ornt"], dtype=float)
    return _apply_orientation(canonical, _inverse_orientation(t)).reshape(g["input_shape"])


def input_slice(geometry: dict, k: int) -> tuple[int, int]:
    """(stored axis, index along it) of canonical axial slice ``k`` as the input file numbers it.

    The model slices along the canonical inferior-superior axis, which may be any stored axis, reversed
    or not; users and viewers count slices in the file's own order."""
    ornt = geometry["ornt"]
    axis = next(i for i, (new_axis, _) in enumerate(ornt) if int(new_axis) == 2)
    n = int(geometry["input_shape"][axis]) if axis < len(geometry["input_shape"]) else 1
    return axis, (n - 1 - int(k) if int(ornt[axis][1]) == -1 else int(k))


def mask_to_slices(mask_volume, prepared: Geometry) -> np.ndarray:
    """A label mask on the input grid -> bool ``(S, H, W)`` in slice space, same geometry as the slices.

    ``mask_volume``: array (or ``Volume``) with the input's shape. Volumes: its values (a bool mask
    as 0/1, a label map's own values, as the reference loads segmentations "without the division")
    go through the same reorientation and in-plane resampling as the image (linear), then > 0.4
    (reference-method §8 item 6); so BraTS labels 1-4 give a slightly wider mask than a mask
    binarised first would. Images: voxels > 0 are the label, nearest-neighbour resize and the same
    crop (reference §8, DDR masks).
    """
    g = _geometry(prepared)
    arr = np.asarray(getattr(mask_volume, "data", mask_volume))
    n = g["image_size"]
    if g["kind"] == "image":
        from PIL import Image

        if arr.ndim == 3:
            arr = arr.max(axis=2)
        if list(arr.shape) != list(g["input_shape"]):
            raise ValueError(f"mask shape {arr.shape} differs from the image's {tuple(g['input_shape'])}")
        new_h, new_w = g["resized_shape"]
        top, left = g["crop"]
        small = np.asarray(Image.fromarray(((arr > 0) * 255).astype(np.uint8), "L").resize((new_w, new_h), Image.NEAREST))
        return (small[top:top + n, left:left + n] > 0)[None]
    if list(arr.shape) != list(g["input_shape"]):
        raise ValueError(f"mask shape {arr.shape} differs from the volume's {tuple(g['input_shape'])}")
    binary = _apply_orientation(np.asarray(arr, dtype=np.float32), np.asarray(g["ornt"], dtype=float))
    if g["mode"] == "reference":
        cx, cy = g["canonical_shape"][:2]
        x0, y0, side = _reference_crop((cx, cy))
        stack = _resize_reference(binary, x0, y0, side, n)
    else:
        stack = _resample_forward(binary, g["scale"], g["offset"], n)
    return np.ascontiguousarray(stack[np.asarray(g["slice_index"], dtype=np.int64)] > LABEL_THRESHOLD)


def to_input_units(prepared: Geometry, values: np.ndarray) -> np.ndarray:
    """Undo the MRI intensity normalisation (e.g. for a restoration): ``offset + scale * values``,
    after undoing the landmark map where the contract has one."""
    g = _geometry(prepared)
    if g["kind"] != "volume":
        raise ValueError("to_input_units applies to MRI volumes")
    i = g["intensity"]
    if "landmarks_own" in i:
        values = map_landmarks(values, i["landmarks_to"], i["landmarks_own"], dtype=np.float32)
    return (np.float32(i["offset"]) + np.float32(i["scale"]) * np.asarray(values, dtype=np.float32)).astype(np.float32)


__all__ = ["PreprocessConfig", "Prepared", "prepare_volume", "prepare_image", "invert_to_input", "input_slice",
           "analysed_box",
           "mask_to_slices",
           "auto_foreground", "to_input_units", "intensity_landmarks", "map_landmarks", "fit_landmarks", "normalised_intensities",
           "LANDMARK_PERCENTILES"]
