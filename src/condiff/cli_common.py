"""What every condiff command shares: options, logging, exit codes and the ``--version`` report.

Exit codes (DESIGN §6): 0 all done, 1 some cases failed, 2 usage or configuration error before
any work, 130 interrupted (SIGINT), 143 terminated (SIGTERM). A ``CondiffError`` prints its
message without a traceback (``-v`` shows it). Only this module and the command modules touch
logging handlers; library code only logs.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from condiff import __version__
from condiff.errors import CondiffError, is_out_of_space

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENGINES = ("torch", "ort", "trt", "fast")  # the --engine values; each must be registered in condiff.engine.backends


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks run as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` for the duration (main thread only; elsewhere a no-op)."""
    def _raise(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread (e.g. a Ray actor): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------- options


def verbose_option(f):
    return click.option("-v", "--verbose", count=True, help="Debug logs on stderr and tracebacks for errors.")(f)


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True,
                        help="Only errors on the terminal: no progress bar, warnings or summary line "
                             "(the log file still gets everything).")(f)


def progress_option(f):
    return click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Progress bar on stderr (never drawn when stderr is not a terminal).")(f)


class BatchSize(click.ParamType):
    """``auto`` (None) or a positive integer."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)


def device_options(f):
    f = click.option("--batch-size", type=BatchSize(), default="auto", show_default=True, metavar="N|auto",
                     help="Slices per device batch. auto: 16 on the CPU, 64 on a GPU, halved whenever the device "
                          "runs out of memory; a number is used as given (out of memory is then an error). "
                          "Results do not depend on it (on a GPU: to rounding).")(f)
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
                     help="Network precision (auto: fp16 for the fast and trt engines, else fp32); "
                          "sampler state and SSIM stay float32.")(f)
    f = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="Where the network runs; a missing GPU is an error, never a silent CPU fallback.")(f)
    f = click.option("--engine", type=click.Choice(list(ENGINES)), default="torch", show_default=True,
                     help="Network backend.")(f)
    return f


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Noise seed; noise is a pure function of (seed, input digest, slice, member, step).")(f)


def version_option(f):
    def _show(ctx: click.Context, param, value):
        if not value or ctx.resilient_parsing:
            return
        click.echo(format_environment(environment_report(probe_providers=True)))
        ctx.exit(EXIT_OK)

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show,
                        help="Print condiff's version and an environment report (torch, CUDA, GPU and driver, TF32 "
                             "and determinism switches, ORT and which of its providers load, TensorRT, readable "
                             "formats).")(f)


# ----------------------------------------------------------------------------------------- environment


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report(probe_providers: bool = False) -> dict[str, Any]:
    """Versions and devices, the same facts ``run.json`` records. Never raises.

    ``probe_providers``: also open a one-node ONNX graph on each ONNX Runtime provider on offer and
    say which load (``--version``): onnxruntime-gpu offers CUDA and TensorRT even where their
    libraries are missing, and only a session shows it."""
    report: dict[str, Any] = {
        "condiff": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "numpy": _package_version("numpy"), "nibabel": _package_version("nibabel"), "pillow": _package_version("pillow"),
    }
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda_build"] = torch.version.cuda
        report["torch_threads"] = torch.get_num_threads()  # how many CPU slices run side by side
        report["cuda_available"] = bool(torch.cuda.is_available())
        report["cudnn"] = torch.backends.cudnn.version() if report["cuda_available"] else None
        report["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                          if report["cuda_available"] else [])
    except Exception as exc:  # a broken torch install must not hide the rest of the report
        report["torch"] = f"unavailable ({exc})"
    else:
        try:
            report["tf32"] = _tf32_settings(torch)
        except Exception as exc:  # pragma: no cover - flags renamed in a future torch
            report["tf32"] = f"unknown ({exc})"
        report["determinism"] = _determinism_settings(torch)
    report["nvidia_driver"] = _nvidia_driver()
    report["formats"] = _formats()
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
        report["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except Exception:
        report["onnxruntime"] = None
    else:
        if probe_providers:
            report["onnxruntime_usable"], report["onnxruntime_unusable"] = probe_ort_providers(onnxruntime)
    try:
        import tensorrt

        report["tensorrt"] = tensorrt.__version__
    except Exception:
        report["tensorrt"] = None
    return report


def _probe_graph() -> bytes | None:
    """A one-node (Identity) ONNX model, or None without the onnx package."""
    try:
        from onnx import TensorProto, helper
    except Exception:
        return None
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "condiff-probe",
                              [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime condiff supports
    return model.SerializeToString()


def probe_ort_providers(ort) -> tuple[list[str], list[str]]:
    """(providers whose session loads, ``"NAME: why not"`` for the others). Never raises."""
    graph = _probe_graph()
    if graph is None:
        return [], ["not probed: the onnx package is not installed"]
    usable, unusable = [], []
    for name in ort.get_available_providers():
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 4  # the probe reports failures itself
            loaded = list(ort.InferenceSession(graph, options, providers=[name]).get_providers())
        except Exception as exc:  # ORT raises its own Fail/RuntimeException types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            unusable.append(f"{name}: {reason[:200]}")
            continue
        if loaded and loaded[0] == name:
            usable.append(name)
        else:  # ORT fell back (e.g. CUDA libraries missing): the session runs elsewhere
            unusable.append(f"{name}: did not load (the session ran on {', '.join(loaded) or 'nothing'})")
    return usable, unusable


def _tf32_settings(torch) -> str:
    """Whether float32 convolutions and matmuls may run on TF32 tensor cores (10-bit mantissa): on a
    GPU, ``--precision fp32`` means that unless NVIDIA_TF32_OVERRIDE=0 forbids it (PyTorch's defaults:
    convolutions yes, matmuls no)."""
    import warnings

    with warnings.catch_warnings():  # newer torch deprecates these flags in favour of fp32_precision
        warnings.simplefilter("ignore")
        conv, matmul = bool(torch.backends.cudnn.allow_tf32), bool(torch.backends.cuda.matmul.allow_tf32)
    override = os.environ.get("NVIDIA_TF32_OVERRIDE")
    text = f"convolutions {'allowed' if conv else 'off'}, matmuls {'allowed' if matmul else 'off'}"
    return text + (f" (NVIDIA_TF32_OVERRIDE={override})" if override is not None else "")


def _nvidia_driver(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The NVIDIA kernel driver's version (Linux; None where there is none), read without CUDA."""
    try:
        first = path.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", first)
    return match.group(1) if match else first.strip()


