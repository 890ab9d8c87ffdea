"""From listed files to the prepared store: decode once, check, de-duplicate, split, store.

The store holds, per split, ``<split>.bin`` (every image's RGB uint8 pixels, concatenated,
read image by image) and ``<split>.npz`` (offset, shape, label, id and content hash per
image), plus ``meta.json`` (classes, the stored size, the training split's channel mean and
std). Nothing in ``meta.json`` or the train and val files depends on the test split, so that
curating test images leaves fine-tuning's inputs, and so the fine-tuned model, as they were
(``dvc.yaml`` makes finetune depend on those files alone; the counts are in
``reports/data.json``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import operator
import os
import shutil
import signal
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from transfer.artifacts import (
    atomic_output,
    load_arrays,
    read_json,
    save_arrays_streamed,
    write_json,
)
from transfer.catalog import SPLITS, STORE_OFFSET, Catalog, DecodedFile
from transfer.curation import Curation, content_id, is_content_id, not_a_class
from transfer.errors import PipelineError
from transfer.machine import usable_cores
from transfer.pixels import fit_short_side

log = logging.getLogger(__name__)

# Images whose shorter side is below this are reported: they will be upscaled a lot.
SMALL_SIDE = 32
# Transparent pixels are composited over this background so that RGBA, LA and P images with
# transparency all turn into the same RGB image.
BACKGROUND_RGB = (255, 255, 255)
# Larger files are not read as images: 512 MiB holds the largest image Pillow decodes
# (2 x Image.MAX_IMAGE_PIXELS) as uncompressed 8-bit RGB.
MAX_IMAGE_BYTES = 512 * 2**20
# Rows of a 16-bit or float image converted to 8 bits at a time.
GREY_ROWS = 256
# Below this many files, starting worker processes costs more than it saves.
PARALLEL_MIN_FILES = 64
# The formats read: Pillow's name for each, and the one users know (JPEG includes the
# multi-picture JPEGs cameras write, PPM the whole PBM/PGM/PPM family; AVIF needs a Pillow
# built with it). No other of Pillow's decoders is ever offered a file: its EPS reader runs
# Ghostscript, and the rarely used ones are where decoders break.
IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP",
                 "TIFF": "TIFF", "PPM": "PNM", "AVIF": "AVIF"}


def read_image_file(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file at ``path``, read only when it is a regular file of at most
    ``limit`` bytes (a device such as ``/dev/zero``, a pipe or a huge file is never read).

    Raises ``ValueError`` with a short reason for what is not read, ``OSError`` when reading
    fails.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file (a folder, device, pipe or socket)")
    too_large = ValueError(f"larger than {limit // 2**20} MiB (not read)")
    if info.st_size > limit:
        raise too_large
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # the file may have grown since
    if len(data) > limit:
        raise too_large
    return data


def formats_read() -> list[str]:
    """The formats of ``IMAGE_FORMATS`` the installed Pillow reads, by Pillow's names."""
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy image over ``data`` (its header read, its pixels not yet), for the
    formats of ``formats_read`` only: anything else is ``UnidentifiedImageError``."""
    return Image.open(io.BytesIO(data), formats=formats_read())


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB image with its EXIF orientation applied.

    Raises ``ValueError`` with a short reason when the bytes are not a readable image.
    """
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: not actionable
            with open_image(data) as image:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                rgb = _to_rgb(image)
    except UnidentifiedImageError as err:
        names = [IMAGE_FORMATS[name] for name in formats_read()]
        raise ValueError(f"not an image (content not recognised as {', '.join(names[:-1])} "
                         f"or {names[-1]})") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"too many pixels to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"truncated or corrupt image ({err})") from err
    except Exception as err:  # Pillow's decoders raise many types on bad bytes (fuzzing found
        # NotImplementedError and TypeError): each means the same, a file that is not an image

        raise ValueError(f"truncated or corrupt image ({type(err).__name__}: {err})") from err
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the full range down to 8 bits instead of clipping,
        # a band of rows at a time (in float64 a whole 50-megapixel image took gigabytes).
        array = np.asarray(image)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.empty(array.shape, dtype=np.uint8)
        for top in range(0, len(array), GREY_ROWS):
            band = array[top:top + GREY_ROWS].astype(np.float64)
            grey[top:top + GREY_ROWS] = np.clip(np.round(band * (255.0 / peak)), 0, 255)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_file(path: Path, short_side: int, staging_dir: Path) -> DecodedFile:
    """Read and decode one file, appending its pixels to this process's staging file.

    Never raises for bad content: a skipped file comes back with its reason. This is the
    entry point of the decoding worker processes.
    """
    try:
        data = read_image_file(path)
    except OSError as err:
        return DecodedFile(reason=f"cannot read ({err.strerror})")
    except ValueError as err:
        return DecodedFile(reason=str(err))
    byte_sha = hashlib.sha256(data).hexdigest()
    try:
        rgb = decode_image(data)
    except ValueError as err:
        return DecodedFile(byte_sha256=byte_sha, reason=str(err))
    # Identity is the decoded full-size pixels, so a PNG and a BMP of one picture match.
    pixel_sha = pixels_sha256(rgb.width, rgb.height, rgb.tobytes())
    array = np.asarray(fit_short_side(rgb, short_side), dtype=np.uint8)
    channels = array.reshape(-1, 3)
    histogram = np.stack([np.bincount(channels[:, c], minlength=256) for c in range(3)])
    levels = np.arange(256, dtype=np.int64)
    staging_file = f"{os.getpid()}.bin"
    with open(staging_dir / staging_file, "ab") as f:
        offset = f.tell()
        f.write(array.tobytes())
    return DecodedFile(staging_file=staging_file, offset=offset, shape=array.shape[:2],
                       original_size=rgb.size,
                       pixel_sha256=pixel_sha, byte_sha256=byte_sha,
                       stored_sha256=stored_pixels_sha256(array),
                       channel_sums=tuple(int(v) for v in histogram @ levels),
                       channel_squares=tuple(int(v) for v in histogram @ levels**2))


