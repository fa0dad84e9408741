"""The ``ort`` backend: torch parity (1e-4), stale artifacts refused, no silent provider fallback."""
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from condiff.config import ModelConfig, preset  # noqa: E402
from condiff.engine.backends import open_denoiser  # noqa: E402
from condiff.engine.backends import ort_backend  # noqa: E402
from condiff.engine.backends.ort_backend import open_ort  # noqa: E402
from condiff.engine.protocol import Denoiser  # noqa: E402
from condiff.errors import ArtifactError, BackendUnavailableError  # noqa: E402
from condiff.export.onnx_export import export_onnx  # noqa: E402
from condiff.modelset import load_model, save_model  # noqa: E402
from condiff.unet import ConditionalUNet  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", sample_size=32)
    model = ConditionalUNet(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    folder = save_model(tmp_path_factory.mktemp("ort") / "m", model, ModelConfig(unet=cfg))
    export_onnx(folder)
    return folder


def test_denoise_matches_torch_at_batch_1_and_3(exported):
    den = open_ort(exported, threads=2)
    assert isinstance(den, Denoiser) and den.name == "ort" and den.device == torch.device("cpu")
    assert den.provider == "CPUExecutionProvider"
    model, _ = load_model(exported)
    g = torch.Generator().manual_seed(4)
    for batch in (1, 3):
        x_t, cond = torch.randn(batch, 1, 32, 32, generator=g), torch.rand(batch, 1, 32, 32, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = den.denoise(x_t, cond, t)
        assert eps.dtype == torch.float32 and eps.shape == x_t.shape
        with torch.no_grad():
            torch.testing.assert_close(eps, model(x_t, cond, t), rtol=0, atol=1e-4)


def test_session_settings(exported):
    den = open_ort(exported, threads=1)
    opts = den.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_registry_opens_ort(exported):
    den = open_denoiser("ort", exported, device="cpu", precision="fp32", max_batch=4)
    assert den.max_batch == 4 and den.precision == "fp32"


def test_stale_onnx_refused_with_rebuild_command(exported, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    model, config = load_model(folder)
    with torch.no_grad():
        model.conv_out.bias.add_(1.0)  # retrained weights, old ONNX
    save_model(folder, model, config)
    with pytest.raises(ArtifactError) as info:
        open_ort(folder)
    assert "stale" in str(info.value)
    assert f"condiff-export {shlex.quote(str(folder))}" in str(info.value)


def test_missing_onnx_refused_with_build_command(tmp_path, exported):
    import shutil

    folder = tmp_path / "no-onnx"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(exported / name, folder / name)
    with pytest.raises(ArtifactError, match="does not exist") as info:
        open_ort(folder)
    assert f"build it with: condiff-export {shlex.quote(str(folder))}" in str(info.value)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
@pytest.mark.parametrize("options", [{"provider": "cuda"}, {"device": "cuda"}, {"provider": "tensorrt"}])
def test_requested_gpu_provider_on_cpu_only_ort_is_an_error(exported, options):
    with pytest.raises(BackendUnavailableError, match="not available") as info:
        open_ort(exported, **options)
    assert "condiff[gpu]" in str(info.value)


def test_silent_provider_fallback_is_caught(exported, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries creates a CPU-only session; that must be an error."""
    real_session = ort.InferenceSession

    def cpu_only_session(path, options, providers):
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", cpu_only_session)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendUnavailableError, match="did not load CUDAExecutionProvider"):
        open_ort(exported, device="cuda")


def test_bad_requests(exported):
    with pytest.raises(BackendUnavailableError, match="fp32"):
        open_ort(exported, precision="fp16")
    with pytest.raises(BackendUnavailableError, match="unknown ONNX Runtime provider"):
        open_ort(exported, provider="rocm-ish")
    with pytest.raises(BackendUnavailableError, match="does not run on device"):
        open_ort(exported, device="cpu", provider="cuda")


def test_provider_lists():
    cpu = torch.device("cpu")
    gpu = torch.device("cuda:1")
    assert ort_backend._session_providers("CPUExecutionProvider", cpu, "fp32", Path(".")) == ["CPUExecutionProvider"]
    cuda = ort_backend._session_providers("CUDAExecutionProvider", gpu, "fp32", Path("."))
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 1})
    trt = ort_backend._session_providers("TensorrtExecutionProvider", gpu, "fp16", Path("m"))
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[0][1]["trt_fp16_enable"] is True


def test_tensorrt_provider_cache_follows_the_graph_and_profile_spans_the_batch():
    """ORT's TensorRT provider names cached engines by graph/input names and versions, not weights: a
    re-export of retrained weights reloaded the old engine from the one shared folder. The cache folder
    is now per ONNX digest; and an explicit profile over batch 1..max_batch stops mid-run rebuilds."""
    gpu = torch.device("cuda:0")
    old = {"artifact_sha256": "a" * 64, "image_shape": [1, 128, 128]}
    new = {"artifact_sha256": "b" * 64, "image_shape": [1, 128, 128]}
    (_, o_old), (_, o_new) = (ort_backend._session_providers("TensorrtExecutionProvider", gpu, "fp16", Path("m"),
                                                             sc, 32)[0] for sc in (old, new))
    assert o_old["trt_engine_cache_path"] != o_new["trt_engine_cache_path"]
    assert Path(o_new["trt_engine_cache_path"]).parent == Path("m") / "ort-trt-cache"
    assert o_new["trt_profile_min_shapes"] == "x_t:1x1x128x128,cond:1x1x128x128,t:1"
    assert o_new["trt_profile_opt_shapes"] == o_new["trt_profile_max_shapes"] == "x_t:32x1x128x128,cond:32x1x128x128,t:32"


def test_infer_engine_ort_maps_equal_engine_torch_on_real_slices(tmp_path, monkeypatch):
    """condiff-infer --engine ort vs --engine torch on a real T1 slab (bundled IXI sample), same seeds;
    the ort run must really go through ONNX Runtime (a mix-up that ran torch twice passed before)."""
    import nibabel as nib
    from click.testing import CliRunner

    from _infer_helpers import make_model_set, one_torch_thread
    from condiff.engine.cli import infer_main
    from condiff.export.onnx_export import export_onnx
    from condiff.modelset import open_model_set

    scan = REPO / "examples" / "scans" / "ixi132_t1.nii.gz"
    models = make_model_set(tmp_path / "set", n_members=2,
                            preprocessing={"modality": "mri", "image_size": 32, "fov_mm": 192.0,
                                           "normalisation": "percentile", "use_mask": True})
    for member in open_model_set(models).member_dirs:
        export_onnx(member)
    ort_calls = []
    real_denoise = ort_backend.OrtDenoiser.denoise

    def counting(self, *a, **kw):
        ort_calls.append(1)
        return real_denoise(self, *a, **kw)

    monkeypatch.setattr(ort_backend.OrtDenoiser, "denoise", counting)
    maps, n_calls = {}, {}
    with one_torch_thread():
        for engine in ("torch", "ort"):
            out = tmp_path / engine
            res = CliRunner().invoke(infer_main, [str(scan), "-o", str(out), "--models", str(models), "--engine", engine,
                                                  "--sampler", "ddpm", "--steps", "5", "--device", "cpu", "--no-progress"],
                                     catch_exceptions=False)
            assert res.exit_code == 0, res.output
            maps[engine] = np.asarray(nib.load(str(out / "maps" / "ixi132_t1.nii.gz")).get_fdata())
            n_calls[engine] = len(ort_calls)
    assert n_calls["torch"] == 0 and n_calls["ort"] >= 2 * 5  # two members, five steps each
    diff = np.abs(maps["ort"] - maps["torch"]).max()
    assert maps["torch"].max() > 0
    assert diff <= 1e-4, diff


def test_a_non_utf8_folder_is_a_message_naming_it_not_a_type_error(exported, tmp_path):
    """ONNX Runtime takes UTF-8 paths only; a Linux folder name may be any bytes (a TypeError before)."""
    import shutil

    odd = tmp_path / b"set\xff".decode("utf-8", "surrogateescape")
    shutil.copytree(exported, odd)
    with pytest.raises(BackendUnavailableError, match="not a UTF-8 path, which ONNX Runtime cannot open") as info:
        open_ort(odd, threads=1)
    assert info.value.path == str(odd / "model.onnx") and "--engine torch" in info.value.message
