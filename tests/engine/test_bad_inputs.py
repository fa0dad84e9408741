"""A corpus of broken inputs run as one batch, and readers fed random headers, bytes and truncations.

The batch (``tests/data/make_bad_inputs.py``, generated into tmp_path): every broken case is
reported in cases.csv and on stderr with a reason naming its file, every good case is done, the
exit code is 1 and nothing partial is left (DESIGN §3, §6, §7; ecosystem.md Part C 3-11). The
property tests: whatever the bytes, ``read_volume``, ``read_volume_or_slice`` and ``read_image``
either return or raise ``InputImageError`` (the project's clear error), never anything else.
"""
import csv
import gzip
import importlib.util
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _infer_helpers import FAST, make_model_set, one_torch_thread, invoke_infer
from condiff.errors import InputImageError
from condiff.io import images, volumes

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _make_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("make_bad_inputs", REPO / "tests" / "data" / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_corpus(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    manifest = _make_corpus(folder)
    yield folder, manifest
    for path in folder.rglob("*"):  # let pytest clean up the mode-000 file
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


_invoke = invoke_infer


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _check_batch(out: Path, res, manifest: dict[str, tuple[str, str]], folder: str) -> None:
    """The batch contract for the manifest entries under ``folder``."""
    assert res.exit_code == 1, res.output + res.stderr
    assert "Traceback" not in res.stderr
    rows = _rows(out / "cases.csv")
    items = {Path(rel).name: want for rel, want in manifest.items() if rel.startswith(f"{folder}/")}
    assert len(rows) == len(items)
    for name, (status, reason) in items.items():
        case = name.split(".")[0]
        row = rows[case]
        assert row["status"] == status, (name, row["error"])
        outputs = [out / "maps" / f"{case}{ext}" for ext in (".nii.gz", ".tiff", ".png")]
        outputs += [out / "restorations" / f"{case}{ext}" for ext in (".nii.gz", ".tiff", ".png")]
        if status == "ok":
            assert (out / "overlays" / f"{case}.png").is_file() and any(p.is_file() for p in outputs)
            continue
        # a clear reason that names the file, in cases.csv and on stderr; nothing written for it
        assert row["error_type"] == "InputImageError", (name, row["error_type"], row["error"])
        assert name in row["error"] and re.search(reason, row["error"]), (name, row["error"])
        line = next((ln for ln in res.stderr.splitlines() if ln.startswith(f"FAILED {case}:")), "")
        assert name in line and re.search(reason, line), (name, res.stderr)
        assert not any(p.exists() for p in outputs) and not (out / "overlays" / f"{case}.png").exists()
    temp = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert not temp, temp
    assert not (out / ".condiff.lock").exists()


def test_broken_volumes_fail_alone_in_one_batch(tmp_path, corpus):
    folder, manifest = corpus
    models = make_model_set(tmp_path / "set", n_members=1)
    out = tmp_path / "out"
    res = _invoke([folder / "mri", "-o", out, "--models", models, *FAST])
    _check_batch(out, res, manifest, "mri")
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]  # nothing written beside the inputs


def test_png_with_a_jpg_name_loads_and_broken_photo_fails_alone(tmp_path, corpus):
    folder, manifest = corpus
    models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                            preprocessing={"modality": "rgb", "image_size": 32})
    out = tmp_path / "out"
    res = _invoke([folder / "photos", "-o", out, "--models", models, *FAST])
    _check_batch(out, res, manifest, "photos")


def test_folder_of_dicom_files_exits_2_with_the_dcm2niix_recipe(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):  # a DICOM export: slices (preamble + "DICM"), no NIfTI
        (series / f"IM{k:04d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(64))
    out = tmp_path / "out"
    res = _invoke([series, "-o", out, "--models", make_model_set(tmp_path / "set", n_members=1), *FAST])
    assert res.exit_code == 2, res.output + res.stderr
    assert "Traceback" not in res.stderr
    assert f"{series}: 0 supported files found" in res.stderr and "dcm2niix -z y -b y -ba y -o OUT IN" in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file, so an unreadable input cannot be made")
def test_unreadable_volume_is_a_clear_error(tmp_path, corpus):
    folder, manifest = corpus
    assert "mri/unreadable.nii.gz" in manifest  # and the batch test above checked its row
    with pytest.raises(InputImageError, match="permission denied"):
        volumes.read_volume(folder / "mri" / "unreadable.nii.gz")


# ----------------------------------------------------------------------------------------- property tests


def _nifti1() -> bytes:
    """A small valid NIfTI-1 (int16 with scaling, oblique-free affine) to mutate; in-plane just
    over the SSIM window (11 px), so unmutated it is read."""
    import nibabel as nib

    data = (np.arange(11 * 12 * 4, dtype=np.int16).reshape(11, 12, 4) % 37) + 1
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, 1.0)
    return img.to_bytes()


