"""condiff-export interrupted: no partial file under a final name, a resumable copy, and no temporary
file left behind forever by a killed export (faults injected deterministically, no timing)."""
import errno
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from condiff.config import ModelConfig, preset  # noqa: E402
from condiff.export.cli import main  # noqa: E402
from condiff.export.onnx_export import export_onnx  # noqa: E402
from condiff.modelset import open_model_set, save_model, save_model_set  # noqa: E402
from condiff.unet import ConditionalUNet  # noqa: E402

FAST = ["--attention", "sdpa", "--map-check-steps", "0"]  # the checks themselves are tested elsewhere


def _make_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = preset("tiny", sample_size=32)
    return save_model(folder, ConditionalUNet(cfg), ModelConfig(unet=cfg))


@pytest.fixture(scope="module")
def model_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "set"
    save_model_set(root, [_make_model(root / f"fold_{i}", seed=i) for i in range(2)])
    (root / "README.md").write_text("# model card\n")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _dead_pid() -> int:
    """A process id no process has now: a reaped child's, else one searched down from pid_max."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    try:
        top = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        top = 32768
    for pid in [child.pid, *range(top - 1, top - 1000, -1)]:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            continue
    pytest.skip("found no unused process id")


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_an_interrupted_copy_leaves_no_partial_file_and_the_same_command_finishes_it(model_set, tmp_path,
                                                                                     monkeypatch, fault):
    out = tmp_path / "exp"
    real_copyfile = shutil.copyfile  # what shutil.copy2 copies the bytes with, too

    def interrupted_copyfile(src, dst, *args, **kwargs):
        if Path(src) == model_set / "fold_1" / "model.safetensors":
            data = Path(src).read_bytes()
            Path(dst).write_bytes(data[: len(data) // 2])  # killed half way through this file
            raise KeyboardInterrupt() if fault is KeyboardInterrupt else OSError(errno.EIO, "I/O error", str(dst))
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", interrupted_copyfile)
    res = CliRunner().invoke(main, [str(model_set), "-o", str(out), *FAST])
    assert res.exit_code != 0
    monkeypatch.undo()
    for rel in ("fold_0/model.safetensors", "fold_0/config.json", "fold_1/model.safetensors",
                "fold_1/config.json", "set.json", "README.md"):
        if (out / rel).exists():  # every final name holds the whole source file or is absent
            assert _sha(out / rel) == _sha(model_set / rel), rel
    assert not (out / "set.json").exists()  # written last: the copy is visibly unfinished
    assert _temp_files(out) == []  # the failed copy removed its temporary file

    # the folder is not a model set yet; the in-place command says how to finish it instead of looping
    res = CliRunner().invoke(main, [str(out), *FAST])
    assert res.exit_code == 2 and f"condiff-export SET -o {out}" in res.output, res.output

    res = CliRunner().invoke(main, [str(model_set), "-o", str(out), *FAST])  # the same command again
    assert res.exit_code == 0, res.output
    assert len(open_model_set(out).member_dirs) == 2  # digests verified
    assert (out / "set.json").read_bytes() == (model_set / "set.json").read_bytes()
    assert all((out / f"fold_{i}" / "model.onnx").is_file() for i in range(2))
    assert _temp_files(out) == []


def test_a_truncated_copy_left_by_an_older_condiff_is_resumed(model_set, tmp_path):
    """The old order (set.json first, plain copies): set.json, a whole fold_0 and half of fold_1's weights."""
    out = tmp_path / "exp"
    shutil.copytree(model_set / "fold_0", out / "fold_0")
    (out / "fold_1").mkdir()
    shutil.copy2(model_set / "set.json", out / "set.json")
    weights = (model_set / "fold_1" / "model.safetensors").read_bytes()
    (out / "fold_1" / "model.safetensors").write_bytes(weights[:131072])
    stale = out / "fold_1" / f".model.safetensors.{_dead_pid()}.{secrets.token_hex(4)}.tmp"
    stale.write_bytes(weights[:1000])

    res = CliRunner().invoke(main, [str(out), *FAST])  # in place: the digest error now names the way out
    assert res.exit_code == 2 and "digest does not match" in res.output and f"-o {out}" in res.output, res.output

    res = CliRunner().invoke(main, [str(model_set), "-o", str(out), *FAST])
    assert res.exit_code == 0, res.output
    assert len(open_model_set(out).member_dirs) == 2
    assert (out / "fold_1" / "model.safetensors").read_bytes() == weights
    assert (out / "README.md").is_file() and _temp_files(out) == []


