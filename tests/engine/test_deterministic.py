"""``--deterministic`` (ecosystem C.41): the switches are set and recorded, and results do not change.

On the CPU eager fp32 already repeats bit for bit, so the flag must leave every output byte as it
was; on a GPU its effect (same bits run to run) is checked by ``bench/gpu_check.sh``.
"""
import json
import logging
import os

import pytest
import torch

from _infer_helpers import FAST, digests, invoke_infer, make_model_set, make_scans, one_torch_thread


@pytest.fixture
def plain_torch():
    """Start from PyTorch's defaults and put back whatever the process had (the switch is process-wide)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True  # what a user's own code may have set: the flag must turn it off
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def test_flag_keeps_every_output_byte_and_records_the_switches(tmp_path, plain_torch):
    models = make_model_set(tmp_path / "set", n_members=2)
    scans = tmp_path / "scans"
    make_scans(scans, n=2)
    with one_torch_thread():
        plain = invoke_infer([scans, "-o", tmp_path / "plain", "--models", models, *FAST])
        assert plain.exit_code == 0, plain.output
        assert not torch.are_deterministic_algorithms_enabled()
        det = invoke_infer([scans, "-o", tmp_path / "det", "--models", models, *FAST, "--deterministic"])
        assert det.exit_code == 0, det.output
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert digests(tmp_path / "det") == digests(tmp_path / "plain")
    run_plain = json.loads((tmp_path / "plain" / "run.json").read_text())
    run_det = json.loads((tmp_path / "det" / "run.json").read_text())
    assert run_plain["arguments"]["deterministic"] is False and run_det["arguments"]["deterministic"] is True
    assert run_plain["versions"]["determinism"] == "deterministic algorithms off, cuDNN deterministic off, cuDNN benchmark on"
    assert run_det["versions"]["determinism"] == ("deterministic algorithms on, cuDNN deterministic on, "
                                                  "cuDNN benchmark off, CUBLAS_WORKSPACE_CONFIG=:4096:8")
    # a rerun without the flag resumes the deterministic run's cases: the flag does not change results
    again = invoke_infer([scans, "-o", tmp_path / "det", "--models", models, *FAST])
    assert again.exit_code == 0 and "0 done, 2 already done" in again.output


def test_ort_sessions_get_deterministic_compute(tmp_path, plain_torch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from condiff.engine.pipeline import load_denoisers, make_context
    from condiff.export.onnx_export import export_onnx
    from condiff.modelset import open_model_set

    models = make_model_set(tmp_path / "set", n_members=2)
    for member in open_model_set(models).member_dirs:
        export_onnx(member)
    for flag in (False, True):
        ctx = make_context(models, tmp_path / "out", engine="ort", device="cpu", deterministic=flag)
        load_denoisers(ctx)
        assert [d.session.get_session_options().use_deterministic_compute for d in ctx.denoisers] == [flag, flag]
    assert torch.are_deterministic_algorithms_enabled()


def test_tensorrt_is_said_to_have_no_such_mode(plain_torch, caplog):
    from condiff.engine.determinism import enable_deterministic

    with caplog.at_level(logging.WARNING, logger="condiff.engine.determinism"):
        enable_deterministic("trt")
    assert "TensorRT has no deterministic mode" in caplog.text
    assert torch.are_deterministic_algorithms_enabled()


def test_version_report_shows_the_determinism_line(plain_torch):
    res = invoke_infer(["--version"])
    assert res.exit_code == 0
    assert "determinism" in res.output and "deterministic algorithms off, cuDNN deterministic off" in res.output


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["torch", "fast"])
def test_gpu_reruns_with_the_flag_repeat_bit_for_bit(tmp_path, engine):
    """Two fresh processes (the switch must precede the first cuBLAS handle) give identical bytes."""
    import subprocess
    import sys

    models = make_model_set(tmp_path / "set", n_members=2)
    scans = tmp_path / "scans"
    make_scans(scans, n=2)
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "condiff.engine.cli", str(scans), "-o", str(tmp_path / run),
                               "--models", str(models), "--engine", engine, "--device", "cuda", "--steps", "5",
                               "--deterministic", "--no-progress"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    versions = json.loads((tmp_path / "a" / "run.json").read_text())["versions"]
    assert versions["determinism"].startswith("deterministic algorithms on, cuDNN deterministic on")
