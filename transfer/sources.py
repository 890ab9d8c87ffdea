"""Where images come from: ``data.source`` turned into a list of labelled files.

Every kind of source ends up as files on disk with a class name and, where the source says
so, a given split: an image-folder root, a pre-split root, a CSV manifest, a torchvision
data set (written out as PNG files) or the built-in digits (likewise). The files go into a
``Catalog`` on disk, so that listing a million files does not take memory for each.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from transfer.artifacts import open_utf8
from transfer.catalog import Catalog, SourceImage
from transfer.data import PARALLEL_MIN_FILES
from transfer.errors import ParamsError, PipelineError, one_line, unprintable
from transfer.layout import RAW_DIR, TORCHVISION_ROOT, outside
from transfer.machine import usable_cores

log = logging.getLogger(__name__)

# Folder and manifest names for each split; a pre-split root holds some of these folders.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
TORCHVISION_PREFIX = "torchvision:"
# A torchvision data set is written out as PNG files that prepare reads once, from a scratch
# folder it then removes: at zlib's fastest level, one process wrote catsdogs photos 3.3x
# faster than at Pillow's default 6, in 5% more bytes; the pixels are the same
# (benchmarks.torchvision_source, docs/data.md).
PNG_LEVEL = 1
SAMPLES_PER_TASK = 64  # samples a writing process writes per task


def generated(source: str) -> bool:
    """Whether ``prepare`` writes the source's files itself: a built-in or torchvision set."""
    return source in BUILTIN_SOURCES or source.startswith(TORCHVISION_PREFIX)


def check_source(source: str) -> None:
    """``data.source`` names what ``prepare`` can read and ``dvc.yaml`` watches: a built-in
    or torchvision set, or an existing path under ``data/raw/``. Anywhere else, ``dvc repro``
    would call the results up to date after its files changed. Else one line saying which."""
    if generated(source):
        return
    path = Path(source)
    if not path.exists():  # a link to nothing included
        tracked = _dvc_file_of(path)
        if tracked is not None:  # a fresh clone, before its data was pulled
            raise PipelineError(f"data.source: '{source}' is tracked by DVC ({tracked}) but "
                                f"not in the workspace; fetch it: dvc pull {tracked}")
        raise ParamsError(f"data.source: '{source}' does not exist{_did_you_mean(source)}; "
                          f"expected {', '.join(map(repr, BUILTIN_SOURCES))}, "
                          f"'{TORCHVISION_PREFIX}<Name>', or a .csv manifest or an "
                          f"image-folder root under {RAW_DIR}/")
    where = outside(path, RAW_DIR)
    if where is not None and where[0] == "linked":
        raise ParamsError(
            f"data.source: '{source}' leads through a link to '{where[1]}', outside "
            f"{RAW_DIR}/: dvc.yaml watches {RAW_DIR}/ but not what its links lead to, so dvc "
            "repro would call the results up to date after those files change; copy the "
            f"files into {RAW_DIR}/ instead of linking them")
    if where is not None:
        folder = where[1].parent if path.suffix.lower() == ".csv" else where[1]  # a manifest's
        raise ParamsError(
            f"data.source: '{source}' is outside {RAW_DIR}/, which dvc.yaml watches for "
            "changes, so dvc repro would call the results up to date after its files change; "
            f"copy it in (e.g. cp -r '{folder}' {RAW_DIR}/{folder.name}, then dvc add "
            f"{RAW_DIR}/{folder.name}) and point data.source there")


def source_root(source: str) -> str | None:
    """The folder the paths of a source's images are relative to: the image-folder root, or
    a manifest's folder; None for the built-in and torchvision sets."""
    if generated(source):
        return None
    return str(Path(source).parent) if Path(source).suffix.lower() == ".csv" else source


def _dvc_file_of(path: Path) -> Path | None:
    """The ``.dvc`` file that tracks ``path`` or a folder above it, if there is one."""
    for tracked in (path, *path.parents):
        if tracked.name and tracked.with_name(f"{tracked.name}.dvc").is_file():
            return tracked.with_name(f"{tracked.name}.dvc")
    return None


