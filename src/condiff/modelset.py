"""Model folders (config.json + model.safetensors) and model sets (set.json + members).

No pickle is ever loaded here: weights come only from safetensors. Loading checks the schema,
that every tensor has the configured shape, that nothing else is present and that every weight is
finite (a diverged training leaves NaN/Inf).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from condiff.config import ModelConfig
from condiff.errors import ModelFolderError, ModelSetError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SET_FILE = "set.json"
SET_SCHEMA = "condiff.modelset/1"
SET_SCHEMA_MAJOR = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_HINT = ("condiff loads only safetensors: pickled weights are never loaded on the inference path; "
               "import them explicitly with condiff-export --import-diffusers DIR -o OUT")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """``io.atomic``'s write: a temporary name of this process alone (pid + random, O_EXCL), never a fixed
    ``.NAME.tmp`` two writers could share."""
    from condiff.io.atomic import write_bytes_atomic

    write_bytes_atomic(path, data)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header written in sorted key order.

    The safetensors library stores the ``__metadata__`` map in a hash map whose order changes from
    process to process, so saving identical tensors twice gave different bytes (and a different
    model-set digest). Reordering keys does not change the header's length, and the data buffer
    and its offsets are untouched; trailing spaces keep the header's original (aligned) size."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for the library's compact header; never corrupt a file
        raise ValueError("safetensors header grew when canonicalised")
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]


def count_nonfinite(tensors) -> int:
    """NaN/Inf values in the floating-point tensors (``tensors``: an iterable, all on one device).

    Any NaN/Inf makes a sum non-finite, so one sum per tensor and one host sync settle the usual case
    (~15 ms for the paper preset's 72 M weights on one busy CPU thread, a few % of ``load_model``); the exact
    count runs only when that sum is not finite (finite weights so large that the sum overflows count 0)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors or bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum())):
        return 0
    return int(torch.stack([t.numel() - torch.isfinite(t).sum() for t in tensors]).sum())


NONFINITE_HINT = ("retrain with a lower learning rate (condiff-train --lr), or make the model from an earlier "
                  "checkpoint of the training")


