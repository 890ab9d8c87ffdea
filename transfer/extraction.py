"""Extraction at scale: each image embedded once per configuration (``transfer.embedding_store``)
and the work shared among ``torchrun``'s processes, which write disjoint rows of the same
memory-mapped split files.

A row must not depend on which process embedded it, nor on the other images of its batch: ONNX
Runtime's rows on CPU depend on neither the batch nor the thread count; PyTorch's depend on the
batch size and the thread count (by ~1e-6), never on the other images of a batch of that size
(tests/test_extraction.py). So every batch is full (the last one padded with copies of its last
image), and the store's key names the batch size and thread count where the engine needs them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transfer.artifacts import atomic_output, write_npy
from transfer.data import ImageStore
from transfer.embedding_store import EmbeddingStore, digest_key, pixel_key
from transfer.machine import cpu_model
from transfer.warm import SingleProcess, WarmExtraction

if TYPE_CHECKING:  # torch is imported where a network runs, not to assemble rows
    from transfer.backbones import Backbone
    from transfer.engines import CompiledNetwork
    from transfer.runtime import Runtime

log = logging.getLogger(__name__)

SHARD_ROWS = 4096  # new embeddings per store shard: few files, and a killed run keeps most work


@dataclass(frozen=True)
class Extraction:
    """What turns images into embedding rows: the compiled encoder and how it is fed."""

    backbone: Backbone
    encoder: CompiledNetwork
    runtime: Runtime
    batch_size: int
    flip_average: bool

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    @property
    def name(self) -> str:
        return self.backbone.name

    @property
    def engine(self) -> str:
        return self.encoder.engine

    def versions(self) -> dict[str, str]:
        """The versions of the libraries that shape the network's outputs, as the embedding
        meta names them."""
        import timm
        import torch
        import torchvision

        return {"timm": timm.__version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__, **self.encoder.versions}

    def configuration(self) -> dict[str, Any]:
        """Everything a row depends on besides the image's pixels: the store's key. The
        embedding dtype is not in it: the store keeps float32 rows, and a split file's rows
        are those cast to its dtype, the same cast from scratch or from the store."""
        import PIL
        import torch

        preprocessing = self.backbone.preprocessing
        configuration = {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_sha256 or self.backbone.weights_id,
            "preprocessing": preprocessing.to_dict(), "dim": self.backbone.num_features,
            "precision": self.runtime.precision, "flip_average": self.flip_average,
            "engine": self.encoder.engine, "device": device_model(self.runtime),
            "versions": {**self.versions(), "pillow": PIL.__version__}}  # Pillow resizes
        if not self.encoder.batch_invariant:
            configuration.update(batch_size=self.batch_size, threads=torch.get_num_threads())
        return configuration

    def meta_fields(self) -> dict[str, Any]:
        """The embedding meta's fields that come from the network and how it ran."""
        return {"backbone": self.backbone.name, "weights": self.backbone.weights_id,
                "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing.to_dict(),
                "dim": self.backbone.num_features, "flip_average": self.flip_average,
                "precision": self.runtime.precision, "engine": self.encoder.engine,
                "versions": self.versions()}

    def embed(self, images: Sequence[np.ndarray], desc: str) -> Iterator[np.ndarray]:
        """Float32 rows of ``images``, a full batch at a time (the last one cut to size)."""
        from transfer.backbones import embed_batches

        padded = _Padded(images, self.batch_size)
        left = len(images)
        for rows in embed_batches(self.encoder, padded, self.backbone.preprocessing,
                                  self.batch_size, self.runtime, flip_average=self.flip_average,
                                  desc=desc):
            yield rows[:left]
            left -= len(rows)


def device_model(runtime: Runtime) -> str:
    """The processor that computes the rows: kernels differ by GPU model and CPU instruction
    set, and so may the last bits of a row, so a store shared by different machines keeps
    their rows apart."""
    if runtime.is_cuda:
        import torch

        return f"cuda {torch.cuda.get_device_name(runtime.device)}"
    return cpu_model()


