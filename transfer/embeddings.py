"""The embedding cache: one array file per split, streamed to disk, with its index and meta.

``data/embeddings/`` holds ``<split>.npy`` (one row per image, float32 or float16),
``index.npz`` (labels and ids of every split, in row order) and ``meta.json``
(``EmbeddingMeta``: backbone, weights, preprocessing, engine, dimension; nothing that changes
with the images, so that fine-tuning, which depends on it, does not re-run when test images
are curated).
"""

from __future__ import annotations

import json
import mmap
import os
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import DAMAGED_ARRAY_FILE, load_arrays, read_json, write_npy
from transfer.errors import PipelineError


@dataclass(frozen=True)
class EmbeddingMeta:
    """What produced the embeddings: enough to reproduce them and to feed new images alike."""

    backbone: str
    weights: str
    weights_sha256: str | None
    preprocessing: dict[str, Any]
    dim: int
    dtype: str
    classes: list[str]
    flip_average: bool
    precision: str
    engine: str  # what ran the encoder: a key of transfer.engines.ENGINES, never auto
    short_side: int
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, directory: str | Path) -> EmbeddingMeta:
        raw = read_json(Path(directory) / "meta.json")
        problem = _field_problem(cls, raw) or \
            ("'short_side' is 0: images stored 0 pixels small" if raw["short_side"] == 0 else "")
        if problem:
            raise PipelineError(f"{directory}/meta.json: not an embedding meta file ({problem}); "
                                "re-run the extract stage")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})  # other keys: left alone


def json_preview(value: Any) -> str:
    """``value`` as JSON, cut to 40 characters: how a damaged file's value is quoted."""
    return json.dumps(value)[:40]


def _field_problem(cls: type, raw: Any) -> str:
    """Why ``raw`` (read from JSON) cannot fill the dataclass ``cls``, or ``""``: each field
    present, of its annotated kind (``dict``, ``list``, ``str``, ``int``, ``bool``, or null
    where allowed), counts and sizes not negative."""
    if not isinstance(raw, dict):
        return f"a {type(raw).__name__}, not an object"
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in raw:
            return f"no '{f.name}'"
        hint, value = hints[f.name], raw[f.name]
        kinds = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint)
                                                          if typing.get_origin(hint) in
                                                          (typing.Union, types.UnionType)
                                                          else (hint,)))
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            return f"'{f.name}' is {json_preview(value)}"
        if isinstance(value, int) and value < 0:
            return f"'{f.name}' is negative"
    return ""


def write_split(path: Path, batches: Iterable[np.ndarray], rows: int, dim: int,
                dtype: str) -> None:
    """Stream ``batches`` into the ``.npy`` file at ``path``; only one batch is in memory."""
    with open(path, "wb") as f:
        written = write_npy(f, dtype, (rows, dim), batches)
    if written != rows:
        raise RuntimeError(f"{path}: wrote {written} rows, expected {rows}")


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (memory-mapped), labels and ids of one split, checked against the meta."""
    directory = Path(directory)
    path = directory / f"{split}.npy"
    meta = EmbeddingMeta.read(directory)
    rerun = "re-run the extract stage: dvc repro --force extract"
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(features, np.ndarray):
            raise ValueError("an archive, not one array")
        dtype = np.dtype(meta.dtype)
    except FileNotFoundError as err:
        raise PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)") from err
    except (*DAMAGED_ARRAY_FILE, TypeError) as err:  # TypeError: a meta dtype naming no dtype
        raise PipelineError(f"{path}: truncated or damaged ({err}); {rerun}") from err
    if features.ndim != 2 or features.shape[1] != meta.dim or features.dtype != dtype:
        raise PipelineError(f"{path}: holds {features.shape} {features.dtype}, the meta says "
                            f"(rows, {meta.dim}) {meta.dtype}; {rerun}")
    index = load_arrays(directory / "index.npz")
    labels, ids = index.get(f"{split}_labels"), index.get(f"{split}_ids")
    if labels is None or ids is None or labels.shape != (len(features),) or \
            ids.shape != (len(features),) or labels.dtype.kind not in "iu" or \
            not np.all((labels >= 0) & (labels < len(meta.classes))):
        raise PipelineError(f"{directory}/index.npz does not match {path}; {rerun}")
    return features, labels, ids


def row_chunks(features: np.ndarray, rows: int = 512, dtype: type = np.float64
               ) -> Iterator[tuple[int, np.ndarray]]:
    """``features`` as ``dtype`` (float64) copies of ``rows`` rows at a time, each with its
    first row's index (a float32 chunk of float32 rows held in memory is a view of them).

    The pages of a memory-mapped cache are handed back to the kernel after each chunk, so
    reading a whole split costs one chunk of memory, not the size of the file.
    """
    for start in range(0, len(features), rows):
        yield start, read_rows(features, slice(start, start + rows), dtype)


def read_rows(features: np.ndarray, rows: slice | np.ndarray, dtype: type = np.float64
              ) -> np.ndarray:
    """``features[rows]`` as a ``dtype`` (float64) copy, without leaving a memory-mapped
    cache's pages in this process's memory.

    A range is read through the mapping, whose pages are handed back to the kernel after.
    Scattered rows are read from the file with ``pread``: touching them through the mapping
    would map the pages around each one as well, most of the file for a few hundred rows.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # damaged values: refused just below
        if not isinstance(rows, slice) and isinstance(getattr(features, "base", None),
                                                      mmap.mmap):
            chunk = _pread_rows(features, np.asarray(rows)).astype(dtype)
        else:
            chunk = np.asarray(features[rows], dtype=dtype)
            mapping = getattr(features, "_mmap", None)  # np.memmap's mmap object
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)
    if not np.isfinite(chunk).all():  # every head would fail on it, deep inside its library
        where = getattr(features, "filename", None) or "the embeddings"
        raise PipelineError(f"{where}: holds values that are not finite numbers (a damaged "
                            "file, or values too large for backbone.embedding_dtype); re-run "
                            "the extract stage: dvc repro --force extract")
    return chunk


def _pread_rows(features: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Rows of a whole memory-mapped ``.npy`` (not a view: its offset is the file's)."""
    width = features.dtype.itemsize * int(np.prod(features.shape[1:]))
    out = np.empty((len(rows), *features.shape[1:]), dtype=features.dtype)
    fd = os.open(features.filename, os.O_RDONLY)
    try:
        for i, row in enumerate(rows):
            data = os.pread(fd, width, features.offset + int(row) * width)
            out[i] = np.frombuffer(data, dtype=features.dtype).reshape(features.shape[1:])
    finally:
        os.close(fd)
    return out
