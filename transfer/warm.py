"""Extraction without PyTorch, where nothing about the network is new since the last run.

A run of ``extract`` that loaded the backbone with PyTorch and ran it with ONNX Runtime leaves
a record in the embedding store (``<store>/warm/<key>.json``): what it resolved the backbone
parameters to (the weights file and its SHA-256, the preprocessing, the store's configuration,
the embedding meta's fields) and the SHA-256 of the ONNX graph it ran. The next run with the
same parameters, the same library versions and the same processor finds the record, checks
that the weights file and the graph still have those bytes, and then neither imports torch,
timm and torchvision (3.5 s here) nor loads the backbone: rows come from the store, and the
images it lacks are resized with ``transfer.pixels`` and embedded by ONNX Runtime over the
cached graph. The files are the same bytes as a run with PyTorch would write (tested).

``predict`` and ``serve`` use the same record for the head model (``transfer.warm_head``).

Anything that does not match (no record, a damaged one, other versions, changed weights, a
missing or damaged graph, several processes under ``torchrun``) sends the stage the usual way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import sha256_file, write_json
from transfer.machine import cpu_model
from transfer.params import weights_file_named
from transfer.pixels import ResizeCrop, pixel_arrays
from transfer.preprocessing import Preprocessing

log = logging.getLogger(__name__)

RECORDS = "warm"  # the records' folder in the embedding store
INPUT_NAME = "images"  # the input of every ONNX graph the pipeline exports
# The embedding meta's fields a record holds (``transfer.extraction.Extraction.meta_fields``).
META_FIELDS = ("backbone", "weights", "weights_sha256", "preprocessing", "dim", "flip_average",
               "precision", "engine", "versions")
# Libraries whose versions can change what the stage writes: checked without importing them.
PACKAGES = ("torch", "timm", "torchvision", "onnxruntime", "onnx", "onnxscript", "numpy",
            "pillow")


@dataclass(frozen=True)
class SingleProcess:
    """The runtime of a warm run: one process, on the CPU (``transfer.runtime.Runtime``'s
    place in a process group, without torch)."""

    rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"

    @property
    def is_main(self) -> bool:
        return True


def installed_versions() -> dict[str, str]:
    """The installed versions of ``PACKAGES`` (from their metadata: no import)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible (without importing torch): ``auto`` would use it."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def record_key(params: Any) -> str:
    """What a record is found by: the backbone parameters that shape the embeddings, and
    ``machine_key``'s fields."""
    chosen = {name: value for name, value in asdict(params).items()
              if name not in ("store_max_gb", "embedding_dtype")}
    return machine_key(params=chosen)


