"""Native TensorRT backend: ``model.fp16.plan`` run on torch CUDA tensors.

Shaped like NVIDIA's demo/Diffusion ``Engine`` (STYLE §5): preallocated, named I/O buffers
bound by address (``set_tensor_address``), ``set_input_shape`` per call, ``execute_async_v3`` on
torch's current stream, and an optional CUDA graph captured after one ordinary warm-up run.
A short batch is padded inside the backend to a size the profile allows (the profile minimum,
or the fixed graph batch) and cropped back.

The plan is loaded only if its sidecar matches the weights, config, condiff version, TensorRT
version, GPU name and compute capability; otherwise ``ArtifactError`` gives the rebuild command.
TensorRT could not be installed on any machine this project has (performance.md §5): this file
is tested with a stub ``tensorrt`` module only and has never run against real TensorRT.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from condiff import artifacts
from condiff.errors import ArtifactError, BackendUnavailableError
from condiff.optional import require

logger = logging.getLogger(__name__)

INPUTS = ("x_t", "cond", "t")
OUTPUT = "eps"

# Activation memory shared by every plan's execution context on one device. By default TensorRT gives
# each context its own, sized for the profile's largest batch, so ten members held ten copies, although
# the runner runs them one after another on one stream. Kept only while a denoiser holds it.
_SHARED_ACTIVATIONS: "weakref.WeakValueDictionary[str, torch.Tensor]" = weakref.WeakValueDictionary()


def _shared_activations(device: torch.device, size: int) -> torch.Tensor:
    """A byte buffer of at least ``size`` on ``device``, the same one for every caller that fits in it."""
    key = str(device)
    buf = _SHARED_ACTIVATIONS.get(key)
    if buf is None or buf.numel() < size:  # a larger plan: a new buffer; earlier contexts keep theirs
        buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
        _SHARED_ACTIVATIONS[key] = buf
    return buf


def create_context(engine, device: torch.device):
    """(execution context, the activation buffer it uses or None). With TensorRT's user-managed
    allocation the context runs in the buffer every member shares (``_shared_activations``);
    a TensorRT without that strategy allocates per context as before."""
    import sys

    trt = sys.modules.get("tensorrt")
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if strategy is None:
        return engine.create_execution_context(), None
    size = getattr(engine, "device_memory_size_v2", None)  # 10.1+; device_memory_size before
    size = int(engine.device_memory_size if size is None else size)
    context = engine.create_execution_context(strategy)
    if context is None:
        return None, None
    buf = _shared_activations(device, size)
    if hasattr(context, "set_device_memory"):  # 10.1+
        context.set_device_memory(buf.data_ptr(), size)
    else:
        context.device_memory = buf.data_ptr()
    return context, buf


class TrtDenoiser:
    """``denoise`` through a TensorRT execution context; buffers sized for ``max_batch``."""

    name = "trt"
    precision = "fp16"

    def __init__(self, engine, device: torch.device, image_shape: tuple[int, int, int], profile: dict,
                 max_batch: int, cuda_graph: bool = False, sidecar: dict | None = None,
                 t_dtype: torch.dtype = torch.int64):
        self.engine = engine
        self.context, self.activations = create_context(engine, device)
        if self.context is None:
            # its memory is sized for the plan's largest batch, whatever --batch-size says
            raise BackendUnavailableError(None, "TensorRT could not create an execution context (out of GPU memory?)",
                                          "free GPU memory, or rebuild the plan for smaller batches: "
                                          "condiff-export MODEL_DIR --trt --max-batch 16")
        self.device = device
        self.image_shape = tuple(image_shape)
        self.min_batch = int(profile["min"])
        self.max_batch = min(int(max_batch), int(profile["max"]))
        if self.max_batch < self.min_batch:
            raise BackendUnavailableError(None, f"batch size {max_batch} is below the plan's profile minimum "
                                          f"{self.min_batch}", "rebuild the plan with a smaller --min-batch")
        self.sidecar = sidecar or {}
        self.use_graph = cuda_graph
        n = self.max_batch
        self.buffers = {
            "x_t": torch.zeros(n, *self.image_shape, device=device, dtype=torch.float32),
            "cond": torch.zeros(n, *self.image_shape, device=device, dtype=torch.float32),
            # int64 as exported; int32 if this TensorRT's parser narrowed the timestep input
            "t": torch.zeros(n, device=device, dtype=t_dtype),
            OUTPUT: torch.zeros(n, *self.image_shape, device=device, dtype=torch.float32),
        }
        self._graph: torch.cuda.CUDAGraph | None = None
        self._bound_batch: int | None = None

    def _padded_batch(self, batch: int) -> int:
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch {self.max_batch}")
        # a CUDA graph replays one fixed shape; otherwise any size inside the profile works
        return self.max_batch if self.use_graph else max(batch, self.min_batch)

    def _bind(self, batch: int) -> None:
        """Shapes and addresses for a padded batch of ``batch`` rows (prefixes of the static buffers)."""
        if self._bound_batch == batch:
            return
        for name in INPUTS:
            buf = self.buffers[name]
            self.context.set_input_shape(name, (batch, *buf.shape[1:]))
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self._bound_batch = batch

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 returned False")

    def _capture(self, batch: int) -> None:
        """Warm up once on a side stream, then capture one enqueue as a CUDA graph."""
        self._bind(batch)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._execute(side)  # ordinary run first: TensorRT allocates lazily on the first enqueue
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._execute(torch.cuda.current_stream(self.device))
        self._graph = graph

    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, cond (B, C, H, W) float32, t int64 (B,) -> eps float32 (B, C, H, W) on ``device``."""
        batch = x_t.shape[0]
        if t.dim() == 0:
            t = t.expand(batch)
        padded = self._padded_batch(batch)
        bufs = self.buffers
        bufs["x_t"][:batch].copy_(x_t)
        bufs["cond"][:batch].copy_(cond)
        bufs["t"][:batch].copy_(t)
        if padded > batch:  # deterministic padding rows; their outputs are dropped
            bufs["x_t"][batch:padded].zero_()
            bufs["cond"][batch:padded].zero_()
            bufs["t"][batch:padded].zero_()
        if self.use_graph:
            if self._graph is None:
                self._capture(padded)
            self._graph.replay()
        else:
            self._bind(padded)
            self._execute(torch.cuda.current_stream(self.device))
        return bufs[OUTPUT][:batch].clone()


