"""NIfTI volumes in and out, validated at the boundary that knows the file.

``read_volume`` sniffs the bytes (gzip or not, NIfTI-1 or NIfTI-2) instead of trusting the
extension, checks the header's dimensions before anything is allocated, reads the whole
(bounded) stream so a truncated or bit-flipped ``.nii.gz`` fails here with the file's name,
and refuses NaN/Inf, constant and empty volumes, and volumes whose slices (axial, along the
axis the affine says is inferior-superior, as ``preprocess`` slices them) are smaller in-plane
than the SSIM window: upscaling those to the model size would invent structure. ``write_like`` writes a float map that
overlays its input voxel for voxel: same shape, affine, qform/sform and codes (the input
header is copied; only data type, scaling and display range change), with deterministic
bytes, through ``io.atomic``.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condiff.errors import InputImageError
from condiff.io.atomic import write_bytes_atomic
from condiff.io.atomic import read_head
from condiff.io.cases import DICOM_HINT
from condiff.io.images import MIN_SIDE

logger = logging.getLogger(__name__)

MAX_DIM = 4096  # voxels along any axis; larger is a corrupt or hostile header for brain MRI
# refuse before decompressing: a few MB of .nii.gz can declare GBs of zeros, and a run holds about 9x the
# float32 volume; 2**28 voxels (1 GiB as float32) still admits 512x512x1024
MAX_VOXELS = 2**28
# a 4-D series is decoded whole before --volume-index picks one volume: 2**30 voxels (4 GiB as float32)
# still admits an HCP-style fMRI run (104x90x72x1200 = 809 M)
MAX_SERIES_VOXELS = 2**30
_SLACK_BYTES = 64 * 2**20  # bytes a gzip stream may hold beyond its declared data before we stop reading
_GZIP_MAGIC = b"\x1f\x8b"
_COLOUR_TYPES = {128: "RGB24", 2304: "RGBA32"}
_COMPLEX_TYPES = {32: "complex64", 1792: "complex128", 2048: "complex256"}
_OTHER_MAGIC = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image", b"DICM": "a DICOM file", b"PK\x03\x04": "a ZIP archive",
}


@dataclass
class Volume:
    """One 3-D scan as read from disk.

    ``data``: float32 ``(X, Y, Z)`` in the file's voxel order, values as nibabel's ``get_fdata``
    returns them (``scl_slope``/``scl_inter`` applied). ``affine``: 4x4 float64 voxel -> RAS mm.
    ``header``: the nibabel header (copied into outputs). ``path``: where it came from.
    ``nonfinite``: NaN/Inf voxels replaced by 0 (``nan_policy="zero"``); ``series``: volumes in the file
    (1 for a 3-D file; more when one was picked from a 4-D series).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: str
    nonfinite: int = 0
    series: int = 1

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (column norms of the affine)."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))


# ----------------------------------------------------------------------------------------- reading


def _open_bytes(path: Path) -> bytes:
    """Read the first bytes, mapping OS errors to messages a user can act on."""
    return read_head(path, 4, "a NIfTI file")


