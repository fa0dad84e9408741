"""2-D photographs in (PNG, JPEG, TIFF) and maps out (float32 TIFF, 8-bit PNG previews).

The format is detected from the file's bytes, never its extension (a PNG named ``.jpg`` is
read as PNG). Pixel values are scaled by the true maximum of the stored type (255, 65535,
or a float image already in [0, 1]), so 16-bit files are not silently mis-scaled. EXIF
orientation is applied, so maps come out in the orientation a viewer shows. Every format is held
to PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) from its header, before decoding (tifffile has no
limit of its own); constant photos are refused, and a file with more frames or pages is analysed
from its first, with a warning. Writers produce deterministic bytes (no timestamps) and go
through ``io.atomic``.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from condiff.errors import InputImageError
from condiff.io.atomic import write_bytes_atomic
from condiff.io.atomic import read_head

logger = logging.getLogger(__name__)

MIN_SIDE = 11  # the SSIM window: a smaller native image cannot be analysed honestly
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg",
    b"II*\x00": "tiff", b"MM\x00*": "tiff", b"II+\x00": "tiff", b"MM\x00+": "tiff",
}


def _sniff(path: Path) -> str:
    head = read_head(path, 8, "an image file")
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    raise InputImageError(path, f"not a PNG, JPEG or TIFF image (first bytes {head!r})",
                          "Give a .png, .jpg or .tif photograph")


def _to_rgb(path: Path, arr: np.ndarray, scale: float) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) integer or float array -> (H, W, 3) float32 in [0, 1]; refuses what cannot be
    analysed (non-finite or out-of-range values, sides below the SSIM window, all pixels alike)."""
    if arr.size == 0:
        raise InputImageError(path, f"image has no pixels (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        logger.warning("%s: alpha channel dropped (not composited)", path)
        arr = arr[:, :, :-1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        logger.warning("%s: grey-scale photograph: its channel repeated as R, G and B", path)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputImageError(path, f"unsupported image layout {arr.shape}", "Give a grey-scale or RGB photograph")
    out = arr.astype(np.float32) / np.float32(scale) if scale != 1 else arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise InputImageError(path, f"contains {int((~np.isfinite(out)).sum())} NaN/Inf pixel values")
    if out.min() < 0 or out.max() > 1:
        raise InputImageError(path, f"float pixel values outside [0, 1] ({out.min():g} to {out.max():g})",
                              "Store float images scaled to [0, 1], or as 8/16-bit integers")
    if min(out.shape[:2]) < MIN_SIDE:
        raise InputImageError(path, f"image {out.shape[1]}x{out.shape[0]} is smaller than the SSIM window ({MIN_SIDE} px)",
                              "Upscaling it would invent structure; give the original photograph")
    _check_not_constant(path, arr)
    return out


def _check_not_constant(path: Path, arr: np.ndarray) -> None:
    """Refuse a photo whose pixels are all the same (a black frame, a blank export), as the MRI reader refuses
    a constant volume: the models would "restore" it into something, and it would rank as the most anomalous."""
    first = arr[0, 0]
    if np.all(arr == first):
        values = np.unique(first)
        shown = f"{values[0]:g}" if values.size == 1 else "(" + ", ".join(f"{v:g}" for v in first) + ")"
        raise InputImageError(path, f"constant image (all pixels {shown}): nothing to analyse",
                              "Give the photograph itself")


def _pixel_limit() -> int | None:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; None when an application turned it off)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Refuse an image above the pixel limit from its header, before a byte of it is decoded: a few hundred
    KB of compressed zeros can ask for tens of GB."""
    limit = _pixel_limit()
    if limit is not None and width * height > limit:
        raise InputImageError(path, f"image of {width}x{height} = {width * height} pixels is larger than the limit "
                                    f"of {limit} pixels (a decompression bomb?); not decoded",
                              "Downscale the photograph (the limit is PIL's Image.MAX_IMAGE_PIXELS)")


def _warn_frames(path: Path, n: int, what: str) -> None:
    if n > 1:
        logger.warning("%s: has %d %s: only the first was analysed", path, n, what)


# The TIFF Orientation tag (274) has EXIF's values: the numpy steps that show the stored rows as a viewer does
# (PIL's exif_transpose for 2..8: mirror, rotate 180, flip, transpose, rotate 270, transverse, rotate 90)
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
           8: lambda a: np.rot90(a, 1)}


def _tiff_page(path: Path) -> tuple[np.ndarray, int]:
    """The first page as a viewer shows it: channels last (planar RGB too) and its Orientation tag applied;
    and how many pages the file has."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            # tifffile has no pixel limit of its own: the page's tags give its size before it is decoded
            _check_pixels(path, int(page.imagewidth), int(page.imagelength) * max(1, int(page.imagedepth)))
            arr = page.asarray()
            orientation = int(page.tags[274].value) if 274 in page.tags else 1
            planar = int(getattr(page, "planarconfig", 1)) == 2
            n_pages = len(tif.pages)
    except InputImageError:
        raise
    except Exception as exc:
        raise InputImageError(path, f"unreadable or truncated TIFF ({type(exc).__name__}: {exc})") from exc
    if planar and arr.ndim == 3 and arr.shape[0] in (2, 3, 4):  # stored channel by channel
        arr = np.moveaxis(arr, 0, -1)
    if orientation in _ORIENT:
        logger.warning("%s: TIFF orientation %s applied (image rotated/flipped as displayed)", path, orientation)
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    elif orientation != 1:
        logger.warning("%s: TIFF orientation %s is not a valid value (1-8): ignored", path, orientation)
    return arr, n_pages


def _read_tiff(path: Path) -> np.ndarray:
    arr, n_pages = _tiff_page(path)
    _warn_frames(path, n_pages, "pages")
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    elif arr.dtype == np.bool_:
        arr, scale = arr.astype(np.uint8), 1.0
    elif arr.dtype.kind == "f":
        scale = 1.0
    else:
        raise InputImageError(path, f"unsupported TIFF pixel type {arr.dtype}", "Give 8-bit, 16-bit or float [0, 1] data")
    return _to_rgb(path, arr, scale)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            _check_pixels(path, *im.size)  # PIL only refuses from twice its limit, and only warns below
            if im.format == "PNG":  # an animated PNG (a JPEG's extra MPO images are previews, not frames)
                _warn_frames(path, int(getattr(im, "n_frames", 1)), "frames")
            im.load()  # decode now: truncated data raises here, not later
            exif_orientation = im.getexif().get(0x0112, 1)
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if exif_orientation in _ORIENT:  # the values exif_transpose applies
                logger.warning("%s: EXIF orientation %s applied (image rotated/flipped as displayed)", path, exif_orientation)
            elif exif_orientation not in (None, 1):
                logger.warning("%s: EXIF orientation %s is not a valid value (1-8): ignored", path, exif_orientation)
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr, scale = np.asarray(im).astype(np.uint16), 65535.0
            elif mode == "I":
                # Only PNG reaches PIL here (TIFF goes to tifffile); a 16-bit PNG opens as "I".
                arr, scale = np.asarray(im), 65535.0
            elif mode == "F":
                arr, scale = np.asarray(im), 1.0
            elif mode in ("RGB", "L"):
                arr, scale = np.asarray(im), 255.0
            elif mode in ("RGBA", "LA"):
                arr, scale = np.asarray(im), 255.0  # alpha dropped (with a warning) in _to_rgb
            else:  # P, PA, 1, CMYK, YCbCr, LAB, HSV: convert explicitly, never use palette indices
                arr, scale = np.asarray(im.convert("RGB")), 255.0
    except InputImageError:
        raise
    except Image.DecompressionBombError as exc:  # raised by Image.open itself, before _check_pixels could run
        raise InputImageError(path, f"image is larger than the limit of {_pixel_limit()} pixels (a decompression "
                                    f"bomb?); not decoded ({exc})",
                              "Downscale the photograph (the limit is PIL's Image.MAX_IMAGE_PIXELS)") from exc
    except Exception as exc:  # PIL: OSError (truncated), SyntaxError, ValueError ...
        raise InputImageError(path, f"unreadable or truncated image ({type(exc).__name__}: {exc})",
                              "The file is damaged; copy it again") from exc
    return _to_rgb(path, arr, scale)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photograph as ``(H, W, 3)`` float32 in [0, 1].

    PNG/JPEG/TIFF detected by content; grey is repeated to RGB, alpha dropped, palettes and
    CMYK converted, EXIF orientation applied, 16-bit scaled by 65535. Unreadable, truncated,
    non-image or tiny (< 11 px) files raise ``InputImageError`` naming the file.
    """
    path = Path(path)
    kind = _sniff(path)
    return _read_tiff(path) if kind == "tiff" else _read_pil(path)


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """A 2-D mask image (PNG/TIFF/...) as bool ``(H, W)``: True where any channel is > 0. A JPEG mask is
    read but warned about: its compression noise around every edge (and in flat areas) counts as lesion."""
    path = Path(path)
    kind = _sniff(path)
    if kind == "jpeg":
        logger.warning("%s is a JPEG mask: lossy compression leaves faint non-zero pixels that count as lesion "
                       "(> 0); save masks as PNG or TIFF", path)
    if kind == "tiff":
        arr = np.asarray(_tiff_page(path)[0])
    else:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                _check_pixels(path, *im.size)
                im.load()
                im = ImageOps.exif_transpose(im)
                arr = np.asarray(im.convert("L") if im.mode in ("P", "1", "CMYK") else im)
        except InputImageError:
            raise
        except Exception as exc:
            raise InputImageError(path, f"unreadable or truncated image ({exc})") from exc
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2) if arr.shape[2] in (3, 4) else arr[:, :, 0]
    return arr > 0


# ----------------------------------------------------------------------------------------- writing


def to_png8(array: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Scale ``array`` linearly so ``vmin`` -> 0 and ``vmax`` -> 255, clip, round: uint8, same shape.

    NaN becomes 0. ``vmax <= vmin`` gives all zeros (a constant map has nothing to show).
    """
    a = np.asarray(array, dtype=np.float64)
    if not vmax > vmin:
        return np.zeros(a.shape, dtype=np.uint8)
    scaled = (a - vmin) / (vmax - vmin)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(array_uint8: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array; no metadata, fixed settings."""
    from PIL import Image

    a = np.asarray(array_uint8)
    if a.dtype != np.uint8:
        raise TypeError(f"write_png needs uint8 data, got {a.dtype} (use to_png8)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"write_png needs (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_png(path: str | os.PathLike, array_uint8: np.ndarray) -> None:
    """Write a uint8 image as PNG atomically; identical arrays give identical bytes."""
    write_bytes_atomic(path, png_bytes(array_uint8))


def tiff_bytes(array: np.ndarray) -> bytes:
    """Lossless float32 TIFF bytes of ``(H, W)`` or ``(H, W, 3)``: deflate, no date tag."""
    import tifffile

    a = np.ascontiguousarray(array, dtype=np.float32)
    if a.ndim == 2:
        photometric = "minisblack"
    elif a.ndim == 3 and a.shape[2] == 3:
        photometric = "rgb"
    else:
        raise ValueError(f"write_float_tiff needs (H, W) or (H, W, 3), got {a.shape}")
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric=photometric, compression="zlib", datetime=None,
                     software="condiff", metadata=None, maxworkers=1)
    return buf.getvalue()


def write_float_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a float map as lossless float32 TIFF atomically; identical arrays give identical bytes."""
    write_bytes_atomic(path, tiff_bytes(array))


__all__ = ["read_image", "read_label_image", "to_png8", "write_png", "write_float_tiff", "png_bytes", "tiff_bytes", "MIN_SIDE"]
