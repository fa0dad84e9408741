"""ONNX export: ORT fp32 against torch eager (1e-4, DESIGN §5), dynamic batch, atomic failure, CLI."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from condiff import artifacts  # noqa: E402
from condiff.config import ModelConfig, preset  # noqa: E402
from condiff.errors import ExportError  # noqa: E402
from condiff.export import onnx_export  # noqa: E402
from condiff.export.onnx_export import export_onnx  # noqa: E402
from condiff.modelset import load_model, save_model, save_model_set  # noqa: E402
from condiff.unet import ConditionalUNet  # noqa: E402


def make_model(folder: Path, name: str = "tiny", size: int = 32, seed: int = 0) -> Path:
    """A model folder with seeded, perturbed weights (so zero-initialised biases are exercised)."""
    torch.manual_seed(seed)
    cfg = preset(name, sample_size=size)
    model = ConditionalUNet(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return save_model(folder, model, ModelConfig(unet=cfg))


def ort_vs_torch(model_dir: Path, batch: int, seed: int = 3) -> float:
    model, cfg = load_model(model_dir)
    g = torch.Generator().manual_seed(seed)
    c, s = cfg.image_channels, cfg.unet.sample_size
    x_t, cond = torch.randn(batch, c, s, s, generator=g), torch.rand(batch, c, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
    with torch.no_grad():
        ref = model(x_t, cond, t)
    assert eps.shape == tuple(ref.shape)
    return float((torch.from_numpy(eps) - ref).abs().max())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("attention", ["ort_mha", "chunked", "sdpa"])
def test_ort_matches_torch_for_each_attention_at_batch_1_and_3(tmp_path, attention):
    model_dir = make_model(tmp_path / "m")
    result = export_onnx(model_dir, attention=attention, chunk_size=48)  # 48 does not divide 256 tokens
    assert result.attention == attention and result.max_abs_diff <= 1e-4
    for batch in (1, 3):
        assert ort_vs_torch(model_dir, batch) <= 1e-4


def test_graph_contract_names_types_and_dynamic_batch(tiny_dir):
    import onnx

    export_onnx(tiny_dir)
    graph = onnx.load(str(tiny_dir / "model.onnx")).graph
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    got = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
           for i in list(graph.input) + list(graph.output)}
    assert got == {"x_t": (f32, ["batch", 1, 32, 32]), "cond": (f32, ["batch", 1, 32, 32]),
                   "t": (i64, ["batch"]), "eps": (f32, ["batch", 1, 32, 32])}
    ops = {n.op_type for n in graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops  # auto = ORT's fused operator
    for batch in (1, 2, 5):
        assert ort_vs_torch(tiny_dir, batch, seed=batch) <= 1e-4


def test_chunked_graph_has_no_full_score_tensor(tmp_path):
    import onnx

    model_dir = make_model(tmp_path / "m")
    export_onnx(model_dir, attention="chunked", chunk_size=64)
    model = onnx.load(str(model_dir / "model.onnx"))
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    # tiny at 32 px: 4 attention layers (down, mid, 2 up) at 16 px = 256 tokens -> 4 chunks of 64 rows each
    assert len(softmaxes) == 16
    # each layer splits its 256 queries into static 64-row chunks (the live scores are 64 x 256, not 256 x 256)
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    consts.update({i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer})
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == 4
    for node in splits:
        assert consts[node.input[1]].tolist() == [64, 64, 64, 64]


def test_small_preset_exports(tmp_path):
    # 64 px keeps the test quick; the attention layers (lowest level, 8 x 8 tokens here) and all
    # block types are the ones the 128-px model has
    model_dir = make_model(tmp_path / "small", "small", size=64)
    result = export_onnx(model_dir)
    assert result.max_abs_diff <= 1e-4
    assert ort_vs_torch(model_dir, 2) <= 1e-4


def test_sidecar_records_what_the_artifact_was_built_from(tiny_dir):
    export_onnx(tiny_dir, attention="chunked", chunk_size=100, opset=18)
    doc = json.loads((tiny_dir / "model.onnx.json").read_text())
    assert doc["schema"] == "condiff.artifact/1" and doc["kind"] == "onnx" and doc["artifact"] == "model.onnx"
    assert doc["weights_sha256"] == artifacts.file_sha256(tiny_dir / "model.safetensors")
    assert doc["artifact_sha256"] == artifacts.file_sha256(tiny_dir / "model.onnx")
    assert doc["opset"] == 18 and doc["precision"] == "fp32"
    assert doc["attention"] == {"variant": "chunked", "chunk_size": 100, "pad_head_dim": None}
    assert doc["batch_profile"] == {"dynamic": True} and doc["image_shape"] == [1, 32, 32]
    assert doc["check"]["max_abs_diff"] <= doc["check"]["atol"] == 1e-4
    artifacts.verify_model_artifact(tiny_dir)  # and it verifies


def test_failed_tolerance_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    model_dir = make_model(tmp_path / "m")
    monkeypatch.setattr(onnx_export, "max_abs_diff_vs_torch", lambda *a, **k: 0.5)
    with pytest.raises(ExportError, match="differs from torch by 0.5"):
        export_onnx(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_failed_reexport_keeps_the_previous_artifact_and_sidecar(tmp_path, monkeypatch):
    model_dir = make_model(tmp_path / "m")
    export_onnx(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    monkeypatch.setattr(onnx_export, "check_onnx", lambda path: (_ for _ in ()).throw(ExportError(path, "broken")))
    with pytest.raises(ExportError):
        export_onnx(model_dir, attention="chunked")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


@pytest.mark.parametrize("map_steps", [None, 0])
def test_nan_difference_is_a_failure(tmp_path, monkeypatch, map_steps):
    """A NaN Δeps (ONNX Runtime returned NaN) is refused by the tolerance check itself: the stand-in
    reports timings as the real comparison does, so nothing later (the map check's sizing) fails in
    its place, and the message names the NaN."""
    model_dir = make_model(tmp_path / "m")

    def nan_diff(*args, seconds=None, **kwargs):
        if seconds is not None:
            seconds.update(ort=0.01, torch=0.01)
        return float("nan")

    monkeypatch.setattr(onnx_export, "max_abs_diff_vs_torch", nan_diff)
    model, _ = load_model(model_dir)
    direct = tmp_path / "direct" / "model.onnx"
    direct.parent.mkdir()
    with pytest.raises(ExportError, match="differs from torch by nan"):
        onnx_export.write_checked_onnx(model, direct, variant="sdpa", map_steps=map_steps)
    assert list(direct.parent.iterdir()) == []  # neither the file nor its temporary
    with pytest.raises(ExportError, match="differs from torch by nan"):
        export_onnx(model_dir, map_steps=map_steps)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_ort_denoiser_returns_the_sessions_float32_output_bit_for_bit(tmp_path):
    """The sampler's ONNX Runtime denoiser hands on exactly what the session computed (float32, no
    rounding), for the graph users get (``auto`` attention)."""
    model, _ = load_model(make_model(tmp_path / "m"))
    path = tmp_path / "model.onnx"
    onnx_export.trace_to_onnx(model, path, variant=onnx_export.resolve_attention("auto"))
    session = onnx_export.ort_cpu_session(path, threads=1)
    g = torch.Generator().manual_seed(11)
    x_t, cond = torch.randn(3, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    t = torch.tensor([999, 500, 3])
    got = onnx_export.ort_denoiser(session)(x_t, cond, t)
    (want,) = session.run(["eps"], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == (3, 1, 32, 32)
    assert torch.equal(got, torch.from_numpy(want))
    assert not torch.equal(got, got.half().float())  # values a float16 cannot hold: a downcast would show


def test_cli_exports_every_member_of_a_set_into_output(tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    root = tmp_path / "set"
    members = [make_model(root / f"fold_{i}", seed=i) for i in range(2)]
    save_model_set(root, members)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(root), "-o", str(out), "--attention", "chunked"])
    assert result.exit_code == 0, result.output
    for i in range(2):
        assert (out / f"fold_{i}" / "model.onnx").is_file()
        assert artifacts.verify_model_artifact(out / f"fold_{i}")["attention"]["variant"] == "chunked"
    assert not (root / "fold_0" / "model.onnx").exists()  # the source set is untouched
    again = CliRunner().invoke(main, [str(root), "-o", str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_cli_imports_a_diffusers_folder_and_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from condiff.export.cli import main

    cfg = preset("tiny", sample_size=32)
    torch.manual_seed(5)
    ref = diffusers.UNet2DModel(**cfg.to_diffusers()).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    run = tmp_path / "run"
    ref.save_pretrained(run / "unet_ema")  # as the reference code saves its EMA UNet
    out = tmp_path / "imported"
    no_out = CliRunner().invoke(main, [str(run)])
    assert no_out.exit_code == 2 and "-o OUT" in no_out.output
    result = CliRunner().invoke(main, [str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    g = torch.Generator().manual_seed(8)
    x_t, cond = torch.randn(3, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    t = torch.tensor([0, 499, 999])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
    with torch.no_grad():
        expected = ref(torch.cat([x_t, cond], 1), t).sample
    assert float((torch.from_numpy(eps) - expected).abs().max()) <= 1e-4


def test_cli_refuses_pickle_only_diffusers_folder_without_the_flag(tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    src = tmp_path / "d"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (src / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    result = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--import-diffusers" in result.output


# ------------------------------------------------------------------------- full-size memory (slow)

_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    import numpy as np, onnxruntime as ort
    path, batch = sys.argv[1], int(sys.argv[2])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 128, 128), dtype=np.float32)
    c = rng.random((batch, 1, 128, 128), dtype=np.float32)
    t = np.full((batch,), 500, dtype=np.int64)
    start = time.perf_counter()
    (eps,) = session.run(["eps"], {"x_t": x, "cond": c, "t": t})
    assert eps.shape == x.shape and np.isfinite(eps).all()
    seconds = time.perf_counter() - start
    # VmHWM: this process's own high-water mark. ru_maxrss is kept across execve (Linux), so in a
    # child of a big process (pytest after an export) it reports the parent's size at spawn time.
    try:
        hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except OSError:  # no /proc (macOS: ru_maxrss is in bytes there)
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(hwm, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def _peak_rss(onnx_path: Path, batch: int) -> tuple[int, float]:
    """Peak resident bytes (VmHWM) of a fresh process that loads the ONNX and runs one batch."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(onnx_path), str(batch)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1])


