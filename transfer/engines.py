"""Engines that run a frozen network's forward pass: PyTorch itself, or ONNX Runtime over the
network exported once to an ONNX graph and cached.

``backbone.engine`` (and ``predict --engine``) names one of ``ENGINES``; ``auto`` takes the
first that can run here, in the registry's order, fastest first: ONNX Runtime on CPU (1.5-4x
PyTorch's extraction speed there, by backbone: docs/engines.md), PyTorch on a GPU or where
ONNX Runtime is missing. An engine turns a network that takes uint8 pixel batches into a
``CompiledNetwork``: uint8 ``(N, H, W, 3)`` tensors in, float32 arrays out.

The ONNX graph is cached in a folder outside every DVC output (``transfer.layout.ONNX_CACHE``),
one file per network, named by a hash of everything the graph depends on (architecture, every
weight and buffer, input shape, opset, library versions) and by a hash of its own bytes,
checked each time it is read: a damaged file is rebuilt, never used.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from transfer.artifacts import scratch_directory
from transfer.errors import PipelineError, first_line
from transfer.runtime import Runtime
from transfer.warm import INPUT_NAME, onnxruntime_session

log = logging.getLogger(__name__)

# The opset torch's ONNX exporter writes its functions for (torch.onnx's TORCHLIB_OPSET).
ONNX_OPSET = 18


@dataclass
class CompiledNetwork:
    """A frozen network ready to run: uint8 pixel batches (``(N, H, W, 3)``) in, float32
    arrays out."""

    engine: str
    run: Callable[[torch.Tensor], np.ndarray]
    # Library versions that shape the outputs besides torch's (recorded in the embedding meta).
    versions: dict[str, str] = field(default_factory=dict)
    # Whether a background thread should resize the next batches while this network runs:
    # where its threads sleep between operators and leave the cores gaps to do it in (ONNX
    # Runtime here); PyTorch's OpenMP threads spin instead, and on a GPU the DataLoader's
    # worker processes do it (docs/engines.md).
    read_ahead: bool = False
    # Whether an image's output is the same whatever the size of its batch and the number of
    # threads (ONNX Runtime on CPU); PyTorch's differ by ~1e-6 (transfer/extraction.py).
    batch_invariant: bool = False
    # ONNX Runtime: the SHA-256 of the graph it runs (what ``transfer.warm`` finds it by).
    graph_sha256: str | None = None

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.run(batch)


class Engine(abc.ABC):
    """One way to run a network's forward pass.

    ``cache_dir``: where it may keep what it builds for a network. ``key``: the setting that
    chose it, named in messages. ``fallback``: where it cannot run a network, run it with
    PyTorch and say why in one log line (as ``auto`` does), instead of failing.
    """

    name: ClassVar[str]

    def __init__(self, cache_dir: Path | None = None, key: str = "engine",
                 fallback: bool = False) -> None:
        self.cache_dir, self.key, self.fallback = cache_dir, key, fallback

    def unavailable(self, runtime: Runtime) -> str:
        """Why this engine cannot run on ``runtime`` here, or ``""`` when it can."""
        return ""

    def compile(self, network: torch.nn.Module, input_shape: tuple[int, ...],
                runtime: Runtime, label: str) -> CompiledNetwork:
        """``network`` (frozen; uint8 batches of ``input_shape`` each in) ready to run on
        ``runtime``; ``label`` names it in file names and messages."""
        reason = self.unavailable(runtime)
        if reason:
            raise PipelineError(f"{self.key}: {self.name} cannot run here: {reason}; use auto "
                                "or torch")
        return self._compile(network, input_shape, runtime, label)

    @abc.abstractmethod
    def _compile(self, network: torch.nn.Module, input_shape: tuple[int, ...],
                 runtime: Runtime, label: str) -> CompiledNetwork: ...


class TorchEngine(Engine):
    """PyTorch eager mode in channels-last layout (1.3-1.6x NCHW's speed on CPU;
    ``Normalized`` hands the network its input in that layout), with the runtime's mixed
    precision."""

    name = "torch"

    def _compile(self, network, input_shape, runtime, label):
        network.eval().to(runtime.device, memory_format=torch.channels_last)

        def run(batch: torch.Tensor) -> np.ndarray:
            batch = batch.to(runtime.device, non_blocking=True)
            with torch.inference_mode(), runtime.autocast():
                return network(batch).float().cpu().numpy()

        return CompiledNetwork(self.name, run)


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime's CPU execution provider, every graph optimization on, one thread per
    core (as many as PyTorch uses: ``OMP_NUM_THREADS`` or the physical cores) that sleeps
    instead of spinning between calls: spinning threads take the cores from the decoding
    between batches, and from each other on a machine shared with other work
    (docs/engines.md)."""

    name = "onnxruntime"

    def unavailable(self, runtime):
        if runtime.is_cuda:
            return "it runs on CPU here, and this machine has a GPU, where PyTorch is faster"
        if runtime.precision != "float32":
            return f"it runs float32 graphs, and the precision is {runtime.precision}"
        try:
            import onnxruntime  # noqa: F401 (onnx and onnxscript: only to export, checked there)
        except ImportError as err:
            return (f"onnxruntime is not installed ({first_line(err)}); install the project "
                    "again: python -m pip install -e .")
        return ""

    def _compile(self, network, input_shape, runtime, label):
        import onnxruntime

        if self.cache_dir is None:
            raise ValueError("the onnxruntime engine needs a folder to cache its graphs in")
        try:
            graph = cached_graph(network, input_shape, self.cache_dir, label)
            session = onnxruntime_session(graph, torch.get_num_threads())
        except Exception as err:  # exporter and runtime raise many types; each means the same
            why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(err))  # the exporter's colours
            reason = (f"{label} does not export to ONNX or load in ONNX Runtime "
                      f"({type(err).__name__}: {why})")
            if not self.fallback:
                raise PipelineError(f"{self.key}: {reason}; use auto or torch") from err
            log.warning("%s; running it with PyTorch instead", reason)
            return TorchEngine(self.cache_dir).compile(network, input_shape, runtime, label)

        def run(batch: torch.Tensor) -> np.ndarray:
            [outputs] = session.run(None, {INPUT_NAME: batch.cpu().numpy()})
            return outputs

        return CompiledNetwork(self.name, run, {"onnxruntime": onnxruntime.__version__},
                               read_ahead=True, batch_invariant=True,
                               graph_sha256=hashlib.sha256(graph).hexdigest())


