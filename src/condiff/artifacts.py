"""Exported-artifact sidecars: what an ONNX file or TensorRT plan was built from, and the check
that it still matches (DESIGN §3). Standard library only, so backends can refuse a stale artifact
before importing a runtime.

An artifact ``model.onnx`` has its sidecar ``model.onnx.json`` beside it (``model.fp16.plan`` →
``model.fp16.plan.json``), with these fields (``condiff.artifact/1``)::

    schema, artifact, kind ("onnx" | "tensorrt"), artifact_sha256,
    weights_sha256, unet_config_sha256, condiff_version,
    opset, precision, attention {variant, chunk_size, pad_head_dim},
    batch_profile {dynamic} (ONNX) or {min, opt, max} (TensorRT),
    image_shape [C, H, W], check {max_abs_diff, atol, batch, against},
    build_options {...: the condiff-export options that made it}, versions {...},
    TensorRT only: tensorrt_version, gpu_name, compute_capability, onnx_sha256

``verify_sidecar`` refuses an artifact whose sidecar is missing, unreadable, or disagrees with the
weights, the network configuration, the condiff version, the artifact's own bytes or (for plans)
the runtime, with ``ArtifactError`` whose hint is the exact command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Mapping

from condiff import __version__
from condiff.errors import ArtifactError
from condiff.io.atomic import write_json_atomic

SCHEMA = "condiff.artifact/1"
ONNX_NAME = "model.onnx"
PLAN_NAME = "model.fp16.plan"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Fields a plan must share with the runtime that loads it (engines are not portable across
# TensorRT versions or GPUs: TensorRT issues 2176, 70, 977).
RUNTIME_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability")
# condiff-export options recorded in build_options, in the order the command line gives them.
_FLAG_ORDER = ("opset", "attention", "chunk_size", "pad_head_dim", "min_batch", "opt_batch", "max_batch",
               "workspace_gb", "timing_cache")


def sidecar_path(artifact_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    artifact_path = Path(artifact_path)
    return artifact_path.with_name(artifact_path.name + ".json")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def unet_config_sha256(unet_config: Mapping[str, Any]) -> str:
    """Digest of the network configuration (canonical JSON): the graph depends on it, not only on the weights."""
    return hashlib.sha256(json.dumps(unet_config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """``weights_sha256`` and ``unet_config_sha256`` of a model folder, read with the standard library."""
    model_dir = Path(model_dir)
    weights, config = model_dir / WEIGHTS_NAME, model_dir / CONFIG_NAME
    if not weights.is_file() or not config.is_file():
        raise ArtifactError(model_dir, f"not a condiff model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        unet = json.loads(config.read_text())["unet"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(config, f"cannot read the network configuration ({exc})") from exc
    return {"weights_sha256": file_sha256(weights), "unet_config_sha256": unet_config_sha256(unet)}


def rebuild_command(model_dir: str | Path, kind: str = "onnx", build_options: Mapping[str, Any] | None = None) -> str:
    """The exact ``condiff-export`` command that rebuilds an artifact of ``kind`` in ``model_dir``."""
    parts = ["condiff-export", shlex.quote(str(model_dir))]
    if kind == "tensorrt":
        parts.append("--trt")
    options = dict(build_options or {})
    for key in _FLAG_ORDER:
        value = options.get(key)
        if value is None:
            continue
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def write_sidecar(artifact_path: str | Path, fields: Mapping[str, Any]) -> Path:
    """Write ``<artifact>.json`` atomically; fills ``schema``, ``artifact`` and ``condiff_version``."""
    artifact_path = Path(artifact_path)
    doc = {"schema": SCHEMA, "artifact": artifact_path.name, "condiff_version": __version__, **fields}
    path = sidecar_path(artifact_path)
    write_json_atomic(path, doc)
    return path


OBJECT_FIELDS = ("attention", "build_options")


def read_sidecar(artifact_path: str | Path, kind: str = "onnx") -> dict[str, Any]:
    """The sidecar's fields; ``ArtifactError`` (hint: rebuild command) if it is missing or unreadable."""
    artifact_path = Path(artifact_path)
    path = sidecar_path(artifact_path)
    hint = rebuild_command(artifact_path.parent, kind)
    if not path.is_file():
        raise ArtifactError(artifact_path, f"has no sidecar {path.name}, so what it was built from is unknown",
                            f"rebuild it with: {hint}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ArtifactError(path, f"unreadable sidecar ({exc})", f"rebuild it with: {hint}") from exc
    if not isinstance(doc, dict):
        raise ArtifactError(path, "sidecar is not a JSON object", f"rebuild it with: {hint}")
    for key in OBJECT_FIELDS:  # read with .get(...).get(...) and dict(...) further on: a wrong type is a bad sidecar
        if key in doc and not isinstance(doc[key], dict):
            raise ArtifactError(path, f'sidecar field "{key}" is not a JSON object (found {type(doc[key]).__name__})',
                                f"rebuild it with: {hint}")
    return doc


def verify_sidecar(artifact_path: str | Path, *, weights_sha256: str, unet_config_sha256: str | None = None,
                   kind: str = "onnx", runtime: Mapping[str, Any] | None = None,
                   check_artifact_digest: bool = True) -> dict[str, Any]:
    """Check ``artifact_path`` against its sidecar and what it will run with; return the sidecar.

    Refused (``ArtifactError`` whose hint is the exact rebuild command) when: the artifact or its
    sidecar is missing; the schema, kind, weights digest, network-config digest or condiff version
    differ; the artifact's bytes are not the ones the sidecar describes; or (``runtime``, for
    TensorRT plans) any of ``tensorrt_version``, ``gpu_name``, ``compute_capability`` differ.
    """
    artifact_path = Path(artifact_path)
    model_dir = artifact_path.parent
    if not artifact_path.is_file():
        raise ArtifactError(artifact_path, "does not exist", f"build it with: {rebuild_command(model_dir, kind)}")
    doc = read_sidecar(artifact_path, kind)
    hint = f"rebuild it with: {rebuild_command(model_dir, kind, doc.get('build_options'))}"

    def refuse(problem: str):
        raise ArtifactError(artifact_path, problem, hint)

    if doc.get("schema") != SCHEMA:
        refuse(f"sidecar schema {doc.get('schema')!r} is not {SCHEMA}")
    if doc.get("kind") != kind:
        refuse(f"sidecar describes a {doc.get('kind')!r} artifact, expected {kind!r}")
    if doc.get("artifact") != artifact_path.name:
        refuse(f"sidecar describes {doc.get('artifact')!r}, not this file")
    if doc.get("weights_sha256") != weights_sha256:
        refuse(f"is stale: built from weights {str(doc.get('weights_sha256'))[:12]}…, "
               f"but {WEIGHTS_NAME} is now {weights_sha256[:12]}…")
    if unet_config_sha256 is not None and doc.get("unet_config_sha256") != unet_config_sha256:
        refuse("is stale: the network configuration in config.json changed since it was built")
    if doc.get("condiff_version") != __version__:
        refuse(f"was built by condiff {doc.get('condiff_version')}, this is condiff {__version__}")
    for key, want in (runtime or {}).items():
        if doc.get(key) != want:
            refuse(f"was built for {key} {doc.get(key)!r}, this machine has {want!r}")
    if check_artifact_digest and doc.get("artifact_sha256") != file_sha256(artifact_path):
        refuse("its bytes do not match the digest in its sidecar (modified or partly written)")
    return doc


def verify_model_artifact(model_dir: str | Path, name: str = ONNX_NAME, *, kind: str = "onnx",
                          runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``verify_sidecar`` for ``model_dir/name`` against that folder's weights and config."""
    model_dir = Path(model_dir)
    fp = model_fingerprint(model_dir)
    return verify_sidecar(model_dir / name, kind=kind, runtime=runtime, **fp)


__all__ = ["SCHEMA", "ONNX_NAME", "PLAN_NAME", "RUNTIME_FIELDS", "sidecar_path", "file_sha256", "unet_config_sha256",
           "model_fingerprint", "rebuild_command", "write_sidecar", "read_sidecar", "verify_sidecar",
           "verify_model_artifact"]