class _Padded(Sequence):
    """``images`` followed by copies of the last one, up to a multiple of ``batch_size``."""

    def __init__(self, images: Sequence[np.ndarray], batch_size: int) -> None:
        self.images = images
        self.length = -(-len(images) // batch_size) * batch_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        return self.images[min(i, len(self.images) - 1)]


class _Rows(Sequence):
    """The images at ``positions`` of the concatenated splits."""

    def __init__(self, places: Sequence[tuple[ImageStore, int]], positions: Sequence[int]):
        self.places, self.positions = places, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        store, row = self.places[self.positions[i]]
        return store[row]


@contextlib.contextmanager
def shared_output(path: Path, runtime: Runtime | SingleProcess) -> Iterator[Path]:
    """``transfer.artifacts.atomic_output`` for every process of the group: the main process
    makes the temporary folder and moves it into place when the block ends (after the other
    processes have ended theirs); the others write into it."""
    if runtime.world_size == 1:
        with atomic_output(path) as tmp:
            tmp.mkdir()
            yield tmp
        return
    import torch.distributed as dist

    if runtime.is_main:
        with atomic_output(path) as tmp:
            tmp.mkdir()
            dist.broadcast_object_list([str(tmp)])
            yield tmp
            dist.barrier()
        return
    shared = [None]
    dist.broadcast_object_list(shared)
    yield Path(shared[0])
    dist.barrier()


def extract_splits(directory: Path, stores: Mapping[str, ImageStore],
                   extraction: Extraction | WarmExtraction, dtype: str,
                   store: EmbeddingStore | None) -> dict[str, int]:
    """Write ``<split>.npy`` for each of ``stores`` into ``directory`` (a folder every process
    of the runtime's group sees): rows from ``store`` where it has them, the others embedded
    and added to it. Each process takes its share of the rows; the result is the same for any
    number of processes. Returns how many rows were ``reused`` and ``embedded``, over all."""
    runtime, dim = extraction.runtime, extraction.dim
    places = [(image_store, row) for image_store in stores.values()
              for row in range(len(image_store))]
    starts = np.cumsum([0, *(len(s) for s in stores.values())])
    paths = [directory / f"{split}.npy" for split in stores]
    if runtime.is_main:
        for path, n in zip(paths, np.diff(starts), strict=True):
            _allocate_npy(path, dtype, (int(n), dim))
    _barrier(runtime)
    arrays = [np.load(path, mmap_mode="r+", allow_pickle=False) for path in paths]

    def write(positions: Sequence[int], rows: np.ndarray) -> None:
        positions = np.asarray(positions)
        which = np.searchsorted(starts, positions, side="right") - 1
        for k in np.unique(which):
            arrays[k][positions[which == k] - starts[k]] = rows[which == k]

    mine = np.array_split(np.arange(len(places)), runtime.world_size)[runtime.rank]
    # The keys prepare recorded; a store prepared without them is read and hashed here.
    digests = {id(image_store): image_store.stored_digests() for image_store in stores.values()}

    def key(place: tuple[ImageStore, int]) -> bytes:
        image_store, row = place
        known = digests[id(image_store)]
        return pixel_key(image_store[row]) if known is None else digest_key(known[row])

    keys = {int(p): key(places[p]) for p in mine}
    missing = set(keys)
    if store is not None:
        wanted: dict[bytes, list[int]] = {}
        for position, key in keys.items():
            wanted.setdefault(key, []).append(position)
        for positions, rows in store.found(wanted):
            write(positions, rows)
            missing.difference_update(positions)
    # The images no process found, shared out again: each process embeds a slice of them.
    todo = sorted(_gathered([(p, keys[p]) for p in missing], runtime))
    share = np.array_split(np.arange(len(todo)), runtime.world_size)[runtime.rank]
    share_positions = [todo[i][0] for i in share]
    done = 0
    pending_keys: list[bytes] = []
    pending_rows: list[np.ndarray] = []
    for rows in extraction.embed(_Rows(places, share_positions), desc="extract"):
        batch = share[done:done + len(rows)]
        write([todo[i][0] for i in batch], rows)
        done += len(rows)
        if store is not None:
            pending_keys += [todo[i][1] for i in batch]
            pending_rows.append(rows)
            if len(pending_keys) >= SHARD_ROWS or done == len(share):
                store.add(pending_keys, np.concatenate(pending_rows))
                pending_keys, pending_rows = [], []
    for array in arrays:
        array.flush()
    _barrier(runtime)
    return {"reused": len(places) - len(todo), "embedded": len(todo)}


def _allocate_npy(path: Path, dtype: str, shape: tuple[int, int]) -> None:
    """An ``.npy`` file of ``shape`` (its header as ``transfer.artifacts.write_npy`` writes it),
    rows to be filled in place."""
    with open(path, "wb") as f:
        write_npy(f, dtype, shape, [])
        f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def _gathered(items: list, runtime: Runtime | SingleProcess) -> list:
    """``items`` of every process of the group, concatenated."""
    if runtime.world_size == 1:
        return items
    import torch.distributed as dist

    everyone: list[list | None] = [None] * runtime.world_size
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def _barrier(runtime: Runtime | SingleProcess) -> None:
    if runtime.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
