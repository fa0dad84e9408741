"""Sidecar schema and refusal of stale artifacts (condiff.artifacts: standard library only)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from condiff import __version__, artifacts
from condiff.errors import ArtifactError


def _model_folder(folder: Path, weights: bytes = b"weights-v1", unet: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps({"schema": "condiff.model/1", "unet": unet or {"sample_size": 32}}))
    return folder


def _artifact(folder: Path, name="model.onnx", kind="onnx", data=b"graph", **extra) -> Path:
    path = folder / name
    path.write_bytes(data)
    artifacts.write_sidecar(path, {"kind": kind, "artifact_sha256": artifacts.file_sha256(path),
                                   **artifacts.model_fingerprint(folder), **extra})
    return path


def test_sidecar_path_and_fields(tmp_path):
    folder = _model_folder(tmp_path / "m")
    path = _artifact(folder, build_options={"opset": 17})
    assert artifacts.sidecar_path(path) == folder / "model.onnx.json"
    doc = artifacts.verify_model_artifact(folder)
    assert doc["schema"] == "condiff.artifact/1" and doc["artifact"] == "model.onnx"
    assert doc["condiff_version"] == __version__


def test_changed_weights_refused_with_the_rebuild_command(tmp_path):
    folder = _model_folder(tmp_path / "my models" / "fold 0")  # spaces: the command must quote them
    _artifact(folder, build_options={"opset": 18, "attention": "chunked", "chunk_size": 256})
    (folder / "model.safetensors").write_bytes(b"weights-v2")
    with pytest.raises(ArtifactError) as info:
        artifacts.verify_model_artifact(folder)
    err = info.value
    assert "stale" in err.problem and "model.safetensors" in err.problem
    command = f"condiff-export {shlex.quote(str(folder))} --opset 18 --attention chunked --chunk-size 256"
    assert err.hint == f"rebuild it with: {command}"
    assert command in str(err) and str(folder / "model.onnx") in str(err)
    assert shlex.split(command)[1] == str(folder)


def test_changed_network_config_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    _artifact(folder)
    _model_folder(folder, unet={"sample_size": 64})
    with pytest.raises(ArtifactError, match="network configuration"):
        artifacts.verify_model_artifact(folder)


def test_modified_artifact_bytes_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    path = _artifact(folder)
    path.write_bytes(b"graph, truncated")
    with pytest.raises(ArtifactError, match="do not match the digest"):
        artifacts.verify_model_artifact(folder)


def test_missing_or_unreadable_sidecar_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"graph")
    with pytest.raises(ArtifactError, match="has no sidecar") as info:
        artifacts.verify_model_artifact(folder)
    assert info.value.hint == f"rebuild it with: condiff-export {shlex.quote(str(folder))}"
    (folder / "model.onnx.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable sidecar"):
        artifacts.verify_model_artifact(folder)


def test_missing_artifact_names_the_build_command(tmp_path):
    folder = _model_folder(tmp_path / "m")
    with pytest.raises(ArtifactError, match="does not exist") as info:
        artifacts.verify_model_artifact(folder, artifacts.PLAN_NAME, kind="tensorrt")
    assert info.value.hint.endswith("--trt")


def test_other_condiff_version_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    path = _artifact(folder)
    doc = json.loads(artifacts.sidecar_path(path).read_text())
    doc["condiff_version"] = "0.0.1"
    artifacts.sidecar_path(path).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="condiff 0.0.1"):
        artifacts.verify_model_artifact(folder)


def test_plan_runtime_mismatch_refused_with_trt_rebuild_command(tmp_path):
    folder = _model_folder(tmp_path / "m")
    built_on = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    _artifact(folder, artifacts.PLAN_NAME, "tensorrt", **built_on,
              build_options={"min_batch": 1, "opt_batch": 8, "max_batch": 32, "workspace_gb": 4.0})
    assert artifacts.verify_model_artifact(folder, artifacts.PLAN_NAME, kind="tensorrt", runtime=built_on)
    for key, other in [("gpu_name", "NVIDIA H200"), ("tensorrt_version", "10.7.0"), ("compute_capability", "8.0")]:
        with pytest.raises(ArtifactError, match=key) as info:
            artifacts.verify_model_artifact(folder, artifacts.PLAN_NAME, kind="tensorrt", runtime={**built_on, key: other})
        assert info.value.hint == (f"rebuild it with: condiff-export {shlex.quote(str(folder))} --trt "
                                   "--min-batch 1 --opt-batch 8 --max-batch 32 --workspace-gb 4.0")


def test_kind_mismatch_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    _artifact(folder, artifacts.PLAN_NAME, "onnx")
    with pytest.raises(ArtifactError, match="expected 'tensorrt'"):
        artifacts.verify_model_artifact(folder, artifacts.PLAN_NAME, kind="tensorrt")


def test_artifacts_module_imports_no_torch():
    code = "import sys, condiff.artifacts; print([m for m in ('torch', 'numpy', 'onnx') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("field, value", [("attention", "x"), ("build_options", "abc"), ("attention", [1])])
def test_a_sidecar_field_of_the_wrong_type_is_a_bad_sidecar_not_a_traceback(tmp_path, field, value):
    """An edited sidecar ("attention": "x") crashed the ORT backend with an AttributeError, and a string
    "build_options" crashed building the refusal's own rebuild command."""
    folder = _model_folder(tmp_path / "m")
    path = _artifact(folder)
    doc = json.loads((folder / "model.onnx.json").read_text())
    doc[field] = value
    (folder / "model.onnx.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError) as info:
        artifacts.verify_model_artifact(folder)
    assert f'sidecar field "{field}" is not a JSON object' in info.value.message and "model.onnx.json" in info.value.message
    assert info.value.hint == f"rebuild it with: condiff-export {shlex.quote(str(folder))}"
    assert path.is_file()