# The registry: auto takes the first engine, in this order, that can run here.
ENGINES: dict[str, type[Engine]] = {"onnxruntime": OnnxRuntimeEngine, "torch": TorchEngine}


class AutoEngine(Engine):
    """The first of ``ENGINES`` that can run on the runtime, each passed over said in one log
    line; one that cannot run a particular network falls back to PyTorch."""

    name = "auto"

    def choose(self, runtime: Runtime) -> Engine:
        passed_over = []
        for name, cls in ENGINES.items():
            engine = cls(self.cache_dir, self.key, fallback=True)
            reason = engine.unavailable(runtime)
            if not reason:
                if passed_over:
                    log.info("%s auto: %s (%s)", self.key, name, "; ".join(passed_over))
                return engine
            passed_over.append(f"not {name}: {reason}")
        raise AssertionError("the torch engine runs everywhere")

    def _compile(self, network, input_shape, runtime, label):
        return self.choose(runtime).compile(network, input_shape, runtime, label)


def engine_named(choice: str, cache_dir: Path | None, key: str = "engine") -> Engine:
    """The engine ``choice`` names (``auto`` or a key of ``ENGINES``); ``key`` is the setting
    it came from, for messages."""
    return (AutoEngine if choice == "auto" else ENGINES[choice])(cache_dir, key)