def _parse_header(path: Path, block: bytes) -> dict[str, Any]:
    """Pick out what the size checks need from a raw NIfTI-1/-2 header, without nibabel."""
    if len(block) >= 348:
        for endian in "<>":
            size = int(np.frombuffer(block[:4], dtype=f"{endian}i4")[0])
            if size == 348 and block[344:348] in (b"n+1\x00", b"ni1\x00"):
                if block[344:348] == b"ni1\x00":
                    raise InputImageError(path, "is the header of a NIfTI pair (.hdr/.img)",
                                          "Convert it to a single .nii or .nii.gz file")
                return {
                    "version": 1, "endian": endian,
                    "dim": np.frombuffer(block[40:56], dtype=f"{endian}i2").astype(np.int64),
                    "datatype": int(np.frombuffer(block[70:72], dtype=f"{endian}i2")[0]),
                    "bitpix": int(np.frombuffer(block[72:74], dtype=f"{endian}i2")[0]),
                    "vox_offset": float(np.frombuffer(block[108:112], dtype=f"{endian}f4")[0]),
                }
            if size == 540 and len(block) >= 540 and block[4:8] in (b"n+2\x00", b"ni2\x00"):
                if block[4:8] == b"ni2\x00":
                    raise InputImageError(path, "is the header of a NIfTI-2 pair (.hdr/.img)",
                                          "Convert it to a single .nii or .nii.gz file")
                return {
                    "version": 2, "endian": endian,
                    "dim": np.frombuffer(block[16:80], dtype=f"{endian}i8").astype(np.int64),
                    "datatype": int(np.frombuffer(block[12:14], dtype=f"{endian}i2")[0]),
                    "bitpix": int(np.frombuffer(block[14:16], dtype=f"{endian}i2")[0]),
                    "vox_offset": float(np.frombuffer(block[168:176], dtype=f"{endian}i8")[0]),
                }
            if size == 348 and endian == "<" and block[344:348] not in (b"n+1\x00", b"ni1\x00"):
                raise InputImageError(path, "has an Analyze 7.5 header, not NIfTI",
                                      "Convert it to NIfTI (e.g. with nibabel or fslchfiletype)")
    head = block[:4]
    for magic, what in _OTHER_MAGIC.items():
        if head.startswith(magic):
            hint = DICOM_HINT if what == "a DICOM file" else "Give a .nii or .nii.gz volume"
            raise InputImageError(path, f"not a NIfTI file (the bytes are {what})", hint)
    if block[128:132] == b"DICM":
        raise InputImageError(path, "not a NIfTI file (the bytes are a DICOM file)", DICOM_HINT)
    raise InputImageError(path, f"not a NIfTI file (no NIfTI header; first bytes {block[:8]!r})",
                          "Give a .nii or .nii.gz volume")


