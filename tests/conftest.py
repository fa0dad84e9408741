import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("CONDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fails_instead_of_hanging():
    """``with fails_instead_of_hanging(seconds):`` raises AssertionError when the block runs longer (SIGALRM
    interrupts a blocking open() of a FIFO), so a broken guard fails its test instead of stopping the suite."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard(seconds: int = 20):
        def hung(signum, frame):
            raise AssertionError(f"still running after {seconds} s: it would hang")

        before = signal.signal(signal.SIGALRM, hung)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, before)

    return guard


@pytest.fixture
def shared_data() -> Path:
    """The project's data kit (../shared/data); tests that need it skip where it is absent (whole, or
    the parts a test reads: a partial kit skips those tests instead of erroring)."""
    missing = [part for part in ("ixi-t1", "brats-tumour", "ms-lesion", "fundus") if not (SHARED_DATA / part).is_dir()]
    if missing:
        pytest.skip(f"data kit not found, or incomplete, at {SHARED_DATA} (missing {', '.join(missing)}; "
                    "set CONDIFF_SHARED_DATA)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