def machine_key(**fields: Any) -> str:
    """A SHA-256 of ``fields`` with what else decides whether a record holds here: the
    libraries' versions, the processor, whether a GPU is visible (``auto`` would use it) and
    the thread count (a record is written only for an engine whose outputs do not depend on
    it, but the engine's choice might)."""
    return hashlib.sha256(json.dumps({
        **fields, "versions": installed_versions(), "cpu": cpu_model(), "gpu": gpu_visible(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": os.environ.get("OMP_NUM_THREADS"), "python": sys.version,
    }, sort_keys=True, default=list).encode()).hexdigest()


class WarmMiss(Exception):
    """The record cannot be used: the stage runs with PyTorch instead."""


def sound_graph(graph_cache: Path, graph_sha256: str) -> bytes:
    """The bytes of the graph in ``graph_cache`` whose SHA-256 is ``graph_sha256``."""
    graph = next((data for candidate in sorted(graph_cache.glob(f"*-{graph_sha256[:16]}.onnx"))
                  if hashlib.sha256(data := candidate.read_bytes()).hexdigest() == graph_sha256),
                 None)
    if graph is None:
        raise WarmMiss(f"no sound graph {graph_sha256[:16]} in {graph_cache}")
    return graph


def write_record(store_root: Path, params: Any, *, configuration: dict[str, Any],
                 meta: dict[str, Any], weights_file: Path, graph_sha256: str,
                 batch_size: int, threads: int) -> None:
    """Record what a run with PyTorch resolved ``params`` to, for the next run: the ONNX
    Runtime graph that ran (its SHA-256), with ``threads`` threads, batches of
    ``batch_size``."""
    write_json(store_root / RECORDS / f"{record_key(params)}.json", {
        "configuration": configuration, "meta": meta,
        "weights_file": str(weights_file.resolve()), "weights_sha256": meta["weights_sha256"],
        "graph_sha256": graph_sha256, "batch_size": batch_size, "threads": threads})


@dataclass
class WarmExtraction:
    """``transfer.extraction.Extraction`` from a record: the same rows, through ONNX Runtime
    over the cached graph, without torch."""

    configuration_: dict[str, Any]
    meta: dict[str, Any]
    graph: bytes  # the ONNX graph, its SHA-256 checked against the record's
    batch_size: int
    threads: int
    resize_crop: ResizeCrop  # the preprocessing's resize and centre crop
    runtime: SingleProcess = SingleProcess()
    _session: Any = None

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def name(self) -> str:
        return str(self.meta["backbone"])

    @property
    def engine(self) -> str:
        return str(self.meta["engine"])

    @property
    def flip_average(self) -> bool:
        return bool(self.meta["flip_average"])

    def configuration(self) -> dict[str, Any]:
        return self.configuration_

    def meta_fields(self) -> dict[str, Any]:
        return dict(self.meta)

    def embed(self, images: Sequence[np.ndarray], desc: str,
              batch_size: int | None = None) -> Iterator[np.ndarray]:
        """Float32 rows of ``images``, a batch at a time (of the record's size unless given:
        ONNX Runtime's rows do not depend on it, docs/engines.md)."""
        if not len(images):
            return
        session = self._open()
        for batch in pixel_arrays(images, self.resize_crop, batch_size or self.batch_size, desc,
                                  ahead=True):
            [rows] = session.run(None, {INPUT_NAME: batch})
            if self.flip_average:  # as transfer.backbones.embed_batches does it
                [mirrored] = session.run(None, {INPUT_NAME: np.ascontiguousarray(
                    batch[:, :, ::-1])})
                rows = (rows + mirrored) / 2
            yield rows

    def _open(self) -> Any:
        """ONNX Runtime's session over the graph, set up as ``OnnxRuntimeEngine`` sets it up."""
        if self._session is None:
            self._session = onnxruntime_session(self.graph, self.threads)
        return self._session


def onnxruntime_session(graph: bytes, threads: int) -> Any:
    """ONNX Runtime's CPU session over ``graph``: every graph optimization on, ``threads``
    threads that sleep instead of spinning between calls (docs/engines.md)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def warm_extraction(params: Any, store_root: Path, graph_cache: Path) -> WarmExtraction | None:
    """The extraction the record for ``params`` describes, once its weights file and graph are
    checked; None (with the reason in the debug log) where there is none to use."""
    if os.environ.get("WORLD_SIZE", "1").strip() != "1":  # torchrun's group: the usual way
        return None
    path = store_root / RECORDS / f"{record_key(params)}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        # A file backbone.weights names is read from here: a queued experiment runs in a copy
        # of the workspace, whose file of that name may differ from the one the record read.
        weights = weights_file_named(params.name, params.weights) or \
            Path(record["weights_file"])
        if sha256_file(weights) != record["weights_sha256"]:
            raise WarmMiss(f"{weights} is not the weights file the record was written for")
        graph = sound_graph(graph_cache, record["graph_sha256"])
        missing = [key for key in META_FIELDS if key not in record["meta"]]
        if missing:
            raise WarmMiss(f"the record's meta lacks {', '.join(missing)}")
        preprocessing = Preprocessing.from_dict(record["meta"]["preprocessing"])
        return WarmExtraction(record["configuration"], record["meta"], graph,
                              int(record["batch_size"]), int(record["threads"]),
                              preprocessing.pixel_transform())
    except FileNotFoundError:
        log.debug("no warm record %s: loading the backbone", path.name)
    except (OSError, ValueError, KeyError, TypeError, WarmMiss) as err:
        log.debug("warm record %s not used (%s): loading the backbone", path.name, err)
    return None