def runtime_identity(trt, device: torch.device) -> dict[str, str]:
    """What a plan's sidecar must match on this machine."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def open_trt(model_dir: str | Path, *, device=None, precision: str = "fp16", max_batch: int | None = None,
             cuda_graph: bool = False) -> TrtDenoiser:
    """Open ``model_dir/model.fp16.plan`` after verifying its sidecar against the weights and this machine."""
    model_dir = Path(model_dir)
    trt = require("tensorrt", "trt")
    if precision != "fp16":
        raise BackendUnavailableError(None, f"the trt engine runs the FP16 plan, not {precision}",
                                      "use --precision fp16 (or --engine torch/ort for fp32)")
    plan_path = model_dir / artifacts.PLAN_NAME
    # weights, config and bytes first: those need no GPU and say "rebuild" most often
    fp = artifacts.model_fingerprint(model_dir)
    sidecar = artifacts.verify_sidecar(plan_path, kind="tensorrt", **fp)
    dev = torch.device("cuda" if device in (None, "auto") else device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError(None, "the trt engine needs a CUDA GPU", "use --engine torch or ort on the CPU")
    artifacts.verify_sidecar(plan_path, kind="tensorrt", runtime=runtime_identity(trt, dev),
                             check_artifact_digest=False, **fp)
    hint = f"rebuild it with: {artifacts.rebuild_command(model_dir, 'tensorrt', sidecar.get('build_options'))}"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with torch.cuda.device(dev):
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise ArtifactError(plan_path, "TensorRT could not deserialize the plan", hint)
    profile = sidecar["batch_profile"]
    t_dtype = torch.int32 if engine.get_tensor_dtype("t") == trt.int32 else torch.int64
    return TrtDenoiser(engine, dev, tuple(sidecar["image_shape"]), profile,
                       max_batch or int(profile["opt"]), cuda_graph, sidecar, t_dtype)