def _check_dims(path: Path, hdr: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """Shape and data size the header declares; refuse absurd values before any allocation."""
    if not np.isfinite(hdr["vox_offset"]):
        raise InputImageError(path, f"corrupt NIfTI header (vox_offset = {hdr['vox_offset']})")
    dim = hdr["dim"]
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        raise InputImageError(path, f"corrupt NIfTI header (dim[0] = {ndim}, must be 1-7)")
    shape = tuple(int(d) for d in dim[1:ndim + 1])
    if any(d <= 0 for d in shape):
        raise InputImageError(path, f"corrupt NIfTI header (dimensions {shape} include zero or negative sizes)")
    if max(shape) > MAX_DIM:
        raise InputImageError(path, f"header declares an implausible size {shape} (limit {MAX_DIM} per axis)",
                              "The header is corrupt or the file is not a brain volume")
    per_volume = int(np.prod(shape[:3], dtype=np.float64))
    n_voxels = int(np.prod(shape, dtype=np.float64))  # every volume of a series: all of it is decoded
    for count, limit, what in ((per_volume, MAX_VOXELS, "voxels per volume"),
                               (n_voxels, MAX_SERIES_VOXELS, "voxels in all")):
        if count > limit:
            raise InputImageError(path, f"header declares {shape} = {count} {what}, more than the limit of {limit} "
                                        f"({limit * 4 // 2**30} GiB as float32); refused before decompressing it",
                                  "Crop or downsample the volume (or split a series into single volumes)")
    if hdr["datatype"] in _COLOUR_TYPES:
        raise InputImageError(path, f"colour NIfTI ({_COLOUR_TYPES[hdr['datatype']]}) is not supported",
                              "Give one grey-scale volume per file")
    if hdr["datatype"] in _COMPLEX_TYPES:
        raise InputImageError(path, f"complex-valued NIfTI ({_COMPLEX_TYPES[hdr['datatype']]}) is not supported",
                              "Give a magnitude image")
    if hdr["bitpix"] <= 0 or hdr["bitpix"] % 8:
        raise InputImageError(path, f"corrupt NIfTI header (bitpix = {hdr['bitpix']})")
    nbytes = int(np.prod(shape)) * hdr["bitpix"] // 8
    return shape, nbytes


def _read_raw(path: Path) -> tuple[bytes, dict[str, Any], tuple[int, ...]]:
    """The whole uncompressed NIfTI byte stream, size-checked against its header."""
    head = _open_bytes(path)
    gz = head[:2] == _GZIP_MAGIC
    suffix_gz = path.name.lower().endswith(".gz")
    if gz != suffix_gz:
        logger.warning("%s: content is %s although the name says otherwise; reading it by content",
                       path, "gzip-compressed" if gz else "not compressed")
    try:
        with open(path, "rb") as f:
            stream = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
            block = stream.read(540)
            hdr = _parse_header(path, block)
            shape, nbytes = _check_dims(path, hdr)
            need = max(int(hdr["vox_offset"]), 544 if hdr["version"] == 2 else 352) + nbytes
            # Read to the end so gzip verifies its CRC, but never more than the header promised
            # (plus slack): the bound is what stops a decompression bomb.
            chunks = [block]
            have = len(block)
            while True:
                chunk = stream.read(min(1 << 24, need + _SLACK_BYTES + 1 - have))
                if not chunk:
                    break
                chunks.append(chunk)
                have += len(chunk)
                if have > need + _SLACK_BYTES:
                    raise InputImageError(path, f"holds far more data than its header declares ({need} bytes)",
                                          "The file is corrupt")
    except InputImageError:
        raise
    except EOFError as exc:
        raise InputImageError(path, "truncated (the compressed stream ends early)",
                              "The file was not copied or written completely") from exc
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise InputImageError(path, f"corrupt compressed data ({exc})", "The file is damaged; copy it again") from exc
    except PermissionError as exc:
        raise InputImageError(path, f"cannot read the file: permission denied ({exc.strerror})") from exc
    except OSError as exc:
        raise InputImageError(path, f"cannot read the file ({exc})") from exc
    raw = b"".join(chunks)
    if len(raw) < need:
        raise InputImageError(path, f"truncated: the header declares {need} bytes, the file holds {len(raw)}",
                              "The file was not copied or written completely")
    return raw, hdr, shape


def in_plane_axes(affine: np.ndarray, shape: tuple[int, ...], orientation: str = "RAS") -> tuple[int, int]:
    """The two axes of a ``(X, Y, Z)`` array that span one model slice, in array order: those that
    ``condiff.preprocess`` reorients onto the slice plane (a single slice stored as ``(H, W, 1)`` keeps
    axes 0 and 1). An affine whose orientation cannot be read also gives axes 0 and 1.
    """
    from condiff.preprocess import _orientation  # the preprocessing's own transform, not a copy of it

    try:
        t = _orientation(affine, shape, orientation)
    except ValueError:  # a zero or NaN column: no axis code to go by
        return (0, 1)
    slice_axis = next(axis for axis, (new_axis, _) in enumerate(t) if int(new_axis) == 2)
    return tuple(axis for axis in range(3) if axis != slice_axis)


def _check_in_plane(path: Path, data: np.ndarray, affine: np.ndarray, orientation: str) -> None:
    """Refuse slices smaller than the SSIM window on an in-plane axis (few slices are fine)."""
    a, b = in_plane_axes(affine, data.shape, orientation)
    h, w = data.shape[a], data.shape[b]
    if min(h, w) < MIN_SIDE:
        slicing = "a single slice" if data.shape[3 - a - b] == 1 else f"slices along axis {3 - a - b}"
        raise InputImageError(path, f"in-plane size {h}x{w} (shape {tuple(data.shape)}, {slicing}) is smaller than "
                                    f"the SSIM window ({MIN_SIDE} px)",
                              "Upscaling it would invent structure; give the original scan")


OBLIQUE_WARN_DEG = 10.0  # slices of a scan tilted more than this from its nearest axes cut the anatomy obliquely
QFORM_SFORM_WARN_MM = 1.0  # the two header transforms place some corner of the volume this far apart


def _warn_geometry(path: Path, header, affine: np.ndarray) -> None:
    """Warn (never refuse) where a viewer and condiff may disagree on geometry (ecosystem C.14, C.16).

    condiff slices along the voxel grid's axis nearest inferior-superior and writes the map back
    on the input's own grid, so an oblique scan is processed correctly but its slices are not
    the axial planes the models were trained on; qform and sform that disagree put the same map
    in different places in viewers that prefer one or the other (nibabel and FSL: sform; ITK:
    qform). Both are written back unchanged."""
    from nibabel.affines import obliquity

    tilt = float(np.degrees(np.max(np.abs(obliquity(affine)))))
    if tilt > OBLIQUE_WARN_DEG:
        logger.warning("%s: oblique scan (voxel axes up to %.0f degrees from the nearest anatomical axes): "
                       "slices are cut along the voxel grid, so the models see the brain tilted or rotated as stored (they "
                       "were trained on unrotated brains)", path, tilt)
    try:
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
    except Exception:  # a header nibabel cannot decode both forms of: nothing to compare
        return
    if not qcode and not scode:  # ANALYZE-style: nibabel falls back to pixdim with x running to the LEFT
        logger.warning("%s: no orientation in its header (qform_code and sform_code are both 0): its voxel axes "
                       "are taken as nibabel's fallback (x towards the patient's left, y anterior, z superior), so "
                       "left and right, and which axis is sliced, may be wrong; set the orientation in the header "
                       "(the converter that made the file, or fslorient)", path)
        return
    if qform is None or sform is None or not qcode or not scode:
        return
    shape = np.asarray(header.get_data_shape()[:3] + (1,) * (3 - len(header.get_data_shape()[:3])), dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    gap = float(np.max(np.linalg.norm((corners @ (qform - sform).T)[:, :3], axis=1)))
    if gap > QFORM_SFORM_WARN_MM:
        logger.warning("%s: qform and sform disagree (up to %.1f mm at the volume's corners): condiff uses the "
                       "sform, as nibabel and FSL do; viewers that prefer the qform (ITK-SNAP, 3D Slicer) "
                       "show the map elsewhere", path, gap)


# Voxel sizes a scan can have: anything outside is a broken header (a zeroed or rescaled affine, metres or
# microns): resampling it to the model's field of view would make a map of nothing, reported as ok.
VOXEL_MM_RANGE = (0.01, 100.0)
SINGULAR_TOLERANCE = 1e-6  # |det| of the affine's 3x3 over the product of its column lengths (1 for orthogonal axes)


# condiff-infer's advice (its options); other callers (condiff-train) swap in their own, matched by identity.
SERIES_HINT = "Pass --volume-index N to analyse volume N of every series, or give one volume per file"
NONFINITE_HINT = "Fix the file, or pass --nan-policy zero to treat them as 0"
# a mask or label map: --nan-policy applies to scans only, and a NaN voxel is neither lesion nor background
MASK_NONFINITE_HINT = "Fix the mask file (a NaN/Inf voxel is neither inside nor outside the mask)"
LABEL_ROUNDING = 0.01  # label values this close to an integer are that class (scl_slope/float storage rounding)


def _load(path: str | os.PathLike, *, allow_2d: bool, nan_policy: str, check_content: bool,
          orientation: str = "RAS", volume_index: int | None = None, nonfinite_hint: str | None = None) -> Volume:
    import nibabel as nib

    if nan_policy not in ("error", "zero"):
        raise ValueError(f"nan_policy must be 'error' or 'zero', not {nan_policy!r}")
    path = Path(path)
    raw, hdr, shape = _read_raw(path)
    klass = nib.Nifti2Image if hdr["version"] == 2 else nib.Nifti1Image
    try:
        img = klass.from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for bad headers/data
        raise InputImageError(path, f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc

    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) is one volume
        data = data[..., 0]
    series = int(data.shape[3]) if data.ndim == 4 else 1
    if data.ndim == 4 and volume_index is not None:  # a series (X, Y, Z, T): the one volume asked for
        if not -data.shape[3] <= volume_index < data.shape[3]:
            raise InputImageError(path, f"has {data.shape[3]} volumes (shape {tuple(data.shape)}); "
                                        f"--volume-index {volume_index} is out of range",
                                  f"give an index from 0 to {data.shape[3] - 1}")
        data = np.ascontiguousarray(data[..., volume_index])
    if data.ndim == 2 and allow_2d:
        data = data[:, :, None]
    elif data.ndim == 1 or data.ndim == 2:
        raise InputImageError(path, f"expected a 3-D volume, got a {data.ndim}-D image of shape {shape}",
                              "Give a 3-D volume")
    elif data.ndim == 4:
        raise InputImageError(path, f"is a series of {data.shape[3]} volumes (shape {shape}), not one volume",
                              SERIES_HINT)
    elif data.ndim > 4:
        raise InputImageError(path, f"expected a 3-D volume, got shape {shape}", "Give one volume per file")
    if not np.all(np.isfinite(affine)):
        raise InputImageError(path, "the header's affine contains NaN or Inf", "Fix the qform/sform of the file")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all((zooms >= VOXEL_MM_RANGE[0]) & (zooms <= VOXEL_MM_RANGE[1])):
        sizes = " x ".join(f"{z:.3g}" for z in zooms)
        raise InputImageError(path, f"the header's affine gives voxels of {sizes} mm, outside "
                                    f"{VOXEL_MM_RANGE[0]:g}-{VOXEL_MM_RANGE[1]:g} mm: not a scan's geometry "
                                    "(a zero or rescaled affine, or units other than mm)",
                              "Fix the qform/sform of the file (e.g. re-export it with dcm2niix)")
    # relative to the column lengths, so any voxel size passes: two parallel (or coplanar) axes leave no
    # orientation to slice by (nibabel's reorientation fails deep in preprocessing otherwise)
    if abs(float(np.linalg.det(affine[:3, :3]))) <= SINGULAR_TOLERANCE * float(np.prod(zooms)):
        raise InputImageError(path, "the header's affine is singular/degenerate (its axes are not independent)",
                              "Fix the qform/sform of the file")

    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        if nan_policy == "zero":
            logger.warning("%s: %d NaN/Inf voxels replaced by 0 (--nan-policy zero)", path, n_bad)
            data = np.where(bad, np.float32(0), data)
        else:
            raise InputImageError(path, f"contains {n_bad} NaN/Inf voxels",
                                  NONFINITE_HINT if nonfinite_hint is None else nonfinite_hint)
    if check_content:
        lo, hi = float(data.min()), float(data.max())
        if lo == hi:
            if hi == 0:
                raise InputImageError(path, "empty volume (all voxels are 0)")
            raise InputImageError(path, f"constant volume (all voxels are {hi:g})", "Nothing to analyse")
        _check_in_plane(path, data, affine, orientation)
        _warn_geometry(path, img.header, affine)
    return Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=affine, header=img.header, path=str(path),
                  nonfinite=n_bad, series=series)


def read_volume(path: str | os.PathLike, nan_policy: str = "error", orientation: str = "RAS",
                volume_index: int | None = None) -> Volume:
    """Read one 3-D NIfTI volume (``.nii`` or ``.nii.gz``, detected by content).

    A trailing singleton 4th axis is squeezed; real 4-D series, 2-D images, corrupt or
    truncated files, absurd headers, NaN/Inf voxels (unless ``nan_policy="zero"``),
    constant or all-zero volumes and volumes whose slices are smaller than the SSIM window
    (11 px) on an in-plane axis raise ``InputImageError`` naming the file. ``orientation``:
    the preprocessing contract's, which decides the slice axis (``in_plane_axes``).
    """
    return _load(path, allow_2d=False, nan_policy=nan_policy, check_content=True, orientation=orientation,
                 volume_index=volume_index)


def read_volume_or_slice(path: str | os.PathLike, nan_policy: str = "error", orientation: str = "RAS",
                         volume_index: int | None = None) -> Volume:
    """Like ``read_volume``, but a 2-D NIfTI is accepted and returned as an ``(H, W, 1)`` volume
    (whose two sides must both reach the SSIM window)."""
    return _load(path, allow_2d=True, nan_policy=nan_policy, check_content=True, orientation=orientation,
                 volume_index=volume_index)


def read_mask(path: str | os.PathLike, like: Volume, values=None, raw: bool = False) -> np.ndarray:
    """A mask on the same grid as ``like``: bool ``like.data.shape`` (True where the file is > 0,
    or, with ``values``, where it holds one of these label values, e.g. (1, 3, 4) for a tumour core).
    ``raw``: float32 for the benchmark protocol, which resamples labels before thresholding them
    (reference-method §8): the file's own values, or with ``values`` 1 on the chosen classes and 0
    elsewhere (as a binary label of those classes would be: a class's extent must not depend on its
    numeric code).

    With ``values``, label values within ``LABEL_ROUNDING`` of an integer are that integer (float or
    scaled storage rounds them, e.g. 3.9999993); a map holding other values is refused, since it is
    not a map of classes. Without ``values``, a map with fractional values (a probability map?) is
    warned about: every voxel above 0 counts as lesion. Refuses a mask whose shape or affine differs
    from the volume's (the message names both files); an all-zero mask is allowed (e.g. a lesion
    mask of a healthy case).
    """
    m = _load(path, allow_2d=True, nan_policy="error", check_content=False, nonfinite_hint=MASK_NONFINITE_HINT)
    if m.data.shape != like.data.shape:
        raise InputImageError(path, f"mask shape {m.data.shape} differs from the shape {like.data.shape} of {like.path}",
                              "Give a mask on the same voxel grid as its image")
    # 1e-3 mm: headers written by different tools round the affine differently (e.g. -0.0 vs 0.0,
    # float32 vs quaternion); anything larger is a different grid.
    if not np.allclose(m.affine, like.affine, rtol=0, atol=1e-3):
        raise InputImageError(path, f"mask affine differs from the affine of {like.path} "
                                    f"(max difference {np.abs(m.affine - like.affine).max():.4g} mm)",
                              "Give a mask on the same voxel grid as its image")
    if values:
        chosen = np.isin(_label_classes(path, m.data), np.asarray(values, dtype=np.float64))
        return chosen.astype(np.float32) if raw else chosen
    fractional = m.data[(m.data > 0) & (m.data != np.round(m.data))]
    if fractional.size:
        logger.warning("%s holds fractional values (e.g. %.4g; a probability map?): every voxel above 0 counts "
                       "as inside the mask; binarise it first (e.g. at 0.5) if that is not meant", path, float(fractional[0]))
    return np.asarray(m.data, dtype=np.float32) if raw else m.data > 0


def _label_classes(path, data: np.ndarray) -> np.ndarray:
    """A label map's classes: ``data`` rounded to integers where every value lies within
    ``LABEL_ROUNDING`` of one; otherwise it is no map of classes (an error naming the file)."""
    rounded = np.round(data)
    off = np.abs(data - rounded)
    if off.size and float(off.max()) > LABEL_ROUNDING:
        at = np.unravel_index(int(np.argmax(off)), data.shape)
        raise InputImageError(path, f"holds values that are not integer classes (e.g. {float(data[at]):.6g} at voxel "
                                    f"{tuple(int(i) for i in at)}), so --label-values cannot select classes in it",
                              "give an integer label map, or drop --label-values (lesion = every value above 0)")
    return rounded


# ----------------------------------------------------------------------------------------- writing


GZIP_OS_UNIX = 3  # the gzip header's OS byte as Python 3.11 and 3.12 write it on Linux (3.10, 3.13: 255)


def gzip_bytes(raw: bytes, level: int = 6) -> bytes:
    """gzip with mtime 0 and a fixed OS byte, so identical data give identical bytes on every Python:
    3.10 and 3.13 write OS 255 ("unknown") where 3.11-3.12 on Linux write 3, which made the same map a different
    file (and the bundled scans different from what their script writes)."""
    out = bytearray(gzip.compress(raw, compresslevel=level, mtime=0))
    out[9] = GZIP_OS_UNIX
    return bytes(out)



def nifti_bytes_like(data: np.ndarray, reference: Volume, dtype=np.float32, descrip: str | None = None) -> bytes:
    """Uncompressed NIfTI bytes of ``data`` on ``reference``'s grid (see ``write_like``)."""
    import nibabel as nib

    data = np.asarray(data)
    if data.shape != reference.data.shape:
        raise ValueError(f"data shape {data.shape} differs from the reference volume's {reference.data.shape}")
    hdr = reference.header.copy()
    klass = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    shape = data.shape
    stored = tuple(hdr.get_data_shape())
    if len(stored) == 2 and data.shape[2:] == (1,) and stored == data.shape[:2]:
        shape = stored  # a 2-D input gets a 2-D map
    elif len(stored) > 3 and stored[:3] == data.shape and all(n == 1 for n in stored[3:]):
        shape = stored  # (X, Y, Z, 1) in, (X, Y, Z, 1) out: the input's shape, as the README says
    arr = np.asarray(data, dtype=dtype).reshape(shape)
    pixdim = hdr["pixdim"].copy()
    hdr.set_data_shape(shape)
    hdr["pixdim"] = pixdim  # set_data_shape resets unused pixdim entries; outputs keep the input's exactly
    hdr.set_data_dtype(dtype)
    finite = arr[np.isfinite(arr)]
    hdr["cal_min"] = float(finite.min()) if finite.size else 0.0
    hdr["cal_max"] = float(finite.max()) if finite.size else 0.0
    if descrip is not None:
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    # The affine equals the header's own, so nibabel leaves qform/sform and their codes untouched.
    img = klass(arr, reference.affine, header=hdr)
    raw = img.to_bytes()
    # Store float maps unscaled: slope 1, intercept 0, whatever the input's scaling was.
    size = 540 if klass is nib.Nifti2Image else 348
    out_hdr = klass.header_class(binaryblock=raw[:size], check=False)
    out_hdr["scl_slope"] = 1.0
    out_hdr["scl_inter"] = 0.0
    return out_hdr.binaryblock + raw[size:]


def write_like(path: str | os.PathLike, data: np.ndarray, reference: Volume, dtype=np.float32,
               descrip: str | None = None) -> None:
    """Write ``data`` (shape of ``reference.data``) as NIfTI overlaying ``reference``.

    Same shape, affine, qform/sform and codes, pixdim and units as the input (its header is
    copied); data type ``dtype``, ``scl_slope`` 1 and ``scl_inter`` 0, ``cal_min/max`` the
    data range. ``.nii.gz`` is gzip with mtime 0 (byte-identical for identical data), ``.nii``
    is uncompressed. Written atomically.
    """
    name = str(path).lower()
    raw = nifti_bytes_like(data, reference, dtype=dtype, descrip=descrip)
    if name.endswith(".nii.gz"):
        raw = gzip_bytes(raw)
    elif not name.endswith(".nii"):
        raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz name")
    write_bytes_atomic(path, raw)


__all__ = ["Volume", "read_volume", "read_volume_or_slice", "read_mask", "write_like", "nifti_bytes_like",
           "in_plane_axes", "MAX_DIM", "MAX_VOXELS"]
