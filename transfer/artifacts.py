"""Reading and writing the pipeline's files: outputs atomically and without pickle, text as UTF-8.

Every output is written to a temporary sibling and moved into place with ``os.replace``, so a
killed stage never leaves a partial file that looks complete; a stage with several outputs
moves them into place together, once all are written. Temporaries and scratch folders carry
the id of their process, so the next run removes those a killed one left behind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from transfer.errors import PipelineError, first_line

# What NumPy raises for an .npy or .npz file that is truncated, damaged or not one at all (a
# zip archive's own errors included: an unsupported version is a NotImplementedError).
DAMAGED_ARRAY_FILE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
                      NotImplementedError)


@contextlib.contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``paths``; when the block succeeds they replace
    ``paths`` all together (Ctrl-C waits until they have), else they vanish.

    Works for files and for directories (the caller creates what it needs at the yielded paths).
    A path that is already a temporary of this process is written in place: the output it
    belongs to is replaced when the outer block ends.
    """
    paths = [Path(path) for path in paths]
    temps = [path if _is_own_temporary(path) else _temporary(path, "tmp") for path in paths]
    try:
        yield temps
        with _interrupts_deferred():
            for path, tmp in zip(paths, temps, strict=True):
                if tmp != path:
                    _replace(tmp, path)
    finally:
        for path, tmp in zip(paths, temps, strict=True):
            if tmp != path:
                _remove(tmp)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it vanishes.

    Works for files and for directories (the caller creates what it needs at the yielded path).
    """
    with atomic_outputs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def scratch_directory(beside: str | Path) -> Iterator[Path]:
    """An empty folder for temporary files, next to ``beside`` (``.<name>.scratch-<pid>``),
    removed afterwards; the next run removes one that a killed run left behind."""
    scratch = _temporary(Path(beside), "scratch")
    scratch.mkdir()
    try:
        yield scratch
    finally:
        _remove(scratch)


def _temporary(path: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>`` beside ``path``, not there yet; stale ones are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{kind}-{os.getpid()}")
    _remove(tmp)
    return tmp


def _is_own_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(f".tmp-{os.getpid()}")


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back while the block runs, then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set, and only run, in the main thread
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not received:
        return
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt("interrupted after the outputs were written")
    if callable(previous):
        previous(signal.SIGINT, None)
    elif previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a process that was killed (kill -9, power loss);
    those of live processes stay."""
    for sibling in path.parent.glob(f".{path.name}.*-*"):
        kind, _, rest = sibling.name[len(path.name) + 2:].partition("-")
        pid = rest.partition(".")[0]  # also a temporary's own side files: .x.tmp-<pid>.data
        if kind in ("tmp", "old", "scratch") and pid.isdigit() and not _alive(int(pid)):
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
    """Remove a file, link or folder; one that another process removes first is no error (two
    runs sharing a folder both clear a killed run's temporaries)."""
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(FileNotFoundError):  # the other one finishes the job
            shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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


def write_files(contents: Mapping[str | Path, str | bytes]) -> None:
    """Write each path's content (text as UTF-8), all files or none (``atomic_outputs``)."""
    with atomic_outputs(*contents) as temps:
        for tmp, content in zip(temps, contents.values(), strict=True):
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Dict rows (all with the same keys) as CSV with a header line."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    write_files({path: json_text(obj)})


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
    write_files({path: csv_text(rows)})


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
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("one bare array, not an archive of named arrays")
        with loaded as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as err:
        raise PipelineError(f"{path}: missing; run the stage that writes it (dvc repro)") from err
    except DAMAGED_ARRAY_FILE as err:
        raise PipelineError(f"{path}: not a readable array file ({first_line(err)})") from err
