"""torchrun with 2 CPU processes (gloo): DDP's averaged gradient equals the single-process gradient on
the concatenated batch, and a couple of training steps run with the ranks in lock step.

This file is also the worker script: ``torchrun ... test_ddp.py OUT`` runs ``_worker(OUT)`` per rank.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from _train_helpers import phantoms

SIZE = 32
PER_RANK = 2





def _trainer(work, batch_size, dist_info=None):
    from condiff.config import preset
    from condiff.train.data import TaskSamples
    from condiff.train.distributed import DistInfo
    from condiff.train.loop import TrainConfig, Trainer
    from condiff.train.tasks import ArrayPool, RestorationTask
    from condiff.unet import ConditionalUNet

    images = phantoms(n=10)
    task = RestorationTask([2, 3, 4], same_pool=ArrayPool(images), has_background=True)
    torch.manual_seed(0)
    model = ConditionalUNet(preset("tiny", 1, SIZE))
    cfg = TrainConfig(batch_size=batch_size, max_steps=2, checkpoint_every=0, log_every=1, val_start=10**9, seed=7)
    return Trainer(model, cfg, TaskSamples(images, task, seed=7), work, dist_info=dist_info or DistInfo())


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from condiff.train.distributed import init_distributed

    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    assert info.world_size == 2 and dist.get_backend() == "gloo"
    tr = _trainer(out / "work", PER_RANK, info)
    tr.forward_backward(tr.batch_at(0))  # DDP all-reduces (averages) the gradients here
    save_file({n: p.grad.contiguous() for n, p in tr.model.named_parameters()}, str(out / f"grad{info.rank}.safetensors"))
    result = tr.fit()
    save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()}, str(out / f"model{info.rank}.safetensors"))
    (out / f"steps{info.rank}").write_text(f"{result.steps} {result.reason}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_average_gradients_like_one_process(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "steps0").read_text() == "2 max_steps" == (tmp_path / "steps1").read_text()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _trainer(tmp_path / "single", 2 * PER_RANK)
        single.forward_backward(single.batch_at(0))  # the concatenation of both ranks' batches
    finally:
        torch.set_num_threads(before)
    g0, g1 = load_file(str(tmp_path / "grad0.safetensors")), load_file(str(tmp_path / "grad1.safetensors"))
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)  # every rank holds the same average
    single_g = {n: p.grad for n, p in single.model.named_parameters()}
    diff = torch.cat([(g0[n] - single_g[n]).flatten() for n in single_g])
    norm = float(torch.cat([g.flatten() for g in single_g.values()]).norm())  # the norm that clipping sees
    # Within 1e-6 of the global gradient norm, element by element. Bit equality is impossible in float32:
    # one batch of 4 and two batches of 2 sum the same terms in another order (measured: max 1.2e-6 on
    # conv_out.weight, whose gradient sums 4096 terms, at a global norm of ~5).
    assert float(diff.abs().max()) <= 1e-6 * max(1.0, norm), (float(diff.abs().max()), norm)
    assert float(diff.norm()) <= 1e-6 * norm
    assert any(float(p.grad.abs().max()) > 1e-3 for p in single.model.parameters())  # not trivially zero

    m0, m1 = load_file(str(tmp_path / "model0.safetensors")), load_file(str(tmp_path / "model1.safetensors"))
    assert all(torch.equal(m0[k], m1[k]) for k in m0)  # ranks stay in lock step
    start = {k: v for k, v in _trainer(tmp_path / "fresh", PER_RANK).model.state_dict().items()}
    assert any(not torch.equal(m0[k], start[k]) for k in m0)  # and they did train
    lines = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"kind": "train"' in x]) == 2  # rank 0 alone writes the log
    assert (tmp_path / "work" / "checkpoints" / "checkpoint-000000002" / "manifest.json").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
