"""The embedding store: every embedding ``extract`` has computed, kept outside DVC's outputs and
keyed by the image's stored pixels and the whole extraction configuration, so that ``extract``
embeds only the images it has not seen with this exact configuration.

``cache/embeddings/<configuration key>/`` (``transfer.layout.EMBEDDING_STORE``) holds
``config.json`` (what the key stands for, for people) and shards ``<hash>.npz``, each with
``keys`` (``(N, 16)`` uint8: each image's ``pixel_key``), ``rows`` (``(N, dim)`` float32: its
embedding) and ``config`` (the configuration key). A shard is written to a scratch folder,
flushed to the disk and renamed into place, so a reader (another experiment of a ``dvc queue
start -j 2``) only ever sees whole files; ``<hash>`` is the start of the SHA-256 of the file's
bytes, checked on every read together with its configuration: a damaged or foreign shard is
deleted and its images embedded again, never used.

The store is bounded: ``prune`` deletes the least recently used shards beyond a size limit
(``backbone.store_max_gb``). Deleting the whole folder between runs is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import (
    DAMAGED_ARRAY_FILE,
    remove_stale_temporaries,
    scratch_directory,
    write_json,
)
from transfer.data import stored_pixels_sha256

log = logging.getLogger(__name__)

KEY_BYTES = 16  # of a pixel key: a 128-bit prefix of the SHA-256 of an image's stored pixels
NAME_DIGITS = 16  # hex digits of a shard's or a configuration's hash in its file name


def pixel_key(pixels: np.ndarray) -> bytes:
    """The store's key for an image: a hash of the exact pixels the network is fed from (as
    stored by ``prepare``, after shrinking) and of their shape."""
    return digest_key(stored_pixels_sha256(pixels).encode())


def digest_key(digest: bytes) -> bytes:
    """The store's key from an image's ``stored_pixels_sha256`` (hex, as bytes), as
    ``prepare`` records it: ``pixel_key`` without reading the pixels again."""
    return bytes.fromhex(digest.decode("ascii"))[:KEY_BYTES]


def configuration_key(configuration: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of everything an embedding depends on besides the pixels."""
    return hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()


class EmbeddingStore:
    """The embeddings of one configuration: found by pixel key, added a shard at a time."""

    def __init__(self, root: Path, configuration: Mapping[str, Any], dim: int) -> None:
        self.key = configuration_key(configuration)
        self.folder = Path(root) / self.key[:NAME_DIGITS]
        self.dim = dim
        self.folder.mkdir(parents=True, exist_ok=True)
        # A run killed between moving its last shard into place and removing the scratch
        # folder it wrote it in leaves that folder; the next run may have no shard to write.
        remove_stale_temporaries(self.folder / "shard")
        if not (self.folder / "config.json").is_file():
            write_json(self.folder / "config.json", {"key": self.key, **configuration})

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz"))

    def found(self, wanted: Mapping[bytes, Sequence[int]]) -> Iterator[tuple[list[int],
                                                                             np.ndarray]]:
        """For each sound shard that holds some of ``wanted`` (pixel key to the caller's
        positions of that image), those positions and their rows (float32, one per position).
        Each image is yielded once, from the first shard that holds it."""
        left = dict(wanted)
        for path in self.shards():
            if not left:
                return
            shard = self._read(path)
            if shard is None:
                continue
            keys, rows = shard
            positions, picked = [], []
            for i, key in enumerate(keys):
                for position in left.pop(key.tobytes(), ()):
                    positions.append(position)
                    picked.append(i)
            if positions:
                _touch(path)  # recently used: kept longest by prune
                yield positions, rows[picked]

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """A shard's keys and rows, or ``None`` when it is gone, or damaged or foreign (then
        deleted, with a warning)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # pruned by another process since it was listed
            return None
        problem = ""
        if hashlib.sha256(data).hexdigest()[:NAME_DIGITS] != path.stem:
            problem = "its bytes do not match its name"
        else:
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                    config, keys, rows = str(npz["config"]), npz["keys"], npz["rows"]
            except (*DAMAGED_ARRAY_FILE, KeyError) as err:
                problem = f"not a shard ({type(err).__name__})"
            else:
                if config != self.key:
                    problem = "it belongs to another configuration"
                elif keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES or \
                        rows.dtype != np.float32 or rows.shape != (len(keys), self.dim):
                    problem = f"keys {keys.shape} {keys.dtype}, rows {rows.shape} {rows.dtype}"
        if problem:
            log.warning("%s: %s; deleted, its images are embedded again", path, problem)
            path.unlink(missing_ok=True)
            return None
        return keys, rows

    def add(self, keys: Sequence[bytes], rows: np.ndarray) -> Path:
        """Write one shard with ``rows`` (float32) under ``keys``, atomically; its path."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (len(keys), self.dim):
            raise ValueError(f"{len(keys)} keys for rows of shape {rows.shape}")
        buffer = io.BytesIO()
        np.savez(buffer, config=np.asarray(self.key),
                 keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES),
                 rows=rows)
        data = buffer.getvalue()
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:NAME_DIGITS]}.npz"
        with scratch_directory(self.folder / "shard") as scratch:
            with open(scratch / path.name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(scratch / path.name, path)
        _fsync_directory(self.folder)
        return path


def store_size(root: Path) -> int:
    """Bytes in the shards of every configuration under ``root``."""
    return sum(_size(path) for path in Path(root).glob("*/*.npz"))


def prune(root: Path, max_bytes: int) -> int:
    """Delete the least recently used shards under ``root`` until the shards left take at most
    ``max_bytes``. Returns the bytes deleted.

    Only shards go: folders stay, with their ``config.json`` (a few hundred bytes). Another
    extraction sharing the store (``dvc queue start -j 2``) may have just made a folder it is
    about to write into, a configuration's or the warm records' (``transfer.warm``); removing
    one that looks empty would make that write fail."""
    shards = []
    for path in Path(root).glob("*/*.npz"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        shards.append((stat.st_mtime_ns, path.name, stat.st_size, path))
    total, deleted = sum(size for _, _, size, _ in shards), 0
    for _, _, size, path in sorted(shards):
        if total - deleted <= max_bytes:
            break
        path.unlink(missing_ok=True)
        deleted += size
    if deleted:
        log.info("embedding store: deleted %.1f MB of least recently used shards (limit %.1f "
                 "MB)", deleted / 1e6, max_bytes / 1e6)
    return deleted


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power loss, not only a killed process."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