def cached_graph(network: torch.nn.Module, input_shape: tuple[int, ...], cache_dir: Path,
                 label: str) -> bytes:
    """The ONNX graph of ``network`` (its bytes), from ``cache_dir`` when a sound copy is
    there, else exported and written there atomically."""
    stem = f"{_file_label(label)}-{graph_key(network, input_shape)[:16]}"
    for path in sorted(cache_dir.glob(f"{stem}-*.onnx")):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest()[:16] == path.stem.rpartition("-")[2]:
            return data
        log.warning("%s is damaged (its bytes do not match its name); building it again", path)
        path.unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with scratch_directory(cache_dir / stem) as scratch:
        export_onnx(network, torch.zeros((2, *input_shape), dtype=torch.uint8),
                    scratch / "graph.onnx", output_name="outputs")
        data = (scratch / "graph.onnx").read_bytes()
        path = cache_dir / f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
        os.replace(scratch / "graph.onnx", path)
    log.info("exported %s to ONNX: %s", label, path)
    return data


def graph_key(network: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """A SHA-256 of everything an exported graph depends on: the architecture (the modules'
    description), every weight and buffer (normalization included), the input shape, the
    opset and the versions of the libraries that define or export the network."""
    digest = hashlib.sha256()
    versions = {name: _version(name) for name in ("torch", "timm", "torchvision", "onnx",
                                                   "onnxscript")}
    digest.update(json.dumps({"architecture": repr(network), "input_shape": list(input_shape),
                              "input_dtype": "uint8", "opset": ONNX_OPSET,
                              "versions": versions}, sort_keys=True).encode())
    hash_tensors(digest, network.state_dict())
    return digest.hexdigest()


def hash_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``digest`` updated with every tensor of ``tensors``: its name, dtype, shape and bytes."""
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def _version(package: str) -> str:
    try:
        return str(importlib.import_module(package).__version__)
    except ImportError:
        return "not installed"


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", label)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, *,
                output_name: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``module`` as an ONNX graph to ``path``, its weights inside (no external-data
    file), its input ``images`` with any batch size, ``metadata`` in ``metadata_props``."""
    try:
        import onnx  # noqa: F401 (torch's exporter needs it; fail here, with the fix)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise PipelineError("ONNX export needs the onnx packages, part of the project's "
                            "dependencies: python -m pip install -e .") from err
    module = module.eval().to("cpu", memory_format=torch.contiguous_format)
    # The exporter's passes log dozens of INFO lines each, and torch.export prints the whole
    # graph to stderr when it fails: keep their warnings, and the printout for the debug log.
    printed = io.StringIO()
    with _logging_at_least(logging.WARNING, "onnxscript", "onnx_ir", "torch.onnx"), \
            _logging_at_least(logging.ERROR, "torch"), contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed), torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.onnx.export(module, (example,), None, input_names=[INPUT_NAME],
                                        output_names=[output_name], opset_version=ONNX_OPSET,
                                        verbose=False, dynamo=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        finally:
            if printed.getvalue():
                log.debug("the ONNX exporter printed:\n%s", printed.getvalue())
    program.model.metadata_props.update(metadata or {})
    _drop_stack_traces(program.model)
    program.save(str(path), external_data=False)


# Each node's source line, as the exporter records it: absolute paths of this checkout and of
# site-packages. Without them a graph is the same bytes wherever it is exported (a queued
# experiment runs in a temporary copy of the workspace) and names no one's folders.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(model: Any) -> None:
    """Remove ``STACK_TRACE`` from every node of the exporter's model (``onnx_ir``, which
    onnxscript's ``ir`` names), functions and subgraphs included."""
    from onnxscript import ir

    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE, None)


@contextlib.contextmanager
def _logging_at_least(level: int, *names: str) -> Iterator[None]:
    """Raise the level of the loggers ``names`` to ``level`` while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)