def _did_you_mean(source: str) -> str:
    """`` (did you mean 'x'?)`` for the built-in set or the entry of ``data/raw/`` that
    ``source`` looks like a misspelling of (only the entries for a path), or nothing."""
    name = Path(source).name
    candidates = {} if "/" in source else {builtin: builtin for builtin in BUILTIN_SOURCES}
    if RAW_DIR.is_dir():
        candidates.update((p.name, p.as_posix()) for p in RAW_DIR.iterdir()
                          if not p.name.startswith("."))
    close = [candidates[c] for c in candidates if c.casefold() == name.casefold()] or \
        [candidates[c] for c in difflib.get_close_matches(name, list(candidates), n=1)]
    return f" (did you mean '{close[0]}'?)" if close and close[0] != source else ""


def list_source(source: str, scratch: Path) -> Catalog:
    """List the labelled files of ``data.source``; generated sets are written below ``scratch``."""
    if source in BUILTIN_SOURCES:
        BUILTIN_SOURCES[source](scratch / source)
        return list_image_folder(scratch / source)
    if source.startswith(TORCHVISION_PREFIX):
        name = source[len(TORCHVISION_PREFIX):]
        write_torchvision_dataset(name, TORCHVISION_ROOT / name, scratch / name)
        return list_image_folder(scratch / name)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        return list_manifest(path)
    return list_image_folder(path)