def decode_files(paths: Sequence[Path], short_side: int,
                 staging_dir: Path) -> list[DecodedFile]:
    """``decode_file`` for each of ``paths``: one task for a decoding worker."""
    return [decode_file(path, short_side, staging_dir) for path in paths]


def decode_all(paths: Iterable[Path], total: int, short_side: int, staging_dir: Path,
               workers: int | None = None) -> Iterator[DecodedFile]:
    """Decode ``paths`` (``total`` of them) in order, on every core, with a progress bar.

    Only a few chunks per worker are in flight at a time, so memory does not grow with the
    number of files (``Executor.map`` would submit them all at once).
    """
    workers = workers or usable_cores()
    progress = {"desc": "decode", "unit": "img", "total": total, "leave": False,
                "disable": None}  # no bar, and no cursor escapes, where stderr is not a terminal
    if workers <= 1 or total < PARALLEL_MIN_FILES:
        yield from tqdm(map(decode_file, paths, repeat(short_side), repeat(staging_dir)),
                        **progress)
        return
    chunk_size = max(1, min(32, total // (workers * 8)))
    paths = iter(paths)
    chunks = iter(lambda: list(islice(paths, chunk_size)), [])
    pending: deque[Future[list[DecodedFile]]] = deque()
    # Ctrl-C reaches every process of the terminal's group: the workers leave it to this one,
    # which stops them without waiting for the chunks still queued.
    with ProcessPoolExecutor(max_workers=workers, initializer=signal.signal,
                             initargs=(signal.SIGINT, signal.SIG_IGN)) as pool, \
            tqdm(**progress) as bar:

        def oldest() -> list[DecodedFile]:
            results = pending.popleft().result()
            bar.update(len(results))
            return results

        try:
            for chunk in chunks:
                pending.append(pool.submit(decode_files, chunk, short_side, staging_dir))
                while len(pending) > 4 * workers or (pending and pending[0].done()):
                    yield from oldest()
            while pending:
                yield from oldest()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def pixels_sha256(width: int, height: int, data: bytes | memoryview) -> str:
    """The SHA-256 (hex) of RGB pixels (``data``, row by row) and of their size."""
    digest = hashlib.sha256(f"{width}x{height}:".encode())
    digest.update(data)
    return digest.hexdigest()


def stored_pixels_sha256(pixels: np.ndarray) -> str:
    """``pixels_sha256`` of uint8 ``(H, W, 3)`` pixels as the store holds them: what the
    embedding store keys an image's embedding by, computed once here by ``prepare``."""
    return pixels_sha256(pixels.shape[1], pixels.shape[0],
                         np.ascontiguousarray(pixels, dtype=np.uint8).data)


def split_fraction(seed: int, purpose: str, pixel_sha256: str) -> float:
    """A number in [0, 1) fixed by the seed and the image content alone."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{pixel_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(fraction: float, given: str | None, given_splits: set[str],
                 val_size: float, test_size: float) -> str:
    """The split of one image: its given one, else decided by where ``fraction`` falls.

    The first ``test_size`` of [0, 1) is test, the next ``val_size`` is val, the rest train. An
    image given as train is carved into val or test only when the source gives no such split.
    Adding images never changes an existing image's split.
    """
    natural = "test" if fraction < test_size else "val" if fraction < test_size + val_size \
        else "train"
    if given is None:
        return natural
    if given == "train" and natural not in given_splits:
        return natural
    return given


def prepare_store(catalog: Catalog, out_dir: Path, *, source: str, short_side: int,
                  val_size: float, test_size: float, seed: int, min_per_class: int,
                  max_per_class: int | None, curation: Curation | None = None,
                  workers: int | None = None) -> dict:
    """Decode, check, de-duplicate and split the files of ``catalog`` into the store at
    ``out_dir``, leaving out and relabelling the images ``curation`` names.

    Returns the data report. Fails, leaving no store, when a class ends up with fewer than
    ``min_per_class`` images or a split ends up empty.
    """
    classes = catalog.classes()
    _check_class_count(classes, source, "found")
    curation = curation or Curation()
    for entry in curation.relabel:  # what a path shows already stops before the decoding
        if entry.label not in classes and not is_content_id(entry.image) \
                and catalog.matching(entry.image):
            raise not_a_class(entry, classes)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        staging = tmp / "staging"
        staging.mkdir()
        decoded_files = decode_all(catalog.ranked_paths(), len(catalog), short_side, staging,
                                   workers)
        for rank, decoded in enumerate(decoded_files, start=1):
            catalog.record(rank, decoded, small=0 < min(decoded.original_size) < SMALL_SIDE)
        curated = {
            "exclude": {"file": curation.exclude_file, "entries": len(curation.exclude),
                        **catalog.exclude(curation.exclude)},
            "relabel": {"file": curation.relabel_file, "entries": len(curation.relabel),
                        **catalog.relabel(curation.relabel, classes)}}
        catalog.find_duplicates()
        small_count, small = catalog.small_images(limit=100)
        conflicts = catalog.exclude_conflicts()
        _check_class_sizes(catalog.kept_per_class(), classes, min_per_class,
                           catalog.left_out())
        left_out = 0
        if max_per_class is not None:
            left_out = catalog.cap_per_class(
                max_per_class, lambda sha: split_fraction(seed, "cap", sha))
        given_splits = catalog.given_splits()
        totals = catalog.assign_splits(lambda sha, given: assign_split(
            split_fraction(seed, "split", sha), given, given_splits, val_size, test_size))
        for split, n in totals.items():
            if n:
                continue
            if given_splits and split not in given_splits:  # carved from the given train/
                carved = sum(totals[s] for s in totals if s == "train" or s not in given_splits)
                raise PipelineError(
                    f"split '{split}' ends up empty: the source gives no {split} folder or "
                    f"rows, so it is carved from its {carved} usable training images "
                    f"(data.{split}_size={val_size if split == 'val' else test_size} of "
                    f"them), and none fell there; add images, give that split, or raise "
                    f"data.{split}_size")
            raise PipelineError(f"split '{split}' ends up empty ({sum(totals.values())} "
                                f"usable images, data.val_size={val_size}, "
                                f"data.test_size={test_size}); add images or give that "
                                "split a larger share")
        counts = catalog.split_counts(classes)
        _check_class_count([name for name, n in counts["train"].items() if n], source,
                           "with a training image")
        _write_splits(catalog, classes, staging, tmp, totals)
        mean, std = _channel_statistics(*catalog.pixel_sums("train"))
        shutil.rmtree(staging)
        write_json(tmp / "meta.json", {
            "source": source, "classes": classes, "short_side": short_side,
            "train_mean": mean, "train_std": std,
            "pixel_format": "RGB uint8, row-major (H, W, 3), images concatenated per split"})
    return {
        "source": source,
        "classes": classes,
        "totals": totals,
        "counts": counts,
        "missing_from_split": {split: [name for name, n in per_class.items() if n == 0]
                               for split, per_class in counts.items()
                               if any(n == 0 for n in per_class.values())},
        "train_mean": mean,
        "train_std": std,
        "left_out_by_max_per_class": left_out,
        "small_images": {"min_side_below": SMALL_SIDE, "count": small_count, "paths": small},
        "skipped": catalog.left_out(),
        "duplicates": catalog.duplicates(),
        "conflicts": conflicts,
        "curation": curated,
    }


def _check_class_count(classes: Sequence[str], source: str, which: str) -> None:
    """A classifier needs two classes to tell apart: stop early, naming the one there is."""
    if len(classes) < 2:
        found = f"one class {which} ('{classes[0]}')" if classes else f"no class {which}"
        raise PipelineError(f"data.source '{source}': {found}; a classifier needs at least "
                            "two classes (two class folders, or two labels in the manifest)")


def _check_class_sizes(per_class: dict[str, int], classes: Sequence[str], min_per_class: int,
                       skipped: Sequence[dict[str, str]] = ()) -> None:
    """Stop where a class has too few usable images; the files skipped (which the report,
    not written then, would have listed) are counted in the message, the first named."""
    short = [f"'{name}' ({per_class.get(name, 0)})" for name in classes
             if per_class.get(name, 0) < min_per_class]
    if short:
        subject = f"class {short[0]} has" if len(short) == 1 else \
            f"classes {', '.join(short)} have"
        note = f" ({len(skipped)} file{'s' * (len(skipped) != 1)} of the source skipped, the " \
            f"first {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise PipelineError(f"{subject} fewer usable images than "
                            f"data.min_per_class={min_per_class}{note}; add images, remove the "
                            "class folder, or lower data.min_per_class")


def _channel_statistics(pixels: int, sums: Sequence[int],
                        squares: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on a 0..1 scale, from the pixel count and the sums of the
    channel values and of their squares."""
    mean = np.asarray(sums, dtype=np.float64) / 255.0 / pixels
    squares = np.asarray(squares, dtype=np.float64) / 255.0**2
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _write_splits(catalog: Catalog, classes: Sequence[str], staging: Path, out: Path,
                  totals: dict[str, int]) -> None:
    """Copy each split's pixels out of the staging files, then write its index.

    Plain reads, not a memory map: mapped pages would count against this process's memory.
    The index is streamed from the catalog into the ``.npz``, a page of images at a time.
    """
    label_of = {name: i for i, name in enumerate(classes)}
    sources = {path.name: open(path, "rb") for path in staging.iterdir()}  # noqa: SIM115
    for split, n in totals.items():
        with open(out / f"{split}.bin", "wb") as f:
            for staging_file, offset, size in catalog.stored(split, "staging_file", "offset",
                                                             "height * width * 3"):
                source = sources[staging_file]
                source.seek(offset)
                f.write(source.read(size))
        save_arrays_streamed(out / f"{split}.npz", {
            "offsets": (np.int64, (n,), _pages(catalog.stored(split, STORE_OFFSET))),
            "shapes": (np.int32, (n, 2), _pages(catalog.stored(split, "height", "width"),
                                                value=tuple)),
            "labels": (np.int64, (n,), _pages(catalog.stored(split, "label"),
                                              value=lambda row: label_of[row[0]])),
            "ids": (f"<U{catalog.longest_id(split)}", (n,), _pages(catalog.stored(split, "id"))),
            "sha256": ("S64", (n,), _pages(catalog.stored(split, "pixel_sha256"))),
            "stored_sha256": ("S64", (n,), _pages(catalog.stored(split, "stored_sha256")))})
    for source in sources.values():
        source.close()


def _pages(rows: Iterator[tuple], value: Callable[[tuple], Any] = operator.itemgetter(0),
           size: int = 1024) -> Iterator[np.ndarray]:
    """``value`` of each of ``rows`` (by default its first column), as arrays of up to ``size``."""
    while page := list(islice(rows, size)):
        yield np.asarray([value(row) for row in page])


class ImageStore:
    """One split of a prepared store: ``store[i]`` is an RGB uint8 (H, W, 3) array."""

    def __init__(self, directory: str | Path, split: str) -> None:
        directory = Path(directory)
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        self.meta = read_json(directory / "meta.json")
        index = load_arrays(directory / f"{split}.npz")
        classes = self.meta.get("classes") if isinstance(self.meta, dict) else None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise PipelineError(f"{directory}/meta.json: no list of class names; re-run: dvc "
                                "repro prepare")
        self.classes: list[str] = classes
        self.labels: np.ndarray = index.get("labels")
        self.ids: np.ndarray = index.get("ids")
        self._sha256 = index.get("sha256")
        self._stored_sha256 = index.get("stored_sha256")
        self._offsets = index.get("offsets")
        self._shapes = index.get("shapes")
        # Positional reads, not a memory map: reading every image once must not leave the
        # whole store counted in this process's memory.
        try:
            self._fd = os.open(directory / f"{split}.bin", os.O_RDONLY)
        except FileNotFoundError as err:
            raise PipelineError(f"{directory}/{split}.bin: missing; run the stage that writes "
                                "it (dvc repro)") from err
        if not self._index_fits(os.fstat(self._fd).st_size):
            raise PipelineError(f"{directory}/{split}.npz does not describe {split}.bin (an "
                                "array missing, of the wrong shape, or past its end); re-run: "
                                "dvc repro prepare")

    def _index_fits(self, size: int) -> bool:
        """Whether the index names, for each image, a label and pixels inside the ``.bin``."""
        arrays = (self.labels, self.ids, self._offsets, self._shapes)
        if any(a is None for a in arrays):
            return False
        n = len(self.labels) if self.labels.ndim == 1 else -1
        if self.ids.shape != (n,) or self._offsets.shape != (n,) or \
                self._shapes.shape != (n, 2) or \
                any(a.dtype.kind not in "iu" for a in (self.labels, self._offsets, self._shapes)):
            return False
        offsets, shapes = self._offsets.astype(np.int64), self._shapes.astype(np.int64)
        # Bounded before adding up, so no sum can wrap around.
        if not (np.all((shapes > 0) & (shapes <= min(size, 2**24))) and
                np.all((offsets >= 0) & (offsets <= size))):
            return False
        ends = offsets + np.prod(shapes, axis=1) * 3
        return bool(np.all(ends <= size) and np.all(self.labels >= 0) and
                    np.all(self.labels < len(self.classes)))

    def stored_digests(self) -> np.ndarray | None:
        """Each image's ``stored_pixels_sha256`` (hex, as bytes) as ``prepare`` recorded it, or
        None for a store without them."""
        digests = self._stored_sha256
        if digests is None or digests.shape != self.ids.shape or digests.dtype != "S64":
            return None
        return digests

    def content_ids(self) -> list[str]:
        """Each image's id from its content (``transfer.curation.content_id``)."""
        if self._sha256 is None or self._sha256.shape != self.ids.shape:
            raise PipelineError("the prepared store has no pixel hashes; re-run: dvc repro "
                                "--force prepare")
        return [content_id(sha.decode("ascii")) for sha in self._sha256]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self._shapes[i])
        data = os.pread(self._fd, h * w * 3, int(self._offsets[i]))
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))
