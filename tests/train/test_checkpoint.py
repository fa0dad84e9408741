"""Checkpoints: exact round trip, split parts with SHA-256 manifest, atomic writes, RNG and optimiser state."""
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from condiff.train import checkpoint as ckpt


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(64, 33, generator=g), "model/b": torch.randn(7, generator=g).double(),
            "rng/torch_cpu": torch.get_rng_state(), "ema/w": torch.randn(64, 33, generator=g).half(),
            "count": torch.arange(5)}


def _state():
    return {"step": 12, "val": {"ma": 0.25, "best": None}, "nested": [1, 2.5, "x"]}


@pytest.mark.parametrize("part_bytes", [None, 1000])
def test_round_trip_is_exact(tmp_path, part_bytes):
    tensors = _tensors()
    path = ckpt.save_checkpoint(tmp_path, 12, tensors, _state(), part_bytes=part_bytes)
    assert path.name == "checkpoint-000000012"
    c = ckpt.load_checkpoint(path)
    assert c.step == 12 and c.state == _state()
    assert c.tensors.keys() == tensors.keys()
    for k, v in tensors.items():
        assert c.tensors[k].dtype == v.dtype and torch.equal(c.tensors[k], v)
    manifest = json.loads((path / "manifest.json").read_text())
    parts = manifest["tensors"]["parts"]
    if part_bytes is None:
        assert parts == ["tensors.safetensors"]
    else:
        assert len(parts) > 5
        sizes = [(path / p).stat().st_size for p in parts]
        assert max(sizes) <= part_bytes and sum(sizes) == manifest["tensors"]["bytes"]
        whole = b"".join((path / p).read_bytes() for p in parts)
        assert hashlib.sha256(whole).hexdigest() == manifest["tensors"]["sha256"]
    for entry in manifest["files"]:  # every file's digest is in the manifest
        assert hashlib.sha256((path / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]


def test_corrupt_or_missing_part_is_refused_naming_the_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _tensors(), _state(), part_bytes=4096)
    part = path / "tensors.safetensors.part001"
    raw = bytearray(part.read_bytes())
    raw[10] ^= 0xFF
    part.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="part001.*SHA-256"):
        ckpt.load_checkpoint(path)
    part.unlink()
    with pytest.raises(ckpt.CheckpointError, match="part001.*missing"):
        ckpt.load_checkpoint(path)


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _tensors(0), {"v": 1})
    calls = {"n": 0}
    real = ckpt._write_file

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _tensors(1), {"v": 2})
    monkeypatch.setattr(ckpt, "_write_file", real)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000000001"]
    # replacing an existing step keeps the folder complete and holds the new content
    ckpt.save_checkpoint(tmp_path, 1, _tensors(5), {"v": 5})
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-000000001").state == {"v": 5}


def test_a_crash_while_replacing_a_step_never_destroys_its_previous_checkpoint(tmp_path, monkeypatch):
    """Re-saving an existing step (a resumed run checkpointing the step it resumed from) and failing as
    the new folder is moved into place: the previous checkpoint's files must survive intact and load,
    and nothing under a checkpoint name may be incomplete. The previous checkpoint is back under its own
    name (it used to stay under a hidden '.old' name that resume never looked at), and one a killed
    save left aside is put back when the checkpoints are next listed."""
    from pathlib import Path

    first = ckpt.save_checkpoint(tmp_path, 7, _tensors(0), {"v": 1})
    real_rename = Path.rename
    failed = []

    def rename(self, target):
        if Path(target).name == first.name and self.name.endswith(".tmp") and not failed:
            failed.append(self)
            raise OSError("simulated crash moving the new checkpoint into place")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(tmp_path, 7, _tensors(1), {"v": 2})
    monkeypatch.undo()
    assert failed  # the fault was injected where meant
    for _, path in ckpt.list_checkpoints(tmp_path):  # a listed checkpoint is always a complete one
        ckpt.load_checkpoint(path)
    loadable = []
    for path in sorted(tmp_path.iterdir()):
        if path.is_dir() and (path / "manifest.json").is_file():
            loadable.append(ckpt.load_checkpoint(path))
    assert [c.state for c in loadable] == [{"v": 1}], sorted(p.name for p in tmp_path.iterdir())
    assert loadable[0].step == 7
    for k, v in _tensors(0).items():
        if not k.startswith("rng/"):
            assert torch.equal(loadable[0].tensors[k], v), k
    assert ckpt.latest_checkpoint(tmp_path) == first and ckpt.load_checkpoint(first).state == {"v": 1}
    # a save killed between its two renames (SIGKILL: no except clause runs) left the old one aside
    first.rename(tmp_path / f".{first.name}.12345.old")
    assert ckpt.latest_checkpoint(tmp_path) == first and ckpt.load_checkpoint(first).state == {"v": 1}
    # killed after placing the new one but before deleting the old: the old copy is garbage, pruned
    ckpt.save_checkpoint(tmp_path / "spare", 7, _tensors(0), {"v": 1}).rename(tmp_path / f".{first.name}.12345.old")
    ckpt.prune_checkpoints(tmp_path, keep=5)
    assert not list(tmp_path.glob(".checkpoint-*.old")) and ckpt.load_checkpoint(first).state == {"v": 1}


def test_incomplete_folder_is_ignored_and_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.zeros(1)}, {})
    (tmp_path / "checkpoint-000000009").mkdir()  # no manifest: an interrupted copy
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-000000004"
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-000000009")
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_rng_states_round_trip_through_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    tensors, meta = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, 0, tensors, {"rng": meta})
    expected = (random.random(), np.random.random(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    c = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(c.tensors, c.state["rng"])
    got = (random.random(), np.random.random(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    def make():
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        return lin, torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)

    def step(lin, opt, i):
        x = torch.arange(8.0).view(2, 4) + i
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        opt.step()

    lin_a, opt_a = make()
    for i in range(3):
        step(lin_a, opt_a, i)
    t, meta = ckpt.optimizer_to_flat(opt_a)
    t.update({f"p/{k}": v for k, v in lin_a.state_dict().items()})
    c = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 3, t, {"optim": meta}))
    lin_b, opt_b = make()
    lin_b.load_state_dict({k[2:]: v for k, v in c.tensors.items() if k.startswith("p/")})
    ckpt.optimizer_from_flat(opt_b, c.tensors, c.state["optim"])
    for i in range(3, 6):
        step(lin_a, opt_a, i)
        step(lin_b, opt_b, i)
    for a, b in zip(lin_a.parameters(), lin_b.parameters()):
        assert torch.equal(a, b)


def test_a_full_disk_while_writing_a_checkpoint_file_names_it():
    """Writes to a full disk raise ENOSPC without a file name; the run's message must say which file."""
    import errno
    import os
    from pathlib import Path

    from condiff.train import checkpoint as ckpt

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux), which fails every write with ENOSPC")
    with pytest.raises(OSError) as err:
        ckpt._write_file(Path("/dev/full"), b"x" * 70000)
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/dev/full"
