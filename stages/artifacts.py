"""Reading and writing the pipeline's files: outputs atomically and without pickle, text as UTF-8.

Every output is written to a temporary sibling and moved into place with ``os.replace``,
so a killed stage never leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from stages.errors import PipelineError


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it vanishes.

    Works for files and for directories (the caller creates what it needs at the yielded path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove_stale_siblings(path: Path) -> None:
    """Remove temporaries of ``path`` left by a process that was killed (kill -9, power loss)."""
    for sibling in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = sibling.name[len(path.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            _remove(sibling)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def open_utf8(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text, with or without a byte-order mark; text that is not
    UTF-8 stops the stage with one line naming the file."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline=newline) as f:
        try:
            yield f
        except UnicodeDecodeError as err:
            found = f"byte 0x{err.object[err.start]:02x}"
            with open(path, "rb") as raw:
                if raw.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                    found += "; the file looks like UTF-16"
            raise PipelineError(f"{path}: not UTF-8 text ({found}); save it as UTF-8, with or "
                                "without BOM") from err


def read_utf8(path: str | Path) -> str:
    """The text of ``path``, UTF-8 with or without a byte-order mark (see ``open_utf8``)."""
    with open_utf8(path) as f:
        return f.read()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_utf8(path))
    except FileNotFoundError as err:
        raise PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)") from err
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err
    except RecursionError as err:
        raise PipelineError(f"{path}: not valid JSON (nested too deeply)") from err


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write dict rows (all with the same keys) as CSV with a header line."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Save plain arrays as an ``.npz``; object arrays (they need pickle) are refused."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array '{name}' has dtype object, which would need pickle")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def save_arrays_streamed(
        path: str | Path,
        arrays: dict[str, tuple[Any, tuple[int, ...], Iterable[np.ndarray]]]) -> None:
    """``save_arrays`` for arrays built a chunk of rows at a time: each is given as its dtype,
    shape and chunks, and streamed into the ``.npz``, so no whole array is ever in memory.
    The file is the one ``save_arrays`` would write for the same arrays."""
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as npz:
        for name, (dtype, shape, chunks) in arrays.items():
            with npz.open(f"{name}.npy", "w", force_zip64=True) as f:
                rows = write_npy(f, dtype, shape, chunks)
            if rows != shape[0]:
                raise RuntimeError(f"{path}: array '{name}' got {rows} rows, expected {shape[0]}")


def write_npy(f: BinaryIO, dtype: Any, shape: tuple[int, ...],
              chunks: Iterable[np.ndarray]) -> int:
    """Write an ``.npy`` header for ``shape`` and ``dtype`` to ``f``, then ``chunks`` of rows
    in order; returns the number of rows written."""
    dtype = np.dtype(dtype)
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": tuple(shape)})
    rows = 0
    for chunk in chunks:
        f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        rows += len(chunk)
    return rows


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` written by ``save_arrays``; pickled content is refused."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as err:
        raise PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)") from err
    except (ValueError, OSError) as err:
        raise PipelineError(f"{path}: not a readable array file ({err})") from err