@pytest.fixture(scope="module")
def full_size_exports(tmp_path_factory):
    """Exports of full-size (128 px) random-weight models, made once per (preset, attention)."""
    made = {}

    def get(name: str, attention: str) -> Path:
        if (name, attention) not in made:
            model_dir = make_model(tmp_path_factory.mktemp(f"{name}-{attention}") / name, name, size=128)
            result = export_onnx(model_dir, attention=attention)
            print(f"export {name} {attention}: max |d| {result.max_abs_diff:.2e}, {result.seconds:.0f} s")
            assert result.max_abs_diff <= 1e-4
            made[name, attention] = model_dir
        return made[name, attention]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name,batch,attention", [
    ("paper", 1, "auto"), ("paper", 2, "auto"), ("symmetric", 8, "auto"), ("paper", 1, "chunked")])
def test_full_size_runs_in_ort_cpu_under_4_gb(full_size_exports, name, batch, attention):
    """performance.md §2: a plain graph needs >= 32 GiB for one paper layer; the bounded ones must stay < 4 GB."""
    rss, seconds = _peak_rss(full_size_exports(name, attention) / "model.onnx", batch)
    print(f"{name} {attention} batch {batch}: peak RSS {rss / 2**30:.2f} GiB, {seconds:.1f} s")
    assert rss < 4 * 10**9