def test_an_output_that_is_not_an_unfinished_copy_of_this_set_is_refused(model_set, tmp_path):
    out = tmp_path / "exp"
    (out / "fold_1").mkdir(parents=True)
    (out / "fold_1" / "model.safetensors").write_bytes(b"other weights")  # not a prefix of the source's
    res = CliRunner().invoke(main, [str(model_set), "-o", str(out), *FAST])
    assert res.exit_code == 2 and "not an empty folder" in res.output, res.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["fold_1", "fold_1/model.safetensors"]
    (out / "fold_1" / "model.safetensors").unlink()
    (out / "notes.txt").write_text("mine")  # a file the copy would not write
    res = CliRunner().invoke(main, [str(model_set), "-o", str(out), *FAST])
    assert res.exit_code == 2 and "not an empty folder" in res.output, res.output
    assert (out / "notes.txt").read_text() == "mine" and not (out / "fold_0").exists()


def test_stale_temporary_files_of_dead_writers_are_removed_before_an_export(tmp_path, caplog):
    folder = _make_model(tmp_path / "m", seed=0)
    dead, live = _dead_pid(), os.getpid()
    token = secrets.token_hex(4)
    removed = [folder / f".model.onnx.{dead}.{token}.tmp", folder / f".model.fp16.plan.{dead}.{token}.tmp",
               folder / f".model.onnx.json.{dead}.{token}.tmp", folder / f".model.safetensors.{dead}.{token}.tmp"]
    kept = [folder / f".model.onnx.{live}.{token}.tmp",  # its writer is alive
            folder / ".model.onnx.tmp", folder / f".model.onnx.{dead}.tmp", folder / f".model.onnx.{dead}.xyz12345.tmp",
            folder / f"model.onnx.{dead}.{token}.tmp", folder / f".model.onnx.{dead}.{token}.tmp.bak",
            folder / f".model.onnx.{dead}.{token.upper()}X.tmp", folder / "notes.txt"]
    for p in removed + kept:
        p.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="condiff.export"):
        export_onnx(folder, attention="sdpa", map_steps=0)
    assert not any(p.exists() for p in removed)
    assert all(p.read_bytes() == b"partial" for p in kept)
    assert (folder / "model.onnx").is_file()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(str(p) in logged for p in removed) and not any(str(p) in logged for p in kept)


def test_the_cli_removes_a_killed_in_place_exports_temporary_file(model_set, tmp_path):
    root = tmp_path / "k2"
    shutil.copytree(model_set, root)
    orphan = root / "fold_0" / f".model.onnx.{_dead_pid()}.{secrets.token_hex(4)}.tmp"
    orphan.write_bytes(b"\0" * 4096)
    res = CliRunner().invoke(main, [str(root), *FAST])
    assert res.exit_code == 0, res.output
    assert not orphan.exists() and _temp_files(root) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_output_that_cannot_be_made_is_exit_2_not_a_traceback(model_set, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as for root: every folder looks writable
    res = CliRunner().invoke(main, [str(model_set), "-o", "/proc/condiff-test/exp", *FAST])
    assert res.exit_code == 2 and "cannot create the output folder" in res.output, res.output
    assert "/proc/condiff-test/exp" in res.output and "Traceback" not in res.output