def _nifti2() -> bytes:
    import nibabel as nib

    data = np.linspace(1, 2, 12 * 11 * 3, dtype=np.float32).reshape(12, 11, 3)
    return nib.Nifti2Image(data, np.eye(4)).to_bytes()


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(16 * 13 * 3) % 251).astype(np.uint8).reshape(16, 13, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(16 * 13) % 251).astype(np.uint8).reshape(16, 13)).save(buf, format="JPEG")
    return buf.getvalue()


def _tiff() -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.linspace(0, 1, 14 * 12, dtype=np.float32).reshape(14, 12))
    return buf.getvalue()


NII1, NII2, PNG, JPEG, TIFF = _nifti1(), _nifti2(), _png(), _jpeg(), _tiff()
# (offset, struct format) of NIfTI-1 / NIfTI-2 header fields the readers and nibabel interpret
NII1_FIELDS = ([(0, "<i")] + [(40 + 2 * k, "<h") for k in range(8)] + [(70, "<h"), (72, "<h")]
               + [(76 + 4 * k, "<f") for k in range(8)] + [(108, "<f"), (112, "<f"), (116, "<f"), (123, "<B"),
                                                             (252, "<h"), (254, "<h")]
               + [(256 + 4 * k, "<f") for k in range(6)] + [(280 + 4 * k, "<f") for k in range(12)])
NII2_FIELDS = ([(0, "<i"), (12, "<h"), (14, "<h")] + [(16 + 8 * k, "<q") for k in range(8)]
               + [(104 + 8 * k, "<d") for k in range(8)] + [(168, "<q"), (176, "<d"), (184, "<d"), (344, "<i"),
                                                             (348, "<i")])
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304]


def _value(fmt: str):
    if fmt in ("<f", "<d"):
        return st.floats(width=32 if fmt == "<f" else 64, allow_nan=True, allow_infinity=True)
    bits = {"<B": 8, "<h": 16, "<i": 32, "<q": 64}[fmt]
    lo, hi = (0, 255) if fmt == "<B" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    small = st.integers(-2, 9)  # the values that pass the first checks and reach deeper code
    return st.one_of(small, st.sampled_from(DATATYPES), st.integers(lo, hi)).filter(lambda v: lo <= v <= hi)


@st.composite
def mutated_headers(draw):
    base, fields = draw(st.sampled_from([(NII1, NII1_FIELDS), (NII2, NII2_FIELDS)]))
    raw = bytearray(base)
    for offset, fmt in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=6)):
        struct.pack_into(fmt, raw, offset, draw(_value(fmt)))
    if draw(st.booleans()):
        del raw[draw(st.integers(0, len(raw))):]
    return bytes(raw)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _only_clear_errors(path: Path, readers) -> None:
    for read in readers:
        try:
            read(path)
        except InputImageError as exc:
            assert str(path) in exc.message  # the clear error names the file
        # anything else propagates and fails the property


VOLUME_READERS = (volumes.read_volume, volumes.read_volume_or_slice)
ALL_READERS = (*VOLUME_READERS, images.read_image)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(raw=mutated_headers(), compress=st.booleans())
def test_volume_readers_on_random_header_fields(scratch, raw, compress):
    name = "case.nii.gz" if compress else "case.nii"
    _only_clear_errors(_write(scratch, name, gzip.compress(raw, mtime=0) if compress else raw), VOLUME_READERS)


@FUZZ
@given(prefix=st.sampled_from([b"", b"\x1f\x8b\x08\x00", NII1[:348], NII2[:540], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                               b"II*\x00", b"MM\x00*"]),
       tail=st.binary(max_size=1500), name=st.sampled_from(["x.nii", "x.nii.gz", "x.png", "x.jpg", "x.tif"]))
def test_all_readers_on_random_bytes(scratch, prefix, tail, name):
    _only_clear_errors(_write(scratch, name, prefix + tail), ALL_READERS)


@FUZZ
@given(which=st.sampled_from(["nii", "nii.gz", "nii2.gz", "png", "jpg", "tif"]), data=st.data())
def test_all_readers_on_truncated_and_bit_flipped_files(scratch, which, data):
    raw = {"nii": NII1, "nii.gz": gzip.compress(NII1, mtime=0), "nii2.gz": gzip.compress(NII2, mtime=0),
           "png": PNG, "jpg": JPEG, "tif": TIFF}[which]
    buf = bytearray(raw)
    for pos, byte in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4)):
        buf[pos] = byte
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(0, len(buf) - 1)):]
    _only_clear_errors(_write(scratch, f"x.{which.replace('nii2', 'nii')}", bytes(buf)), ALL_READERS)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@FUZZ
