"""The TensorRT path with a fake ``tensorrt`` module: builder calls, refusals, sidecars, runtime binding.

TensorRT cannot be installed on any machine this project has (performance.md §5). These tests check
what condiff asks of TensorRT and what it does with the answers; they never show that TensorRT
runs the network. The GPU check script is where that would be shown, once a machine has TensorRT.
"""
import json
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from condiff import artifacts  # noqa: E402
from condiff.config import ModelConfig, preset  # noqa: E402
from condiff.errors import ArtifactError, BackendUnavailableError, ExportError  # noqa: E402
from condiff.export import trt_build  # noqa: E402
from condiff.export.trt_build import BatchProfile, build_engine, build_trt  # noqa: E402
from condiff.modelset import load_model, save_model  # noqa: E402
from condiff.unet import ConditionalUNet  # noqa: E402

GPU = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def make_fake_tensorrt(calls: list, *, engine: bytes | None = b"ENGINE", parse_ok: bool = True,
                       cache_matches: bool = True, onnx_seen: list | None = None) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` package that records every builder call in ``calls``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.1"

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            calls.append(("Logger", level))

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16 = "FP16"

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"CACHE:" + self.blob

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.blob, ignore_mismatch))
            ok = cache_matches or cache.blob == b""
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return engine

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            if onnx_seen is not None:
                onnx_seen.append(onnx.load(path))
            return parse_ok

        def get_error(self, i):
            return "In node 12 (MultiHeadAttention): No importer registered"

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize_cuda_engine", bytes(data)))
            return None

    for obj in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag, Builder, OnnxParser, Runtime):
        setattr(trt, obj.__name__, obj)
    return trt


@pytest.fixture
def calls():
    return []


@pytest.fixture
def fake_trt(monkeypatch, calls):
    trt = make_fake_tensorrt(calls)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def _model(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", sample_size=32)
    model = ConditionalUNet(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return save_model(folder, model, ModelConfig(unet=cfg))


# ----------------------------------------------------------------------------------------- builder calls


def test_build_engine_calls(fake_trt, calls, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    plan = build_engine(tmp_path / "m.onnx", image_shape=(1, 128, 128), profile=BatchProfile(2, 8, 32),
                        workspace_gb=3, timing_cache=cache)
    assert plan == b"ENGINE"
    assert ("create_network", 1) in calls  # explicit batch
    assert ("parse_from_file", str(tmp_path / "m.onnx")) in calls
    assert ("set_flag", "FP16") in calls
    assert ("set_memory_pool_limit", "WORKSPACE", 3 << 30) in calls
    shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    assert shapes == [("x_t", (2, 1, 128, 128), (8, 1, 128, 128), (32, 1, 128, 128)),
                      ("cond", (2, 1, 128, 128), (8, 1, 128, 128), (32, 1, 128, 128)),
                      ("t", (2,), (8,), (32,))]
    assert ("add_optimization_profile",) in calls
    assert ("create_timing_cache", b"old") in calls and ("set_timing_cache", b"old", False) in calls
    assert cache.read_bytes() == b"CACHE:old"  # written back after the build
    order = [c[0] for c in calls]
    assert order.index("set_timing_cache") < order.index("build_serialized_network")


def test_default_profile_is_1_64_64(fake_trt, calls, tmp_path):
    build_engine(tmp_path / "m.onnx", image_shape=(3, 64, 64))
    assert [c[2:] for c in calls if c[0] == "set_shape" and c[1] == "t"] == [((1,), (64,), (64,))]
    assert ("set_memory_pool_limit", "WORKSPACE", 8 << 30) in calls


def test_none_engine_refused_and_cache_left_alone(monkeypatch, calls, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(calls, engine=None))
    cache = tmp_path / "timing.cache"
    with pytest.raises(ExportError, match="returned no engine"):
        build_engine(tmp_path / "m.onnx", image_shape=(1, 32, 32), timing_cache=cache)
    assert not cache.exists()


def test_parser_errors_are_reported(monkeypatch, calls, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(calls, parse_ok=False))
    with pytest.raises(ExportError, match="No importer registered"):
        build_engine(tmp_path / "m.onnx", image_shape=(1, 32, 32))
    assert ("build_serialized_network",) not in calls


def test_mismatched_timing_cache_is_replaced_by_a_fresh_one(monkeypatch, calls, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(calls, cache_matches=False))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-an-A100")
    build_engine(tmp_path / "m.onnx", image_shape=(1, 32, 32), timing_cache=cache)
    assert [c[1] for c in calls if c[0] == "set_timing_cache"] == [b"from-an-A100", b""]
    assert cache.read_bytes() == b"CACHE:"
    assert "does not match" in caplog.text


def test_batch_profile_validation():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(4, 2, 8)
    # tuned for the batch it runs: the trt engine pads every batch to the profile's largest
    assert BatchProfile().to_dict() == {"min": 1, "opt": 64, "max": 64}


def test_timing_cache_name_is_per_architecture_and_version(tmp_path):
    path = trt_build.default_timing_cache(tmp_path, "10.3.0", "9.0")
    assert path == tmp_path / "trt-timing-sm90-trt10.3.0.cache"


# ----------------------------------------------------------------------------------------- missing tensorrt


def test_missing_tensorrt_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailableError, match=r"condiff\[trt\]"):
        build_engine(tmp_path / "m.onnx", image_shape=(1, 32, 32))
    from condiff.engine.backends.trt_backend import open_trt

    with pytest.raises(BackendUnavailableError, match=r"condiff\[trt\]"):
        open_trt(tmp_path)


def test_cli_trt_without_tensorrt_fails_before_any_export(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    folder = _model(tmp_path / "m")
    result = CliRunner().invoke(main, [str(folder), "--trt"])
    assert result.exit_code == 2 and "condiff[trt]" in result.output
    assert not (folder / "model.onnx").exists()


def test_tensorrt_11_is_refused_before_any_export(monkeypatch, calls, tmp_path):
    """TensorRT 11 (what an unpinned 'pip install tensorrt' gets) removed BuilderFlag.FP16: the build
    crashed with an AttributeError after the ONNX export. It is exit 2 naming the version, first."""
    from click.testing import CliRunner

    from condiff.export.cli import main

    trt = make_fake_tensorrt(calls)
    trt.__version__ = "11.4.0.106"
    del trt.BuilderFlag.FP16
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 11\.4\.0\.106.*tensorrt>=10,<11"):
        build_engine(tmp_path / "m.onnx", image_shape=(1, 32, 32))
    folder = _model(tmp_path / "m")
    result = CliRunner().invoke(main, [str(folder), "--trt"])
    assert result.exit_code == 2 and "TensorRT 11.4.0.106" in result.output, result.output
    assert not (folder / "model.onnx").exists() and not [c for c in calls if c[0] == "parse_from_file"]
    # the extra that installs it keeps below 11
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"tensorrt>=10.0,<11"' in text


def test_opset_above_what_the_exporter_supports_is_refused(tmp_path):
    """torch's TorchScript exporter supports opset 20 at most (it stamped 21..23 on a graph it only warned
    about), as does TensorRT 10.0's parser."""
    from click.testing import CliRunner

    from condiff.export.cli import main

    folder = _model(tmp_path / "m")
    result = CliRunner().invoke(main, [str(folder), "--opset", "21"])
    assert result.exit_code == 2 and "--opset" in result.output
    assert not (folder / "model.onnx").exists()


def test_cli_tunes_the_plan_for_its_largest_batch_unless_told(monkeypatch, tmp_path):
    """The trt engine pads every batch to the profile's largest for its CUDA graph: that is the batch to
    tune for (the default used to be 16 whatever --max-batch said, and 16 > --max-batch 8 was refused)."""
    from click.testing import CliRunner

    from condiff.export import cli

    seen = []
    monkeypatch.setattr(cli, "_export_all", lambda *a, batches, **kw: seen.append(batches) or 0)
    for extra, want in (([], (1, 64, 64)), (["--max-batch", "8"], (1, 8, 8)), (["--opt-batch", "4", "--max-batch", "8"], (1, 4, 8))):
        result = CliRunner().invoke(cli.main, [str(tmp_path), "--trt", *extra])
        assert result.exit_code == 0, result.output
        assert seen.pop() == want


def test_build_trt_needs_cuda(fake_trt, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        build_trt(_model(tmp_path / "m"))


# ----------------------------------------------------------------------------------------- build_trt flow


@pytest.fixture
def gpu_stubs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_build, "gpu_identity", lambda device=0: dict(GPU))
    # the map check runs the stub engine on the CPU (there is no GPU here)
    check = trt_build._check_plan_maps
    monkeypatch.setattr(trt_build, "_check_plan_maps",
                        lambda plan, model, config, profile, device, steps:
                        check(plan, model, config, profile, torch.device("cpu"), steps))
    engine_like_torch(monkeypatch)


def engine_like_torch(monkeypatch, distort=lambda eps: eps, batches: list | None = None):
    """Make the built "engine" the model's own bf16 copy (reduced precision, as an FP16 engine), distorted."""
    def plan_denoiser(plan, device):
        def denoise(x_t, cond, t):
            if batches is not None:
                batches.append(x_t.shape[0])
            with torch.no_grad():
                eps = engine_like_torch.model(x_t.bfloat16(), cond.bfloat16(), t).float()
            return distort(eps)
        return denoise

    real = trt_build.load_model

    def load_model_and_keep(folder):
        model, config = real(folder)
        engine_like_torch.model = ConditionalUNet(config.unet).bfloat16()
        engine_like_torch.model.load_state_dict(model.state_dict())
        return model, config

    monkeypatch.setattr(trt_build, "plan_denoiser", plan_denoiser)
    monkeypatch.setattr(trt_build, "load_model", load_model_and_keep)


def test_build_trt_writes_plan_and_sidecar_from_a_tensorrt_ready_onnx(monkeypatch, calls, tmp_path, gpu_stubs):
    seen = []
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(calls, onnx_seen=seen))
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.004)
    folder = _model(tmp_path / "m")
    result = build_trt(folder, profile=BatchProfile(1, 4, 8), workspace_gb=2)
    assert result.path == folder / "model.fp16.plan" and result.path.read_bytes() == b"ENGINE"
    # the ONNX handed to TensorRT: plain attention (no ORT contrib op), head dim padded to 16,
    # and it was removed after the build
    (graph,) = seen
    ops = [n.op_type for n in graph.graph.node]
    assert "MultiHeadAttention" not in ops and ops.count("Softmax") == 4
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    pads = [n for n in graph.graph.node if n.op_type == "Pad"]
    assert len(pads) == 12  # q, k, v in each of the 4 attention layers
    parsed_path = Path([c for c in calls if c[0] == "parse_from_file"][0][1])
    assert not parsed_path.exists() and not any(p.name.startswith(".condiff-trt-") for p in folder.iterdir())
    doc = artifacts.verify_model_artifact(folder, artifacts.PLAN_NAME, kind="tensorrt",
                                          runtime={"tensorrt_version": "10.99.1", **GPU})
    assert doc["precision"] == "fp16" and doc["batch_profile"] == {"min": 1, "opt": 4, "max": 8}
    assert doc["attention"] == {"variant": "sdpa", "chunk_size": None, "pad_head_dim": 16}
    assert len(doc["onnx_sha256"]) == 64 and doc["check"]["max_abs_diff"] == 0.004
    assert doc["check"]["onnx_max_abs_diff"] <= 1e-4
    assert doc["timing_cache"] == str(folder / "trt-timing-sm90-trt10.99.1.cache")
    assert (folder / "trt-timing-sm90-trt10.99.1.cache").is_file()
    # the map check of the (bf16 stand-in) engine: recorded with its tolerance, passed, not exact
    maps = doc["check"]["maps"]
    assert maps["steps"] == 10 and maps["finite"] and maps["tolerance"]["min_correlation"] == 0.995
    assert 0 < maps["relative_map_diff"] <= 0.05 and maps["min_correlation"] >= 0.995
    assert result.maps is not None and result.maps.relative_map_diff == maps["relative_map_diff"]


def test_build_trt_of_a_large_network_skips_the_cpu_onnx_runtime_check(monkeypatch, calls, tmp_path, gpu_stubs):
    """The plain-attention graph of a paper-size network would make ONNX Runtime on the CPU hold tens of
    GiB (16 GiB of scores per image): above the limit the ONNX check is skipped, said in the sidecar, and
    the engine is still checked against torch (single call and maps)."""
    from condiff.export import onnx_export

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(calls))
    compared = []
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: compared.append(1) or 0.004)
    monkeypatch.setattr(trt_build, "MAX_PLAIN_SCORE_BYTES", 1024)  # the tiny net counts as large here

    def no_session(*a, **k):
        raise AssertionError("ONNX Runtime session opened on the large graph")

    monkeypatch.setattr(onnx_export, "ort_cpu_session", no_session)
    folder = _model(tmp_path / "m")
    result = build_trt(folder, profile=BatchProfile(1, 4, 8), workspace_gb=2)
    doc = json.loads(result.sidecar.read_text())
    assert doc["check"]["onnx_max_abs_diff"].startswith("skipped") and compared == [1]
    assert doc["check"]["maps"]["steps"] == 10 and ("build_serialized_network",) in calls


def test_build_trt_refuses_an_engine_whose_maps_differ(fake_trt, monkeypatch, tmp_path, gpu_stubs):
    # eps at half its size shifts every restoration (the single-call eps check is stubbed to pass)
    engine_like_torch(monkeypatch, distort=lambda eps: 0.5 * eps)
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.004)
    folder = _model(tmp_path / "m")
    with pytest.raises(ExportError, match="anomaly maps differ from torch's") as info:
        build_trt(folder)
    assert "of their maximum" in str(info.value)
    assert not (folder / "model.fp16.plan").exists() and not (folder / "model.fp16.plan.json").exists()


def test_build_trt_refuses_an_engine_with_nan_maps(fake_trt, monkeypatch, tmp_path, gpu_stubs):
    def one_nan(eps):  # an fp16 overflow in one pixel
        eps = eps.clone()
        eps[:, :, 16, 16] = float("nan")
        return eps

    engine_like_torch(monkeypatch, distort=one_nan)
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.004)
    folder = _model(tmp_path / "m")
    with pytest.raises(ExportError, match="NaN or infinity"):
        build_trt(folder)
    assert not (folder / "model.fp16.plan").exists()


def test_map_check_batches_stay_inside_the_profile(fake_trt, monkeypatch, tmp_path, gpu_stubs):
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.004)
    for profile, expected in ((BatchProfile(1, 1, 1), [1, 1, 1, 1]), (BatchProfile(1, 1, 2), [2, 2]),
                              (BatchProfile(1, 2, 3), [3, 1]), (BatchProfile(6, 8, 8), [6]),
                              (BatchProfile(1, 16, 64), [4])):
        batches = []
        engine_like_torch(monkeypatch, batches=batches)
        folder = _model(tmp_path / f"m{profile.min}-{profile.max}")
        result = build_trt(folder, profile=profile)
        assert batches == expected * 10  # every one of the 10 steps, all 4 calibration images
        assert result.maps.images == 4 and result.maps.failures(trt_build.FP16) == []


def test_map_check_steps_0_skips_it(fake_trt, monkeypatch, tmp_path, gpu_stubs):
    engine_like_torch(monkeypatch, distort=lambda eps: 0.5 * eps)  # would fail the check
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.004)
    folder = _model(tmp_path / "m")
    result = build_trt(folder, map_steps=0)
    doc = json.loads((folder / "model.fp16.plan.json").read_text())
    assert result.maps is None and doc["check"]["maps"].startswith("skipped")


def test_build_trt_fp16_mismatch_leaves_no_plan(fake_trt, monkeypatch, tmp_path, gpu_stubs):
    monkeypatch.setattr(trt_build, "_compare_plan", lambda *a: 0.9)
    folder = _model(tmp_path / "m")
    with pytest.raises(ExportError, match="FP16 engine differs"):
        build_trt(folder)
    assert not (folder / "model.fp16.plan").exists() and not (folder / "model.fp16.plan.json").exists()


def test_compare_plan_measures_against_torch(monkeypatch, tmp_path):
    folder = _model(tmp_path / "m")
    model, _ = load_model(folder)

    def engine_off_by(offset):
        def run(plan, inputs, device):
            with torch.no_grad():
                return model(*inputs) + offset
        return run

    monkeypatch.setattr(trt_build, "run_engine_once", engine_off_by(0.01))
    diff = trt_build._compare_plan(b"", model, (1, 32, 32), BatchProfile(2, 2, 2), torch.device("cpu"))
    assert diff == pytest.approx(0.01, abs=1e-5)


def test_trt_refuses_ort_mha():
    with pytest.raises(ValueError, match="TensorRT cannot parse"):
        trt_build.resolve_attention("ort_mha", "trt")


# ----------------------------------------------------------------------------------------- runtime (open_trt)


def _plan_folder(tmp_path, **sidecar) -> Path:
    folder = _model(tmp_path / "m")
    plan = folder / artifacts.PLAN_NAME
    plan.write_bytes(b"ENGINE")
    artifacts.write_sidecar(plan, {"kind": "tensorrt", "artifact_sha256": artifacts.file_sha256(plan),
                                   **artifacts.model_fingerprint(folder), "tensorrt_version": "10.99.1", **GPU,
                                   "batch_profile": {"min": 1, "opt": 4, "max": 8}, "image_shape": [1, 32, 32],
                                   "build_options": {"min_batch": 1, "opt_batch": 4, "max_batch": 8}, **sidecar})
    return folder


def test_open_trt_refuses_a_stale_plan(fake_trt, tmp_path):
    from condiff.engine.backends.trt_backend import open_trt

    folder = _plan_folder(tmp_path)
    model, config = load_model(folder)
    with torch.no_grad():
        model.conv_in.bias.add_(0.5)
    save_model(folder, model, config)
    with pytest.raises(ArtifactError, match="stale") as info:
        open_trt(folder)
    assert f"condiff-export {shlex.quote(str(folder))} --trt --min-batch 1 --opt-batch 4 --max-batch 8" in str(info.value)


def test_open_trt_without_cuda_is_unavailable(fake_trt, tmp_path, monkeypatch):
    from condiff.engine.backends.trt_backend import open_trt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        open_trt(_plan_folder(tmp_path))


def _fake_gpu(monkeypatch, name=GPU["gpu_name"], capability=(9, 0)):
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def test_open_trt_refuses_a_plan_built_on_another_gpu(fake_trt, tmp_path, monkeypatch):
    from condiff.engine.backends.trt_backend import open_trt

    _fake_gpu(monkeypatch, name="NVIDIA H200")
    with pytest.raises(ArtifactError, match="gpu_name 'NVIDIA H100 80GB HBM3', this machine has 'NVIDIA H200'"):
        open_trt(_plan_folder(tmp_path))


def test_open_trt_refuses_an_undeserializable_plan(fake_trt, calls, tmp_path, monkeypatch):
    from condiff.engine.backends.trt_backend import open_trt

    _fake_gpu(monkeypatch)
    with pytest.raises(ArtifactError, match="could not deserialize") as info:
        open_trt(_plan_folder(tmp_path))
    assert ("deserialize_cuda_engine", b"ENGINE") in calls
    assert "--trt" in str(info.value)


# ----------------------------------------------------------------------------------------- runtime binding


class _FakeContext:
    """Computes eps = 2 * x_t + cond + t from whatever buffers are bound, checking shapes and addresses."""

    def __init__(self, tensors_by_ptr, log):
        self.by_ptr, self.log, self.shapes, self.addr = tensors_by_ptr, log, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        self.log.append(("set_input_shape", name, tuple(shape)))
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.log.append(("execute_async_v3", stream))
        b = self.shapes["x_t"][0]
        x, c, t, eps = (self.by_ptr[self.addr[n]] for n in ("x_t", "cond", "t", "eps"))
        eps[:b] = 2 * x[:b] + c[:b] + t[:b, None, None, None]
        return True


def test_denoiser_pads_short_batches_to_the_profile_and_crops(monkeypatch):
    from condiff.engine.backends import trt_backend

    log = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=1234))
    engine = types.SimpleNamespace(create_execution_context=lambda: None)
    holder = {}
    engine.create_execution_context = lambda: holder.setdefault("ctx", _FakeContext({}, log))
    den = trt_backend.TrtDenoiser(engine, torch.device("cpu"), (1, 4, 4), {"min": 2, "opt": 4, "max": 8}, max_batch=6)
    holder["ctx"].by_ptr.update({buf.data_ptr(): buf for buf in den.buffers.values()})
    assert den.max_batch == 6 and den.precision == "fp16" and den.name == "trt"
    g = torch.Generator().manual_seed(0)
    for batch in (1, 5, 1):
        x, c = torch.randn(batch, 1, 4, 4, generator=g), torch.randn(batch, 1, 4, 4, generator=g)
        t = torch.arange(batch)
        eps = den.denoise(x, c, t)
        torch.testing.assert_close(eps, 2 * x + c + t[:, None, None, None].float(), rtol=0, atol=0)
    shapes = [e[2][0] for e in log if e[0] == "set_input_shape" and e[1] == "x_t"]
    assert shapes == [2, 5, 2]  # batch 1 padded to the profile minimum 2
    assert all(e[1] == 1234 for e in log if e[0] == "execute_async_v3")  # torch's current stream
    with pytest.raises(ValueError, match="exceeds max_batch"):
        den.denoise(torch.zeros(7, 1, 4, 4), torch.zeros(7, 1, 4, 4), torch.zeros(7, dtype=torch.int64))


def test_denoiser_refuses_max_batch_below_profile():
    from condiff.engine.backends import trt_backend

    engine = types.SimpleNamespace(create_execution_context=lambda: object())
    with pytest.raises(BackendUnavailableError, match="profile minimum"):
        trt_backend.TrtDenoiser(engine, torch.device("cpu"), (1, 4, 4), {"min": 4, "opt": 4, "max": 8}, max_batch=2)


@pytest.mark.parametrize("api", ["10.1+", "10.0"])
def test_members_share_one_activation_buffer(monkeypatch, calls, api):
    """Each member's context used to allocate activation memory for the profile's largest batch: ten
    members, ten copies, though they run one after another. With user-managed allocation they share one
    buffer per device; a plan that needs more gets a larger one, and the earlier contexts keep theirs."""
    from condiff.engine.backends import trt_backend

    trt = make_fake_tensorrt(calls)
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC="STATIC", USER_MANAGED="USER_MANAGED")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "_SHARED_ACTIVATIONS", trt_backend.weakref.WeakValueDictionary())

    class Context:
        def __init__(self, strategy):
            self.strategy, self.memory = strategy, None
            if api == "10.1+":
                self.set_device_memory = lambda ptr, size: setattr(self, "memory", (ptr, size))

        def __setattr__(self, name, value):
            if name == "device_memory":  # the 10.0 property
                name, value = "memory", (value, None)
            object.__setattr__(self, name, value)

    def engine(size):
        eng = types.SimpleNamespace(create_execution_context=lambda strategy="STATIC": Context(strategy))
        if api == "10.1+":
            eng.device_memory_size_v2 = size
        else:
            eng.device_memory_size = size
        return eng

    cpu = torch.device("cpu")
    dens = [trt_backend.TrtDenoiser(engine(size), cpu, (1, 4, 4), {"min": 1, "opt": 4, "max": 4}, max_batch=4)
            for size in (1000, 1000, 4000)]
    assert all(d.context.strategy == "USER_MANAGED" for d in dens)
    (p0, s0), (p1, s1), (p2, s2) = (d.context.memory for d in dens)
    assert p0 == p1 == dens[0].activations.data_ptr() and p2 == dens[2].activations.data_ptr() != p0
    assert dens[0].activations.numel() >= 1000 and dens[2].activations.numel() >= 4000
    if api == "10.1+":
        assert (s0, s1, s2) == (1000, 1000, 4000)
    # a fourth member of the first kind fits in the larger buffer: no new allocation
    d3 = trt_backend.TrtDenoiser(engine(1000), cpu, (1, 4, 4), {"min": 1, "opt": 4, "max": 4}, max_batch=4)
    assert d3.context.memory[0] == p2


def test_sidecar_json_is_canonical(tmp_path):
    folder = _plan_folder(tmp_path)
    text = (folder / "model.fp16.plan.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_denoiser_on_cuda_buffers_with_and_without_a_cuda_graph(cuda_graph):
    """The binding, padding and CUDA-graph capture logic on real CUDA tensors (the engine is a torch stand-in)."""
    from condiff.engine.backends import trt_backend

    log = []
    holder = {}
    engine = types.SimpleNamespace(create_execution_context=lambda: holder.setdefault("ctx", _FakeContext({}, log)))
    device = torch.device("cuda")
    den = trt_backend.TrtDenoiser(engine, device, (1, 8, 8), {"min": 1, "opt": 4, "max": 4}, max_batch=4,
                                  cuda_graph=cuda_graph)
    holder["ctx"].by_ptr.update({buf.data_ptr(): buf for buf in den.buffers.values()})
    g = torch.Generator().manual_seed(0)
    for batch in (3, 1, 4, 2):
        x, c = torch.randn(batch, 1, 8, 8, generator=g).to(device), torch.randn(batch, 1, 8, 8, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        eps = den.denoise(x, c, t)
        torch.testing.assert_close(eps, 2 * x + c + t[:, None, None, None].float(), rtol=0, atol=0)
    runs = [e for e in log if e[0] == "execute_async_v3"]
    # with a graph: one warm-up enqueue and one captured enqueue, then replays only
    assert len(runs) == (2 if cuda_graph else 4)