def _formats() -> str:
    """The file formats this condiff reads (what a model set or export from elsewhere must be)."""
    from . import artifacts, config, modelset

    return f"model set {modelset.SET_SCHEMA}, model {config.SCHEMA}, exported engines {artifacts.SCHEMA}"


def _determinism_settings(torch) -> str:
    """What decides whether GPU kernels repeat bit for bit (``--deterministic`` turns all of it on)."""
    def state(flag) -> str:
        return "on" if flag else "off"

    text = (f"deterministic algorithms {state(torch.are_deterministic_algorithms_enabled())}, cuDNN deterministic "
            f"{state(torch.backends.cudnn.deterministic)}, cuDNN benchmark {state(torch.backends.cudnn.benchmark)}")
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return text + (f", CUBLAS_WORKSPACE_CONFIG={workspace}" if workspace else "")


# what None means for the keys where it is not a missing package
_ABSENT = {"torch_cuda_build": "none (a CPU build of torch)", "cudnn": "none", "nvidia_driver": "none found"}


def format_environment(report: dict[str, Any]) -> str:
    lines = [f"condiff {report['condiff']}"]
    for key in ("python", "platform", "torch", "torch_cuda_build", "torch_threads", "cuda_available", "cudnn", "gpus",
                "nvidia_driver", "tf32", "determinism", "formats", "onnxruntime", "onnxruntime_providers",
                "onnxruntime_usable", "onnxruntime_unusable", "tensorrt",
                "numpy", "nibabel", "pillow"):
        if key in report:
            value = report[key]
            if isinstance(value, list):
                value = ", ".join(value) if value else "none"
            lines.append(f"  {key:<22} {_ABSENT.get(key, 'not installed') if value is None else value}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- logging


@contextlib.contextmanager
def logging_to(verbose: int, echo: Callable[[str], None] | None = None, quiet: bool = False,
               backlog: bool = False) -> Iterator[None]:
    """Configure the ``condiff`` logger for one command: stderr (WARNING, DEBUG with -v, ERROR with
    ``quiet``), through ``echo`` when given (e.g. ``tqdm.write``). ``backlog``: keep what is logged
    until ``add_file_log`` opens the run's log file, and write it there first. Handlers are removed
    afterwards, so commands can run repeatedly in one process (tests, Ray drivers)."""
    logger = logging.getLogger("condiff")
    added: list[logging.Handler] = []
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    stream = _EchoHandler(echo) if echo else logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    added.append(stream)
    if backlog:  # what is logged before the run's log file opens (discovery) still reaches it
        keeper = _Backlog()
        keeper.setLevel(logging.DEBUG if verbose else logging.INFO)
        added.append(keeper)
    for h in added:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in added:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class _Backlog(logging.Handler):
    """Keeps records until ``add_file_log`` writes them to the run's log file (then it is removed)."""

    LIMIT = 10_000

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


class _EchoHandler(logging.Handler):
    """Log records through a callable (e.g. ``tqdm.write``) so they do not break a progress bar."""

    def __init__(self, echo: Callable[[str], None]):
        super().__init__()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.echo(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, plus the structured
    fields a record carries (``extra={"case": ..., "status": ..., "score": ...}``)."""

    FIELDS = ("case", "status", "score", "max_slice_score", "n_slices", "error")

    def format(self, record: logging.LogRecord) -> str:
        import datetime as _dt
        import json

        doc = {"time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        doc.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def mask_pattern_option_check(ctx, param, value):
    """Click callback of the mask-pattern options: a pattern with an unknown placeholder is a usage error
    (exit 2) when the option is read, not a traceback at the first case; ``auto``/``none`` pass."""
    import click

    from condiff.io.cases import check_mask_pattern

    if value in (None, "", "auto", "none"):
        return value
    try:
        return check_mask_pattern(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def add_file_log(log_file: str, verbose: int, log_format: str = "text") -> logging.Handler:
    """Attach a file handler to the ``condiff`` logger (caller removes it with ``remove_log``);
    ``log_format`` ``json`` writes JSON lines (``JsonLineFormatter``) for log collectors."""
    # backslashreplace: a non-UTF-8 file name in a message is escaped, never a "--- Logging error ---"
    fh = logging.FileHandler(log_file, mode="a", encoding="utf-8", errors="backslashreplace")
    fh.setLevel(logging.DEBUG if verbose else logging.INFO)
    fh.setFormatter(JsonLineFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("condiff")
    for backlog in [h for h in logger.handlers if isinstance(h, _Backlog)]:
        logger.removeHandler(backlog)
        for record in backlog.records:
            if record.levelno >= fh.level:
                fh.handle(record)
        backlog.records.clear()
    logger.addHandler(fh)
    return fh


def remove_log(handler: logging.Handler) -> None:
    logging.getLogger("condiff").removeHandler(handler)
    handler.close()


# ----------------------------------------------------------------------------------------- exit codes


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, CondiffError):
        return EXIT_USAGE
    return EXIT_FAILED


def run_command(body: Callable[[], int], verbose: int = 0) -> None:
    """Run a command body and exit with its code; map errors to DESIGN §6 exit codes.

    ``CondiffError`` escaping the body is a configuration error before work (exit 2), printed
    as ``error: <message>`` without a traceback unless ``-v``. Interrupts exit 130/143.
    """
    try:
        with sigterm_raises():
            code = body()
    except (KeyboardInterrupt, Terminated) as exc:
        click.echo("interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated", err=True)
        sys.exit(exit_code_for(exc))
    except CondiffError as exc:
        if verbose:
            click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as exc:
        if not is_out_of_space(exc):
            raise  # anything else is unexpected: keep its traceback
        if verbose:
            click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
        click.echo(f"error: {exc.filename or 'an output file'}: the disk is full ({exc.strerror}). Free space and "
                   "rerun the same command (condiff-train: add --resume; its last checkpoint is intact)", err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(code)


__all__ = ["ENGINES", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated",
           "sigterm_raises", "verbose_option", "quiet_option", "progress_option", "device_options", "BatchSize", "JsonLineFormatter", "seed_option", "version_option",
           "environment_report", "format_environment", "logging_to", "add_file_log", "remove_log",
           "mask_pattern_option_check",
           "exit_code_for", "run_command"]


def resolve_precision(precision: str, engine: str) -> str:
    """``auto`` -> fp16 for the half-precision engines (fast, trt), fp32 otherwise."""
    if precision != "auto":
        return precision
    return "fp16" if engine in ("fast", "trt") else "fp32"