def test_largest_score_tensor_matches_performance_note():
    # performance.md §2: 16 GiB per image for the paper preset's 128-px layers, 2 GiB at 64 px
    assert onnx_export.largest_score_bytes(preset("paper")) == 16 * 2**30
    assert onnx_export.largest_score_bytes(preset("symmetric")) == 2 * 2**30


def test_unbounded_attention_refused_where_ort_cannot_hold_it(tmp_path):
    model_dir = make_model(tmp_path / "m", size=256)  # tiny at 256 px: 4 heads x 16384^2 scores = 4 GiB
    with pytest.raises(ExportError, match="4.0 GiB") as info:
        export_onnx(model_dir, attention="sdpa")
    assert "--attention auto or chunked" in str(info.value)
    assert not any(p.name.endswith(".tmp") or p.name.startswith("model.onnx") for p in model_dir.iterdir())


def test_an_import_given_a_preprocessing_contract_runs_in_condiff_infer(tmp_path):
    """Without --preprocessing an imported reference checkpoint cannot be used (condiff-infer needs the
    contract); with one taken from a condiff model folder it can, and a contract of another size is refused."""
    diffusers = pytest.importorskip("diffusers")
    import json

    from click.testing import CliRunner

    from condiff.export.cli import main

    cfg = preset("tiny", sample_size=32)
    torch.manual_seed(5)
    diffusers.UNet2DModel(**cfg.to_diffusers()).save_pretrained(tmp_path / "run" / "unet_ema")
    donor = Path(__file__).resolve().parents[2] / "examples" / "models" / "fold0"  # the bundled 32-px member
    contract = json.loads((donor / "config.json").read_text())["preprocessing"]
    res = CliRunner().invoke(main, [str(tmp_path / "run"), "-o", str(tmp_path / "bare"), "--attention", "sdpa"])
    assert res.exit_code == 0 and "without a preprocessing contract" in res.output, res.output
    res = CliRunner().invoke(main, [str(tmp_path / "run"), "-o", str(tmp_path / "imp"), "--attention", "sdpa",
                                    "--preprocessing", str(donor)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "imp" / "config.json").read_text())["preprocessing"] == contract
    from condiff.engine.cli import infer_main

    scan = donor.parents[1] / "scans" / "ixi132_t1.nii.gz"
    for folder, code, text in (("bare", 2, "preprocessing needs a 'modality'"), ("bare", 2, "--preprocessing FILE"),
                               ("imp", 0, "1 done")):
        run = CliRunner().invoke(infer_main, [str(scan), "-o", str(tmp_path / f"out-{folder}"), "--models",
                                              str(tmp_path / folder), "--steps", "1", "--no-progress"])
        assert run.exit_code == code and text in run.output + (run.stderr or ""), run.output
    (tmp_path / "big.json").write_text(json.dumps({**contract, "image_size": 64}))
    res = CliRunner().invoke(main, [str(tmp_path / "run"), "-o", str(tmp_path / "bad"), "--preprocessing",
                                    str(tmp_path / "big.json")])
    assert res.exit_code == 2 and "64-px" in res.output and "32-px" in res.output, res.output
    (tmp_path / "junk.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, [str(tmp_path / "run"), "-o", str(tmp_path / "bad2"), "--preprocessing",
                                    str(tmp_path / "junk.json")])
    assert res.exit_code == 2 and "no valid preprocessing contract" in res.output, res.output