def write_digits_image_folder(root: Path) -> None:
    """Write scikit-learn's digits as ``<root>/<digit>/<index>.png``: the form user images take."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 ink intensities; scale to 0..255 grey levels.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        class_dir = root / str(digits.target_names[target])
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(class_dir / f"{index:04d}.png")


# Data sets that ship inside a package: name -> function writing it as an image folder.
BUILTIN_SOURCES: dict[str, Callable[[Path], None]] = {"digits": write_digits_image_folder}


def list_image_folder(root: Path) -> Catalog:
    """List ``<root>/<class>/**``, or ``<root>/<split>/<class>/**`` when folders name splits.

    The layout decides: a pre-split root holds only split folders (``train/`` and at least
    one more, or ``train/`` alone); a root that also holds other folders is a class-folder
    root, whose classes may be called ``train`` or ``test`` like any other.
    """
    folders = _subfolders(root)
    split_folders = {p.name: SPLIT_ALIASES[p.name.lower()] for p in folders
                     if p.name.lower() in SPLIT_ALIASES}
    pre_split = bool(split_folders) and len(split_folders) == len(folders) and \
        (len(split_folders) >= 2 or "train" in split_folders.values())
    catalog = Catalog()
    # Files beside the class folders (a README, an image not filed under a class) have no
    # label: reported as skipped, not read.
    loose = _files_in(root) + [path for folder in folders if pre_split
                               for path in _files_in(folder)]
    if pre_split:
        if "train" not in split_folders.values():
            raise PipelineError(f"data.source: '{root}' looks pre-split "
                                f"({', '.join(sorted(split_folders))}) but has no train/ folder")
        if len(set(split_folders.values())) < len(split_folders):
            raise PipelineError(f"data.source: '{root}' has two folders for one split: "
                                f"{', '.join(sorted(split_folders))}")
        for folder in folders:
            _list_class_folders(root, folder, split_folders[folder.name], catalog)
    else:
        others = sorted(p.name for p in folders if p.name not in split_folders)
        if split_folders and others:
            log.warning("data.source '%s': %s read as classes, like the folders beside them "
                        "(%s); a pre-split root holds nothing but split folders", root,
                        ", ".join(sorted(split_folders)), ", ".join(others))
        _list_class_folders(root, root, None, catalog)
    if not len(catalog) and not catalog.skipped:
        raise PipelineError(f"data.source: '{root}' holds no files in class sub-folders; "
                            "expected <root>/<class>/<images> or <root>/<split>/<class>/<images>")
    for path in loose:
        catalog.skip(_shown(path.relative_to(root).as_posix()),
                     "not in a class folder, so it has no label")
    manifests = [path.name for path in _files_in(root) if path.suffix.lower() == ".csv"]
    if manifests:
        log.warning("data.source '%s' is read as an image-folder root; to read %s as a "
                    "manifest, point data.source at it ('%s')", root, manifests[0],
                    (root / manifests[0]).as_posix())
    return catalog


def _subfolders(root: Path) -> list[Path]:
    if not root.is_dir():
        what = "is not a directory" if os.path.lexists(root) else "does not exist"
        raise PipelineError(f"data.source: '{root}' {what}; expected 'digits', "
                            "'torchvision:<Name>', a .csv manifest or an image-folder root")
    return [p for p in _visible_entries(root) if p.is_dir()]


def _files_in(folder: Path) -> list[Path]:
    """The visible files directly in ``folder`` (not in its sub-folders), sorted."""
    return [p for p in _visible_entries(folder) if p.is_file()]


def _visible_entries(folder: Path) -> list[Path]:
    """What ``folder`` holds directly, hidden entries left out, sorted."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise PipelineError(f"data.source: cannot read '{folder}' ({err.strerror})") from err


def walk_visible_files(folder: Path, passed: Callable[[Path, str], None] | None = None, *,
                       link_hint: str = "copy the folder into the data instead",
                       lenient: bool = False) -> Iterator[Path]:
    """Every file below ``folder``, in the order folders list them, skipping hidden files and
    folders and not following links to folders; ``passed(path, why)`` hears of every other
    visible entry left out (a link to a folder or to nothing, a pipe), ``link_hint`` saying
    what to do about a link to a folder. A folder that cannot be read stops the walk, or with
    ``lenient`` is passed too (below ``folder``). Entries are read one at a time, so a folder
    of a million files costs no memory (``glob`` lists each folder whole)."""

    def walk(path: Path) -> Iterator[Path]:
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    kind, why = _kind_of(entry, link_hint)
                    if kind == "folder":
                        yield from walk(Path(entry.path))
                    elif kind == "file":
                        yield Path(entry.path)
                    elif passed is not None:
                        passed(Path(entry.path), why)
        except OSError as err:
            if not (lenient and passed is not None and path != folder):
                elsewhere = "" if lenient else " or move it out of the data"
                raise PipelineError(f"cannot read folder '{path}' ({err.strerror}); fix its "
                                    f"permissions{elsewhere}") from err
            passed(path, f"cannot read this folder ({err.strerror})")

    return walk(folder)


def _kind_of(entry: os.DirEntry, link_hint: str) -> tuple[str, str]:
    """``("folder", "")``, ``("file", "")`` or ``("other", why it is left out)``: a link to
    nothing, to a folder or to itself, a pipe, or an entry that cannot be looked at."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "folder", ""
        if entry.is_file():
            return "file", ""
        if entry.is_symlink():
            if entry.is_dir():
                return "other", f"a link to a folder (not followed: {link_hint})"
            return "other", "a link to nothing (its target is gone)"
        return "other", "not a regular file (a pipe, socket or device)"
    except OSError as err:  # a link that leads to itself, a target it may not look at
        return "other", f"cannot be read ({err.strerror})"


def _list_class_folders(root: Path, parent: Path, split: str | None, catalog: Catalog) -> None:
    resolved_root = root.resolve()

    def passed(path: Path, why: str) -> None:
        catalog.skip(_shown(path.relative_to(root).as_posix()), why)

    for class_dir in _subfolders(parent):
        label = check_label(class_dir.name, f"data.source: class folder '{class_dir}'",
                            "rename the folder")
        if not _is_inside(class_dir, resolved_root):
            raise PipelineError(f"data.source: class folder '{class_dir}' is a link to "
                                f"'{class_dir.resolve()}', outside the data root '{root}'; "
                                "copy the folder into the data root or remove the link")
        before = len(catalog), len(catalog.skipped)
        for path in walk_visible_files(class_dir, passed):
            relative = path.relative_to(root).as_posix()
            if not _is_inside(path, resolved_root):
                # `dvc add` would follow the link and put the file it points to in the cache
                # (and `dvc push` would upload it): refuse rather than skip.
                raise PipelineError(f"data.source: '{path}' is a link to '{path.resolve()}', "
                                    f"outside the data root '{root}'; copy the file into the "
                                    "data root or remove the link")
            if unprintable(relative):
                catalog.skip(_shown(relative), "the file name is not UTF-8 or holds a control "
                                               "character; rename the file")
                continue
            catalog.add(SourceImage(relative, path, label, split))
        if (len(catalog), len(catalog.skipped)) == before:
            log.warning("data.source: class folder '%s' holds no files, so it is no class",
                        class_dir)


def check_label(label: str, where: str, fix: str) -> str:
    """``label`` if it can name a class in every report, table and picture; else a one-line
    error naming ``where`` the label comes from and saying how to ``fix`` it. Every source's
    labels pass through here."""
    bad = unprintable(label)
    if bad:
        what = "bytes that are not UTF-8" if any(0xD800 <= ord(c) <= 0xDFFF for c in bad) \
            else f"the control character {bad[0]!r}"
        raise PipelineError(f"{where}: the class name {_shown(label)!r} holds {what}; {fix}")
    return label


def _shown(name: str) -> str:
    """``name`` as it can be printed and stored: bytes that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_inside(path: Path, resolved_root: Path) -> bool:
    return path.resolve().is_relative_to(resolved_root)


def list_manifest(manifest: Path) -> Catalog:
    """List a CSV manifest with columns ``path,label[,split]``, paths relative to the manifest."""
    if not manifest.is_file():
        raise PipelineError(f"data.source: manifest '{manifest}' does not exist")
    root = manifest.parent.resolve()
    catalog = Catalog()
    with open_utf8(manifest, newline="") as f:
        reader = csv.DictReader(f)
        try:
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns or "label" not in columns:
                raise PipelineError(f"{manifest}: header must name the columns "
                                    f"path,label[,split]; found: {','.join(columns) or 'nothing'}")
            reader.fieldnames = columns
            for row in reader:
                _list_manifest_row(manifest, reader.line_num, row, root, catalog)
        except csv.Error as err:
            line = reader.reader.line_num  # the row that failed; DictReader's counts parsed rows
            raise PipelineError(f"{manifest} line {line}: not a valid CSV row ({err})") from err
    if not len(catalog) and not catalog.skipped:
        raise PipelineError(f"{manifest}: the manifest lists no images")
    return catalog


def _list_manifest_row(manifest: Path, line: int, row: dict[str, str | None], root: Path,
                       catalog: Catalog) -> None:
    written, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split = _manifest_split(manifest, line, (row.get("split") or "").strip())
    if not written or not label:
        raise PipelineError(f"{manifest} line {line}: every row needs a path and a label")
    check_label(label, f"{manifest} line {line}", "edit the label")
    path = root / written
    try:
        if Path(written).is_absolute() or not _is_inside(path, root):
            catalog.skip(written, "escapes the data root (the manifest's folder)")
        elif not path.is_file():
            catalog.skip(written, "does not exist")
        else:
            catalog.add(SourceImage(written, path, label, split))
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
        catalog.skip(written, f"cannot be read ({getattr(err, 'strerror', None) or err})")


def _manifest_split(manifest: Path, line: int, value: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_ALIASES:
        raise PipelineError(f"{manifest} line {line}: split '{value}' is not one of "
                            f"{', '.join(SPLIT_ALIASES)} (or empty)")
    return SPLIT_ALIASES[value.lower()]


def write_torchvision_dataset(name: str, root: Path, out: Path,
                              workers: int | None = None) -> None:
    """Write torchvision data set ``name``, read from ``root``, as ``out/<split>/<class>/*.png``,
    on ``workers`` processes (every core by default)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torchvision.datasets.VisionDataset)):
        import difflib

        known = [n for n in torchvision.datasets.__all__ if n[0].isupper()]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise PipelineError(f"data.source: torchvision has no data set '{name}'; {hint}")
    workers = workers or usable_cores()
    for split, dataset, kwargs in _torchvision_splits(cls, name, root):
        chunks = [range(start, min(start + SAMPLES_PER_TASK, len(dataset)))
                  for start in range(0, len(dataset), SAMPLES_PER_TASK)]
        with tqdm(total=len(dataset), desc=f"{name} {split}", unit="img", leave=False,
                  disable=None) as bar:
            if workers <= 1 or len(dataset) < PARALLEL_MIN_FILES:
                for chunk in chunks:
                    bar.update(_write_samples(dataset, chunk, out / split))
                continue
            # Each worker opens the data set once (from its files, not a pickled copy of its
            # arrays) and writes ranges of its samples; Ctrl-C is left to this process.
            with ProcessPoolExecutor(workers, initializer=_open_in_worker,
                                     initargs=(cls, kwargs)) as pool:
                tasks = [pool.submit(_write_in_worker, chunk, out / split) for chunk in chunks]
                try:
                    for task in as_completed(tasks):
                        bar.update(task.result())
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise


def _write_samples(dataset: Any, indices: range, folder: Path) -> int:
    """Write samples ``indices`` of ``dataset`` as ``folder/<class>/<index>.png``."""
    classes = getattr(dataset, "classes", None)
    for index in indices:
        try:
            image, target = dataset[index]
        except Exception as err:  # a damaged file of the data set: whatever its loader raises
            raise PipelineError(f"data.source: torchvision:{type(dataset).__name__}, "
                                f"{folder.name} sample {index} cannot be read: "
                                f"{one_line(str(err))}") from err
        label = str(classes[target]) if classes is not None else str(target)
        class_dir = folder / label.replace("/", "_")
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{index:06d}.png", compress_level=PNG_LEVEL)
    return len(indices)


_worker_dataset: Any = None  # the data set a writing worker process opened


def _open_in_worker(cls: type, kwargs: dict[str, Any]) -> None:
    global _worker_dataset
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_dataset = cls(**kwargs)


def _write_in_worker(indices: range, folder: Path) -> int:
    return _write_samples(_worker_dataset, indices, folder)


def _torchvision_splits(cls: type, name: str, root: Path
                        ) -> list[tuple[str, Any, dict[str, Any]]]:
    """Instantiate every split the data set offers, without downloading anything: each
    split's name, data set and the arguments that opened it."""
    parameters = inspect.signature(cls.__init__).parameters
    if "split" in parameters:
        attempts = [("train", {"split": "train"}), ("train", {"split": "trainval"}),
                    ("val", {"split": "val"}), ("test", {"split": "test"})]
    elif "train" in parameters:
        attempts = [("train", {"train": True}), ("test", {"train": False})]
    else:
        attempts = [("train", {})]
    kwargs = {"root": str(root)} if "root" in parameters else {}
    if "download" in parameters:
        kwargs["download"] = False
    splits: dict[str, tuple[Any, dict[str, Any]]] = {}
    for split, extra in attempts:
        if split in splits:
            continue
        try:
            splits[split] = cls(**kwargs, **extra), {**kwargs, **extra}
        except ValueError:  # this data set has no such split
            continue
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise PipelineError(f"data.source: torchvision:{name} is not on disk and cannot be "
                                f"downloaded here. {_placement_hint(cls, name, root)}") from err
    if "train" not in splits:
        raise PipelineError(f"data.source: torchvision:{name} offers no training split")
    return [(split, *splits[split]) for split in ("train", "val", "test") if split in splits]


def _placement_hint(cls: type, name: str, root: Path) -> str:
    files: list[str] = []
    if hasattr(cls, "url") and hasattr(cls, "filename"):
        files.append(f"{cls.filename} (from {cls.url})")
    for resource in getattr(cls, "resources", []) or []:
        files.append(str(resource[0]).rsplit("/", 1)[-1])
    for url, _md5 in getattr(cls, "_RESOURCES", []) or []:
        files.append(f"{url.rsplit('/', 1)[-1]} (from {url})")
    for filename, _md5 in (getattr(cls, "_file_dict", {}) or {}).values():
        prefix = getattr(cls, "_download_url_prefix", "")
        files.append(f"{filename} (from {prefix}{filename})")
    if hasattr(cls, "_URL"):
        files.append(f"{cls._URL.rsplit('/', 1)[-1]} (from {cls._URL})")
    wanted = f"its files ({'; '.join(files)})" if files else "its files"
    return (f"On a machine with network, run torchvision.datasets.{name}(root='{root}', "
            f"download=True) and copy {wanted} with the folder layout it creates into "
            f"'{root}/', then `dvc add {root}`")
