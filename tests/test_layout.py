"""Packaging and dependency-direction checks (DESIGN.md §2)."""
import ast
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (pyproject: requires-python >= 3.10); the test extra installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["onnx", "onnxruntime", "tensorrt", "cupy", "ray", "diffusers", "nibabel", "PIL", "scipy", "skimage",
         "condiff.train", "condiff.export", "condiff.engine"]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    assert set(dirs) == listed
    for name, folder in dirs.items():
        assert (REPO / folder / "__init__.py").is_file(), f"{name} -> {folder} is not a package"
    for root in {"src/condiff", "train", "export", "engine", "examples"}:
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).as_posix()
            assert rel in dirs.values(), f"package folder {rel} missing from pyproject package-dir"


def test_import_condiff_is_light():
    code = ("import sys, condiff, condiff.config, condiff.errors, condiff.optional; "
            f"bad = [m for m in {HEAVY + ['torch']!r} if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_never_imports_subpackages_and_heavy_modules_are_lazy():
    for path in (REPO / "src/condiff").rglob("*.py"):
        if path.name == "cli.py":
            continue
        for name in _imports(path):
            assert not name.startswith(("condiff.train", "condiff.export", "condiff.engine")), (path, name)
        for name in _module_level_imports(path):
            assert name.split(".")[0] not in {"onnx", "onnxruntime", "tensorrt", "cupy", "ray", "diffusers"}, (path, name)


def test_train_and_export_do_not_import_each_other_or_the_engine():
    for folder, banned in [("train", ("condiff.export", "condiff.engine")), ("export", ("condiff.train", "condiff.engine"))]:
        for path in (REPO / folder).rglob("*.py"):
            for name in _imports(path):
                assert not name.startswith(banned), (path, name)