@pytest.mark.parametrize("name, data", [("diffusion_pytorch_model.safetensors", b"\x00garbage" * 10),
                                        ("diffusion_pytorch_model.bin", b"garbage that is no pickle")])
def test_a_corrupt_diffusers_weight_file_is_named(tmp_path, name, data):
    diffusers = pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from condiff.export.cli import main

    src = tmp_path / "run" / "unet_ema"
    diffusers.UNet2DModel(**preset("tiny", sample_size=32).to_diffusers()).save_pretrained(src)
    for f in src.glob("diffusion_pytorch_model.*"):
        f.unlink()
    (src / name).write_bytes(data)
    res = CliRunner().invoke(main, [str(tmp_path / "run"), "-o", str(tmp_path / "o"), "--import-diffusers"])
    assert res.exit_code == 2 and f"{name}: cannot be read" in res.output and "Traceback" not in res.output, res.output


def test_exporting_a_set_to_a_new_folder_keeps_its_model_card(tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    root = tmp_path / "set"
    save_model_set(root, [make_model(root / "fold_0", seed=0)])
    (root / "README.md").write_text("# model card\nresearch use only\n")
    (root / "LICENSE-DATA.txt").write_text("terms of the training data\n")  # must travel with the weights
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(root), "-o", str(out), "--attention", "sdpa"])
    assert res.exit_code == 0, res.output
    assert (out / "README.md").read_text() == "# model card\nresearch use only\n"
    assert (out / "LICENSE-DATA.txt").read_text() == "terms of the training data\n"
    again = CliRunner().invoke(main, [str(root), "-o", str(out)])
    assert again.exit_code == 2 and f"condiff-export {out}" in again.output  # how to finish an interrupted one
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(main, [str(root), "-o", str(tmp_path / "afile" / "sub")])
    assert res.exit_code == 2 and "cannot create the output folder" in res.output and "Traceback" not in res.output, res.output


def test_a_model_set_in_a_non_utf8_folder_loads_and_exports_to_a_utf8_one(tmp_path):
    """safetensors opens UTF-8 paths only (the torch engine failed on such a set); export writes ONNX,
    which needs UTF-8 paths, so a non-UTF-8 -o is refused before any work, naming it."""
    import shutil

    from click.testing import CliRunner

    from condiff.export.cli import main

    source = make_model(tmp_path / "m")
    odd = tmp_path / b"set\xff".decode("utf-8", "surrogateescape")
    shutil.copytree(source, odd)
    model, _ = load_model(odd)
    reference, _ = load_model(source)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    bad_out = tmp_path / b"out\xfe".decode("utf-8", "surrogateescape")
    res = CliRunner().invoke(main, [str(odd), "-o", str(bad_out)])
    assert res.exit_code == 2 and "is not a UTF-8 path" in res.output and "give -o a UTF-8" in res.output
    assert not bad_out.exists()
    res = CliRunner().invoke(main, [str(odd), "-o", str(tmp_path / "ok"), "--map-check-steps", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ok" / "model.onnx").is_file()


def test_an_export_error_with_a_huge_message_is_cut(tmp_path, monkeypatch):
    """torch.onnx's argument TypeErrors print the whole traced graph (thousands of lines) into the error."""
    model_dir = make_model(tmp_path / "m")

    def huge(*args, **kw):
        raise TypeError("incompatible function arguments\n" + "graph line\n" * 5000)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", huge)
    with pytest.raises(ExportError) as info:
        export_onnx(model_dir)
    text = info.value.message
    assert "TypeError: incompatible function arguments" in text and len(text) < 1000
    assert "more characters; -v prints them" in text