@given(width=st.integers(0, 5000), height=st.integers(0, 5000), depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3, 255]),
       colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]), body=st.binary(max_size=600))
def test_read_image_on_random_png_headers(scratch, width, height, depth, colour, body):
    """A PNG whose header chunk (with a correct CRC) declares any size, depth and colour type."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(body)) + _png_chunk(b"IEND", b"")
    _only_clear_errors(_write(scratch, "x.png", raw), (images.read_image,))


def test_nifti_header_with_non_finite_vox_offset_is_a_clear_error(scratch):
    """Found by the property test: a NaN/Inf vox_offset crashed the reader with ValueError/OverflowError."""
    for bad in (float("nan"), float("inf")):
        raw = bytearray(NII1)
        raw[108:112] = struct.pack("<f", bad)  # vox_offset
        for name, data in (("v.nii", bytes(raw)), ("v.nii.gz", gzip.compress(bytes(raw), mtime=0))):
            with pytest.raises(InputImageError, match="vox_offset"):
                volumes.read_volume(_write(scratch, name, data))


def test_tiff_with_a_zero_length_axis_is_a_clear_error(scratch):
    """Found by the property test: a TIFF with no pixels crashed with ValueError at out.min()."""
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InputImageError, match="no pixels"):
        images.read_image(_write(scratch, "empty.tif", buf.getvalue()))


# ----------------------------------------------------------------------------------------- odd file names and files


def _scan_bytes(tmp_path: Path) -> bytes:
    from _infer_helpers import make_scans

    return make_scans(tmp_path / "made", n=1)[0].read_bytes()


def test_a_file_name_that_is_not_utf8_runs_like_any_other_and_resumes(tmp_path):
    """Its name is kept by Python as a lone surrogate, which UTF-8 cannot encode: the record is written as JSON
    escapes (read back as the same name, so the rerun finds it done), the tables and the log escape it."""
    scans = tmp_path / "scans"
    scans.mkdir()
    data = _scan_bytes(tmp_path)
    (scans / "a.nii.gz").write_bytes(data)
    (scans / os.fsdecode(b"m_bad_\xff.nii.gz")).write_bytes(data)
    models, out = make_model_set(tmp_path / "set", n_members=1), tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "Logging error" not in res.stderr and "Traceback" not in res.stderr
    with open(out / "cases.csv", newline="", encoding="utf-8") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a", "m_bad_\\udcff"} and {r["status"] for r in rows.values()} == {"ok"}
    assert "m_bad_\\udcff" in (out / "scores.csv").read_text(encoding="utf-8")
    assert "case m_bad_\\udcff done" in (out / "condiff.log").read_text(encoding="utf-8")
    again = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert again.exit_code == 0 and "0 done, 2 already done" in again.output + again.stderr, again.output + again.stderr


def test_a_failure_that_cannot_be_recorded_does_not_stop_the_other_cases(tmp_path, monkeypatch):
    """When writing a case's record fails and writing its failure record fails again (not with an OSError), the
    case fails, the run says why, and the cases after it still run."""
    from condiff.engine import pipeline

    scans = tmp_path / "scans"
    scans.mkdir()
    data = _scan_bytes(tmp_path)
    for name in ("a", "b", "c"):
        (scans / f"{name}.nii.gz").write_bytes(data)
    real = pipeline.write_record

    def flaky(out_dir, plan, record):
        if plan.case.name == "b":
            raise ValueError("cannot serialise this record")
        real(out_dir, plan, record)

    monkeypatch.setattr(pipeline, "write_record", flaky)
    models, out = make_model_set(tmp_path / "set", n_members=1), tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", models, *FAST, "--batch-size", "1"])
    assert res.exit_code == 1, res.output + res.stderr
    assert "b: could not record the failure (ValueError: cannot serialise this record)" in res.stderr
    rows = _rows(out / "cases.csv")
    assert rows["a"]["status"] == rows["c"]["status"] == "ok" and "b" not in rows
    assert "2 done, 0 already done, 1 failed" in res.output + res.stderr


def _infer_subprocess(args, timeout: float = 240):
    """condiff-infer in a child process: a run that hangs is killed at ``timeout`` (the test fails, never hangs)."""
    import subprocess
    import sys

    code = "import sys; from condiff.engine.cli import infer_main; sys.exit(infer_main())"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_fifo_or_device_named_like_a_scan_fails_alone_instead_of_hanging(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(_scan_bytes(tmp_path))
    os.mkfifo(scans / "m_pipe.nii.gz")  # open() would wait for a writer forever
    os.symlink("/dev/zero", scans / "m_zero.nii")  # reading never ends
    models, out = make_model_set(tmp_path / "set", n_members=1), tmp_path / "out"
    want = "is not a regular file (a FIFO, device or socket)"
    dry = _infer_subprocess([scans, "-o", out, "--models", models, *FAST, "--dry-run"])
    assert dry.returncode == 1 and "Traceback" not in dry.stderr, dry.stdout + dry.stderr
    for name in ("m_pipe.nii.gz", "m_zero.nii"):
        assert f"{scans / name}: {want}" in dry.stdout + dry.stderr
    res = _infer_subprocess([scans, "-o", out, "--models", models, *FAST])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    rows = _rows(out / "cases.csv")
    assert rows["a"]["status"] == "ok"
    for case, name in (("m_pipe", "m_pipe.nii.gz"), ("m_zero", "m_zero.nii")):
        assert rows[case]["status"] == "failed" and rows[case]["error"].startswith(f"{scans / name}: {want}")
        assert f"FAILED {case}: {scans / name}: {want}" in res.stderr


def test_long_file_names_run_and_a_name_whose_outputs_cannot_exist_fails_alone(tmp_path):
    """235 characters: the outputs' temporary names (~24 more) must stay within 255 bytes; 240: the automatic
    brain-mask probe (``_brainmask.nii.gz`` more) is too long to exist, so there is no mask; a .tif whose map
    (.tiff) would be 256 bytes cannot be written: that case fails alone with its row, in the run and dry run."""
    scans = tmp_path / "scans"
    scans.mkdir()
    data = _scan_bytes(tmp_path)
    for stem in ("M" * 235, "N" * 240):
        (scans / f"{stem}.nii.gz").write_bytes(data)
    (scans / f"{'P' * 251}.tif").write_bytes(b"II*\x00")
    models, out = make_model_set(tmp_path / "set", n_members=1), tmp_path / "out"
    want = f"{scans / ('P' * 251)}.tif: its output file name '{'P' * 251}.tiff' would be 256 bytes long; file names " \
           f"may have at most 255"
    dry = _invoke([scans, "-o", out, "--models", models, *FAST, "--dry-run"])
    assert dry.exit_code == 1 and "Traceback" not in dry.stderr, dry.output + dry.stderr
    assert want in dry.output + dry.stderr and "2 case(s) valid, 1 invalid" in dry.output + dry.stderr
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 1 and "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    rows = _rows(out / "cases.csv")
    assert rows["M" * 235]["status"] == rows["N" * 240]["status"] == "ok"
    assert rows["P" * 251]["status"] == "failed" and rows["P" * 251]["error"].startswith(want)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    again = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert "0 done, 2 already done, 1 failed" in again.output + again.stderr, again.output + again.stderr


def test_photo_warnings_reach_the_cases_table_and_a_constant_photo_fails_alone(tmp_path):
    """A multi-page TIFF and an animated PNG are analysed from their first frame, saying so; an invalid EXIF
    orientation is reported as ignored; an all-black photo is refused (it would rank as the most anomalous)."""
    import tifffile
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (36, 36, 3), dtype=np.uint8) for _ in range(3)]
    tifffile.imwrite(photos / "stack.tif", np.stack(frames), photometric="rgb")
    Image.fromarray(frames[0]).save(photos / "anim.png", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]], duration=100)
    im = Image.fromarray(frames[1])
    exif = im.getexif()
    exif[0x0112] = 99
    im.save(photos / "odd.png", exif=exif.tobytes())
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(photos / "black.png")
    models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                            preprocessing={"modality": "rgb", "image_size": 32})
    out = tmp_path / "out"
    res = _invoke([photos, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.output + res.stderr
    rows = _rows(out / "cases.csv")
    assert [rows[c]["status"] for c in ("stack", "anim", "odd", "black")] == ["ok", "ok", "ok", "failed"]
    assert "has 3 pages: only the first was analysed" in rows["stack"]["warnings"]
    assert "has 3 frames: only the first was analysed" in rows["anim"]["warnings"]
    assert "EXIF orientation 99 is not a valid value (1-8): ignored" in rows["odd"]["warnings"]
    assert "applied" not in rows["odd"]["warnings"]
    assert rows["black"]["error"].startswith(f"{photos / 'black.png'}: constant image (all pixels 0): nothing to analyse")
