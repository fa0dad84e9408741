"""--fast-kernels: plumbing from the CLI to the fast engine, and condiff without Triton (CPU, no kernels run)."""
import subprocess
import sys

import pytest
import torch

from condiff.engine.plan import RunOptions
from condiff.errors import BackendUnavailableError

from _infer_helpers import FAST, invoke_infer, make_model_set, make_scans


def test_condiff_and_the_fast_engine_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now raises ImportError
        "import condiff, condiff.unet, condiff.engine.graphs, condiff.engine.kernels as k\n"
        "from condiff.config import preset\n"
        "from condiff.errors import BackendUnavailableError\n"
        "try:\n"
        "    k.use_triton_kernels(condiff.unet.ConditionalUNet(preset('tiny', 1, sample_size=16)))\n"
        "except BackendUnavailableError as exc:\n"
        "    print('refused:', exc.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused:" in out and "triton" in out and "--fast-kernels torch" in out


def test_options_digest_unchanged_at_the_default():
    """Records written before --fast-kernels existed stay current; a triton run gets its own digest."""
    assert "fast_kernels" not in RunOptions().to_dict()
    assert RunOptions(fast_kernels="triton").to_dict()["fast_kernels"] == "triton"
    assert RunOptions(fast_kernels="triton").digest() != RunOptions().digest()


def test_fast_engine_refuses_unknown_kernels_and_the_cpu():
    import torch

    from condiff.config import preset
    from condiff.engine.graphs import GraphDenoiser
    from condiff.unet import ConditionalUNet

    model = ConditionalUNet(preset("tiny", 1, sample_size=16))
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        GraphDenoiser(model, torch.device("cpu"), kernels="triton")
    if torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="kernels"):
            GraphDenoiser(model, torch.device("cuda"), kernels="cutlass")


def test_cli_help_and_misuse(tmp_path):
    res = invoke_infer(["--help"])
    assert res.exit_code == 0 and "--fast-kernels" in res.output and "compile: never run on a GPU" in " ".join(res.output.split())
    models = make_model_set(tmp_path / "set", n_members=1)
    make_scans(tmp_path / "in", n=1)
    res = invoke_infer([tmp_path / "in", "-o", tmp_path / "out", "--models", models, *FAST,
                        "--fast-kernels", "triton"])
    assert res.exit_code == 2 and "--fast-kernels triton applies only to the fast engine" in res.stderr
    assert not (tmp_path / "out" / "records").exists()


@pytest.mark.slow
def test_compiled_network_equals_eager_on_cpu():
    """--fast-kernels compile: inductor's fused network computes what the eager one does (CPU build here;
    the GPU test in tests/engine/test_graphs.py checks it inside the captured loop)."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    from condiff.config import preset
    from condiff.engine.kernels import compile_model
    from condiff.unet import ConditionalUNet

    torch.manual_seed(0)
    model = ConditionalUNet(preset("tiny", 1, sample_size=32)).eval()
    compiled = compile_model(model)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        want = model(x, c, t)
        got = compiled(x, c, t)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