def save_model(model_dir: str | Path, model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32, or float16 for a shipped set)."""
    from safetensors.torch import save as st_save

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"format": "pt", "schema": "condiff.model/1"})
    _write_atomic(model_dir / WEIGHTS, canonical_safetensors(blob))
    _write_atomic(model_dir / CONFIG, (json.dumps(config.to_dict(), indent=1, sort_keys=True) + "\n").encode())
    return model_dir


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / CONFIG
    if not path.is_file():
        raise ModelFolderError(model_dir, f"no {CONFIG}; not a condiff model folder")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except OSError as exc:
        raise ModelFolderError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFolderError(path, f"invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelFolderError(path, f"is not a JSON object (found {_json_type(raw)})")
    return ModelConfig.from_dict(raw, str(path))


def _refuse_constant(name: str):
    """json.loads accepts NaN and Infinity, which are not JSON: a config holding one is refused."""
    raise ValueError(f"{name} is not a JSON number")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. safetensors opens UTF-8 paths only, while a Linux folder name may be
    any bytes: such a file is read whole instead of mapped."""
    from safetensors.torch import load, load_file

    from condiff.io.atomic import is_utf8_path

    return load_file(str(path)) if is_utf8_path(path) else load(Path(path).read_bytes())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """Build the UNet from ``config.json`` and load ``model.safetensors`` strictly, in float32."""
    from safetensors import SafetensorError

    from condiff.unet import ConditionalUNet

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = PICKLE_HINT if pickles else None
        raise ModelFolderError(model_dir, f"no {WEIGHTS} (found {pickles or 'nothing'})", hint)
    try:
        state = load_safetensors(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFolderError(weights, f"unreadable safetensors file ({exc})") from exc
    except MemoryError as exc:  # mmap refused under an address-space limit (ulimit -v, SLURM)
        raise ModelFolderError(weights, f"cannot be mapped into memory ({exc})",
                               "raise the job's memory limit, or check the file's tensor sizes") from exc
    # integer, bool or fp8 tensors would be cast to float and run as wrong weights, silently
    odd = sorted((k, str(v.dtype).replace("torch.", "")) for k, v in state.items() if v.dtype not in WEIGHT_DTYPES)
    if odd:
        raise ModelFolderError(weights, f"tensor {odd[0][0]} is stored as {odd[0][1]}"
                               + (f" (and {len(odd) - 1} more)" if len(odd) > 1 else "")
                               + ": weights must be float16, bfloat16, float32 or float64")
    model = ConditionalUNet(config.unet)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFolderError(weights, f"weights do not match config.json: missing {missing[:5]}"
                               f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                               f"{'...' if len(extra) > 5 else ''}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFolderError(weights, f"tensor {name} has shape {tuple(tensor.shape)}, "
                                   f"config.json implies {tuple(expected[name].shape)}")
    bad = count_nonfinite(state.values())  # a diverged training is named here, not as a scan's non-finite output
    if bad:
        raise ModelFolderError(weights, f"holds {bad} non-finite weights (NaN/Inf): the training diverged",
                               NONFINITE_HINT)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval(), config


@dataclass
class ModelSet:
    """An ensemble: member folders in order, their configs, and the set's digest."""

    root: Path
    member_dirs: list[Path]
    configs: list[ModelConfig]
    digest: str

    @property
    def image_channels(self) -> int:
        return self.configs[0].image_channels

    @functools.cached_property
    def network_digest(self) -> str:
        """A digest of the members' network configurations (config.json's ``unet``), which the set digest
        (set.json's bytes, holding the weights' digests) does not cover: a config edited in place changes
        the network the same weights make, so results made before are not current. Computed once (every
        case's resume check asks; the configs are read once, when the set is opened)."""
        doc = json.dumps([c.unet.to_dict() for c in self.configs], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    @property
    def image_size(self) -> int:
        return self.configs[0].unet.sample_size

    @property
    def preprocessing(self) -> dict:
        return self.configs[0].preprocessing

    def __len__(self) -> int:
        return len(self.member_dirs)


def save_model_set(set_dir: str | Path, member_dirs: list[str | Path], name: str = "condiff model set",
                   extra: dict | None = None) -> Path:
    """Write ``set.json`` listing member folders (relative to ``set_dir``) with their weight digests."""
    set_dir = Path(set_dir)
    members = []
    for d in member_dirs:
        d = Path(d)
        rel = d.resolve().relative_to(set_dir.resolve()).as_posix()
        members.append({"path": rel, "sha256": sha256_file(d / WEIGHTS)})
    doc = {"schema": SET_SCHEMA, "name": name, "members": members, **(extra or {})}
    _write_atomic(set_dir / SET_FILE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return set_dir


def _pickle_files(model_dir: Path) -> list[Path]:
    """Pickle-format weight files (``*.pt``, ``*.bin``, ...) at the top level of a model folder."""
    try:
        return sorted(p for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    except OSError:
        return []


def _refuse_pickles(model_dir: Path) -> None:
    pickles = _pickle_files(model_dir)
    if pickles:
        raise ModelSetError(pickles[0], "pickle-format weight file in a model folder"
                            + (f" (also {', '.join(p.name for p in pickles[1:])})" if len(pickles) > 1 else ""),
                            f"{PICKLE_HINT}; if {WEIGHTS} already holds these weights, delete the pickle file")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_set_schema(set_file: Path, schema: object) -> None:
    """``condiff.modelset/<major>`` or ``condiff.modelset/<major>.<minor>``: any minor of our major."""
    prefix = SET_SCHEMA.split("/", 1)[0] + "/"
    if not isinstance(schema, str) or not schema.startswith(prefix):
        raise ModelSetError(set_file, f"{SET_FILE} has no condiff model-set schema (found {schema!r})",
                            f"this condiff reads {SET_SCHEMA}")
    parts = schema[len(prefix):].split(".")
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ModelSetError(set_file, f"unreadable schema version {schema!r}",
                            f"expected {prefix}<major> or {prefix}<major>.<minor>; this condiff reads {SET_SCHEMA}")
    major = int(parts[0])
    if major != SET_SCHEMA_MAJOR:
        hint = (f"written by a newer condiff; upgrade condiff to a release that reads {prefix}{major}"
                if major > SET_SCHEMA_MAJOR else f"use a condiff release that reads {prefix}{major}")
        raise ModelSetError(set_file, f"schema {schema} is not supported by this condiff (reads {SET_SCHEMA})", hint)


def open_model_set(path: str | Path, verify: bool = True) -> ModelSet:
    """A model set folder (with set.json) or a single model folder (a set of one).

    Every problem with the set is a ``ModelSetError`` (or ``ModelFolderError`` from a member's
    config.json), never a bare KeyError or AttributeError; pickle-format weight files in a model
    folder are refused even beside model.safetensors."""
    path = Path(path)
    if not path.exists():
        raise ModelSetError(path, "does not exist")
    set_file = path / SET_FILE
    if not set_file.is_file():
        if (path / CONFIG).is_file():
            cfg = read_config(path)
            try:
                _refuse_pickles(path)
                digest = hashlib.sha256(sha256_file(path / WEIGHTS).encode()).hexdigest() if (path / WEIGHTS).is_file() else ""
            except OSError as exc:
                raise ModelSetError(exc.filename or path, f"cannot be read ({exc.strerror or exc})") from exc
            return ModelSet(path, [path], [cfg], digest)
        raise ModelSetError(path, f"neither a model set ({SET_FILE}) nor a model folder ({CONFIG})")
    try:
        raw_bytes = set_file.read_bytes()
    except OSError as exc:
        raise ModelSetError(set_file, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        doc = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSetError(set_file, f"invalid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ModelSetError(set_file, f"is not a JSON object (found {_json_type(doc)})",
                            f'a model set is {{"schema": "{SET_SCHEMA}", "members": [{{"path": ..., "sha256": ...}}, ...]}}')
    _check_set_schema(set_file, doc.get("schema"))
    members = doc.get("members")
    if members is not None and not isinstance(members, list):
        raise ModelSetError(set_file, f'"members" is not a list (found {_json_type(members)})')
    if not members:
        raise ModelSetError(set_file, "lists no members")
    for k, m in enumerate(members, 1):
        if not isinstance(m, dict):
            raise ModelSetError(set_file, f"member {k} is not an object (found {_json_type(m)})")
        if "path" not in m:
            raise ModelSetError(set_file, f'member {k} has no "path"')
        if not isinstance(m["path"], str):
            raise ModelSetError(set_file, f'member {k} has a "path" that is not a string (found {m["path"]!r})')
        if "\x00" in m["path"] or not m["path"].strip():
            raise ModelSetError(set_file, f'member {k} has an unusable "path" ({m["path"]!r})')
        parts = PurePosixPath(m["path"].replace("\\", "/")).parts
        if PurePosixPath(m["path"]).is_absolute() or PureWindowsPath(m["path"]).drive or ".." in parts:
            # a member outside the set folder: condiff-export would write its copy there too
            raise ModelSetError(set_file, f'member {k}\'s "path" {m["path"]!r} leaves the set folder',
                                "members are folders inside it, named by relative paths without '..'")
    seen: dict[str, int] = {}
    for k, m in enumerate(members, 1):
        real = os.path.realpath(path / m["path"])
        if real in seen:  # one network listed twice would count as two ensemble members
            raise ModelSetError(set_file, f"member {k} ({m['path']!r}) is the same folder as member {seen[real]}",
                                "list each member once")
        seen[real] = k
    dirs, configs = [], []
    for m in members:
        d = path / m["path"]
        try:
            _refuse_pickles(d)
            actual = sha256_file(d / WEIGHTS) if verify and (d / WEIGHTS).is_file() else None
        except OSError as exc:  # a folder or weights file without read permission
            raise ModelSetError(exc.filename or d, f"cannot be read ({exc.strerror or exc})") from exc
        if verify and actual != m.get("sha256"):
            raise ModelSetError(d / WEIGHTS, "weights digest does not match set.json"
                                if actual else "member weights are missing",
                                "the model set was modified; rebuild set.json or restore the files")
        configs.append(read_config(d))
        dirs.append(d)
    first = configs[0]
    for d, c in zip(dirs[1:], configs[1:]):
        if c.image_channels != first.image_channels or c.unet.sample_size != first.unet.sample_size:
            raise ModelSetError(d, f"member has {c.image_channels} channels at {c.unet.sample_size} px; "
                                f"the first member has {first.image_channels} at {first.unet.sample_size}")
        if c.preprocessing != first.preprocessing:
            raise ModelSetError(d, "member's preprocessing differs from the first member's")
        if c.schedule != first.schedule:
            raise ModelSetError(d, "member's noise schedule differs from the first member's")
    return ModelSet(path, dirs, configs, hashlib.sha256(raw_bytes).hexdigest())
