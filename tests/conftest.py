import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("CONDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REPO = Path(__file__).resolve().parents[1]


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
