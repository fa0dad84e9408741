"""bench/prepare_gpu_carry.sh, bench/gpu_check.sh and bench/gpu_train.sh on the CPU (their dry modes): the
carried condiff wheel is rebuilt from the checkout when the package sources changed after it was built, it
keeps the bundled demo weights, a relative OUT still receives model.tgz, and DEADLINE bounds training and
the throughput budgets."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = ["src", "engine", "train", "export", "examples"]  # pyproject.toml's package-dir folders
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache", ".hypothesis")


def _env(**kw) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for k in ("OUT", "WHL", "SECTIONS", "DEADLINE", "TRAIN_MIN", "PYTHONPATH"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _sh(script: Path, cwd: Path, timeout: int = 300, args=(), **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _checkout(tmp: Path) -> Path:
    """What a device call sends of the repo, as far as these scripts need it: bench's scripts and the package."""
    repo = tmp / "repo"
    (repo / "bench").mkdir(parents=True)
    for name in ("prepare_gpu_carry.sh", "gpu_check.sh", "gpu_train.sh"):
        shutil.copy2(REPO / "bench" / name, repo / "bench" / name)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, repo / name)
    for d in PACKAGE:
        shutil.copytree(REPO / d, repo / d, ignore=SKIP)
    return repo


def _digest(repo: Path) -> str:
    proc = _sh(repo / "bench" / "prepare_gpu_carry.sh", repo, args=["--source-digest"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _wheel(repo: Path) -> Path:
    whl = repo / ".carry" / "whl"
    proc = _sh(repo / "bench" / "prepare_gpu_carry.sh", repo, args=["--condiff-wheel", str(whl)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return whl


def test_source_digest_follows_the_package_sources_only(tmp_path):
    repo = _checkout(tmp_path)
    d0 = _digest(repo)
    assert re.fullmatch(r"[0-9a-f]{64}", d0)
    init = repo / "engine" / "__init__.py"
    text = init.read_text()
    init.write_text(text + "\n# mended after prepare\n")
    assert _digest(repo) != d0
    init.write_text(text)
    assert _digest(repo) == d0
    # what never travels or never goes into the wheel leaves it alone
    (repo / "engine" / "__pycache__").mkdir(exist_ok=True)
    (repo / "engine" / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"\0")
    (repo / "train" / "build").mkdir()
    (repo / "train" / "build" / "x.py").write_text("x = 1\n")
    (repo / "README.md").write_text("changed\n")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_x.py").write_text("")
    assert _digest(repo) == d0
    (repo / "train" / "new_module.py").write_text("")  # a new module does change it
    assert _digest(repo) != d0
    (repo / "train" / "new_module.py").unlink()
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.1.1"'))
    assert _digest(repo) != d0


def test_carried_wheel_keeps_the_bundled_demo_weights(tmp_path):
    """bench/gpu_consistency.py opens condiff.examples/models from the installed wheel."""
    repo = _checkout(tmp_path)
    whl = _wheel(repo)
    (wheel,) = whl.glob("condiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    weights = sorted(p.relative_to(REPO / "examples") for p in (REPO / "examples" / "models").glob("*/model.safetensors"))
    assert weights
    for w in weights:
        assert f"condiff/examples/{w}" in names
    assert "condiff/examples/models/set.json" in names or any(n.startswith("condiff/examples/models/") and
                                                              n.endswith(".json") for n in names)
    assert (whl / "condiff-src.sha256").read_text().strip() == _digest(repo)


def _environment(final: Path) -> str:
    with tarfile.open(final / "gpu_results.tgz") as tar:
        return tar.extractfile("report/environment.txt").read().decode()


def test_gpu_check_dry_rebuilds_a_stale_wheel_from_the_checkout(tmp_path):
    repo = _checkout(tmp_path)
    _wheel(repo)
    # code mended after prepare ran: the carried wheel is stale
    init = repo / "src" / "condiff" / "__init__.py"
    init.write_text(init.read_text() + "\nMENDED_AFTER_PREPARE = True\n")
    proc = _sh(repo / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="none", OUT="out_rel")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = tmp_path / "out_rel"  # a relative OUT is the caller's folder, not the repo's
    log = (final / "gpu_check.log").read_text()
    assert "differ from the carried wheel's" in log and "rebuilt" in log
    env = _environment(final)
    installed = Path(re.search(r"condiff 0\.1\.0 from (\S+)", env).group(1))
    assert installed.parent.parent.name == "site" and installed.read_text().endswith("MENDED_AFTER_PREPARE = True\n")
    shutil.rmtree(installed.parents[2], ignore_errors=True)  # gpu_check's staging folder under /tmp

    _wheel(repo)  # prepared again: the carried wheel is used as it is
    proc = _sh(repo / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="none", OUT=str(tmp_path / "o2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "o2" / "gpu_check.log").read_text()
    assert "the carried wheel matches the checkout" in log and "rebuilt" not in log


def test_gpu_check_stops_before_the_gpu_work_when_the_wheel_cannot_be_rebuilt(tmp_path):
    repo = _checkout(tmp_path)
    _wheel(repo)
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('build-backend = "setuptools.build_meta"',
                                                       'build-backend = "no_such_backend"'))
    proc = _sh(repo / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="2", OUT=str(tmp_path / "o"))
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "o" / "gpu_check.log").read_text()
    assert "ERROR" in log and "2 GPU tests" not in log


def _wheel_file(path: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding ``files``."""
    import base64
    import hashlib

    dist = f"{name}-99.0.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for n, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    whl = path / f"{name}-99.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return whl


def test_the_wheel_is_rebuilt_with_the_carried_setuptools(tmp_path):
    """pyproject.toml needs setuptools >= 77 (SPDX licence), which the device image may lack: a setuptools
    wheel in .carry/build is the build backend of the rebuild (here one that refuses, to show it is the one used)."""
    repo = _checkout(tmp_path)
    _wheel(repo)
    build = repo / ".carry" / "build"
    build.mkdir()
    _wheel_file(build, "setuptools", {"setuptools/__init__.py": "raise ImportError('CARRIED-SETUPTOOLS-USED')\n",
                                      "setuptools/build_meta.py": ""})
    init = repo / "src" / "condiff" / "__init__.py"
    init.write_text(init.read_text() + "\nMENDED_AFTER_PREPARE = True\n")
    proc = _sh(repo / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="none", OUT=str(tmp_path / "o"))
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CARRIED-SETUPTOOLS-USED" in (tmp_path / "o" / "gpu_check.log").read_text() + proc.stdout + proc.stderr
    assert not list(Path("/tmp").glob("condiff-setuptools.*/setuptools-99.0.dist-info"))  # its staging folder went


def test_gpu_train_dry_rebuilds_a_stale_wheel_and_skips_training_past_the_deadline(tmp_path):
    repo = _checkout(tmp_path)
    _wheel(repo)
    init = repo / "train" / "__init__.py"
    init.write_text(init.read_text() + "\n# mended after prepare\n")
    proc = _sh(repo / "bench" / "gpu_train.sh", tmp_path, GPU_TRAIN_DRY=1, RUN="t", STATE=str(tmp_path / "none"),
               OUT="out_rel", WORK=str(tmp_path / "work"), DATA=str(tmp_path / "data"), DEADLINE=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = tmp_path / "out_rel"
    log = (final / "gpu_train.log").read_text()
    assert "rebuilding the wheel from the checkout" in log
    assert "training skipped" in log and "condiff-train rc=-1" in log
    # what exists is packed all the same: the chunk says it trained nothing, and collect would refuse it
    with tarfile.open(final / "state.tgz.part00") as tar:
        chunk = json.loads(tar.extractfile("chunk.json").read())
    assert (chunk["steps_before"], chunk["steps_after"], chunk["train_skipped"]) == (0, 0, "deadline")
    assert "state.tgz.part00" in (final / "SHA256SUMS").read_text()


def test_gpu_train_dry_with_a_relative_out_returns_model_tgz(tmp_path):  # ~20 s: three CPU steps
    from test_gpu_train import _volumes

    _volumes(tmp_path / "data" / "ixi-t1")
    proc = _sh(REPO / "bench" / "gpu_train.sh", tmp_path, timeout=600, GPU_TRAIN_DRY=1, RUN="t", DRY_STEPS=3,
               STATE=str(tmp_path / "none"), OUT="out_rel", WORK=str(tmp_path / "work"), DATA=str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = tmp_path / "out_rel"
    assert (final / "model.tgz").is_file() and "Cannot open" not in proc.stdout + proc.stderr
    assert "model.tgz" in (final / "SHA256SUMS").read_text()
    with tarfile.open(final / "model.tgz") as tar:
        assert "fold0/model.safetensors" in tar.getnames()
    assert not (REPO / "out_rel").exists()


def test_gpu_check_section5_skips_training_past_the_deadline(tmp_path):
    proc = _sh(REPO / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="5", DEADLINE=100,
               OUT=str(tmp_path / "o"), DATA=str(tmp_path / "no-data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "o" / "gpu_check.log").read_text()
    assert "training skipped" in log and "[train fold" not in log


def test_gpu_check_throughput_budget_follows_the_deadline(tmp_path):
    proc = _sh(REPO / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="4", DEADLINE=50,
               OUT=str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[throughput_smoke] skipped: deadline" in (tmp_path / "o" / "gpu_check.log").read_text()
    proc = _sh(REPO / "bench" / "gpu_check.sh", tmp_path, GPU_CHECK_DRY=1, SECTIONS="4", DEADLINE=130,
               OUT=str(tmp_path / "o2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "o2" / "gpu_check.log").read_text()
    budget = int(re.search(r"\[throughput_smoke\] --time-budget (\d+) s", log).group(1))
    assert 50 <= budget <= 130 - 25 - 15  # what DEADLINE leaves after section 1, less the margins
    assert re.search(r"\[throughput_smoke\] rc=0 in \d+ s", log)
