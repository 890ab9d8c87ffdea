"""Images in: the built-in data set, image-folder sources, decoding, splitting, the prepared store.

The prepared store is a directory of three files, whatever the number of images:
``pixels.bin`` (every image's RGB uint8 pixels, concatenated, memory-mapped on read),
``index.npz`` (offset, shape, label, split, id and content hash per image) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages.artifacts import atomic_output, load_arrays, read_json, save_arrays, write_json
from stages.errors import PipelineError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Folder names that mark a root as already split, not as classes.
TRAIN_FOLDERS = {"train", "training"}
HELD_OUT_FOLDERS = {"val", "valid", "validation", "test", "testing"}
# Transparent pixels are composited over this background so that RGBA, LA and P images with
# transparency all turn into the same RGB image.
BACKGROUND_RGB = (255, 255, 255)


@dataclass(frozen=True)
class LabelledFile:
    """One image file of a source, with its class name and an id relative to the source root."""

    path: Path
    label: str
    id: str


@dataclass
class DecodedImages:
    """What decoding a source produced: pixels are already appended to the store's pixel file."""

    classes: list[str]
    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)


def source_files(source: str, scratch: Path) -> list[LabelledFile]:
    """List the labelled files of ``data.source``; built-in sets are written to ``scratch``."""
    if source in BUILTIN_SOURCES:
        BUILTIN_SOURCES[source](scratch / source)
        return scan_image_folder(scratch / source)
    if source.startswith("torchvision:") or source.lower().endswith(".csv"):
        raise PipelineError(f"data.source: '{source}': CSV manifests and torchvision data sets "
                            "are not supported yet; use 'digits' or an image-folder root")
    return scan_image_folder(Path(source))


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
BUILTIN_SOURCES = {"digits": write_digits_image_folder}


def scan_image_folder(root: Path) -> list[LabelledFile]:
    """List ``<root>/<class>/**/<file>``; every file below a class folder belongs to that class."""
    if not root.is_dir():
        raise PipelineError(f"data.source: '{root}' is not a directory; expected an image-folder "
                            "root with one sub-folder per class, or 'digits'")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = {p.name.lower() for p in class_dirs}
    if names & TRAIN_FOLDERS and names & HELD_OUT_FOLDERS:
        raise PipelineError(f"data.source: '{root}' looks pre-split ({', '.join(sorted(names))}); "
                            "pre-split roots are not supported yet: point data.source at one "
                            "folder with a sub-folder per class")
    files = [
        LabelledFile(path, class_dir.name, path.relative_to(root).as_posix())
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    if not files:
        raise PipelineError(f"data.source: '{root}' holds no files in class sub-folders; "
                            "expected <root>/<class>/<image files>")
    return files


def decode_image(data: bytes, short_side: int) -> np.ndarray:
    """Decode image bytes to RGB uint8 (H, W, 3), EXIF orientation applied, at most ``short_side``.

    Raises ``ValueError`` with a short reason when the bytes are not a readable image.
    """
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"not a readable image ({err})") from err
    width, height = rgb.size
    if min(width, height) > short_side:
        scale = short_side / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the full range down to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def decode_files(files: Sequence[LabelledFile], pixels_path: Path,
                 short_side: int) -> DecodedImages:
    """Decode every file once, append its pixels to ``pixels_path``, and report what was skipped.

    Files with the same bytes are kept once (reported as duplicates); the same bytes under two
    different labels are a conflict and are excluded altogether.
    """
    classes = sorted({f.label for f in files})
    class_index = {name: i for i, name in enumerate(classes)}
    hashed: dict[str, list[LabelledFile]] = defaultdict(list)
    contents: list[tuple[LabelledFile, str]] = []
    for item in files:
        digest = hashlib.sha256(item.path.read_bytes()).hexdigest()
        hashed[digest].append(item)
        contents.append((item, digest))
    result = DecodedImages(classes=classes)
    offset = 0
    with open(pixels_path, "wb") as out:
        for item, digest in tqdm(contents, desc="decode", unit="img", leave=False):
            same = hashed[digest]
            if len({other.label for other in same}) > 1:
                labels = ", ".join(sorted({other.label for other in same}))
                result.skipped.append({"path": item.id,
                                       "reason": f"same image under several labels: {labels}"})
                continue
            if same[0] is not item:
                result.duplicates.append({"path": item.id, "duplicate_of": same[0].id})
                continue
            try:
                array = decode_image(item.path.read_bytes(), short_side)
            except ValueError as err:
                result.skipped.append({"path": item.id, "reason": str(err)})
                continue
            out.write(array.tobytes())
            result.ids.append(item.id)
            result.labels.append(class_index[item.label])
            result.shapes.append(array.shape[:2])
            result.offsets.append(offset)
            result.hashes.append(digest)
            offset += array.nbytes
    return result


def assign_splits(labels: Sequence[int], hashes: Sequence[str], classes: Sequence[str],
                  val_size: float, test_size: float, seed: int,
                  max_per_class: int | None = None) -> np.ndarray:
    """Split each class by itself: deterministic from ``seed`` and the images' content.

    Returns one split name per image ('' for images left out by ``max_per_class``). Every class
    gets at least one validation and one test image, so each class needs three images or more.
    """
    labels = np.asarray(labels)
    splits = np.full(len(labels), "", dtype="<U5")
    for class_id, name in enumerate(classes):
        members = np.flatnonzero(labels == class_id)
        if len(members) < 3:
            raise PipelineError(f"class '{name}' has {len(members)} usable image(s); each class "
                                "needs at least 3 (one each for train, val and test)")
        # Order by content hash, then shuffle: the split never depends on file names or order.
        members = members[np.argsort([hashes[i] for i in members], kind="stable")]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        members = rng.permutation(members)
        if max_per_class is not None:
            members = members[:max_per_class]
        n = len(members)
        n_test = min(max(1, round(n * test_size)), n - 2)
        n_val = min(max(1, round(n * val_size)), n - n_test - 1)
        splits[members[:n_test]] = "test"
        splits[members[n_test:n_test + n_val]] = "val"
        splits[members[n_test + n_val:]] = "train"
    return splits


def prepare_store(files: Sequence[LabelledFile], out_dir: Path, *, source: str, short_side: int,
                  val_size: float, test_size: float, seed: int,
                  max_per_class: int | None) -> dict:
    """Decode, split and write the prepared store to ``out_dir``; return the data report."""
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        decoded = decode_files(files, tmp / "pixels.bin", short_side)
        if not decoded.ids:
            raise PipelineError(f"data.source: '{source}' holds no readable images")
        splits = assign_splits(decoded.labels, decoded.hashes, decoded.classes, val_size,
                               test_size, seed, max_per_class)
        save_arrays(tmp / "index.npz",
                    offsets=np.asarray(decoded.offsets, dtype=np.int64),
                    shapes=np.asarray(decoded.shapes, dtype=np.int32).reshape(-1, 2),
                    labels=np.asarray(decoded.labels, dtype=np.int64),
                    splits=splits,
                    ids=np.asarray(decoded.ids, dtype=str),
                    sha256=np.asarray(decoded.hashes, dtype=str))
        counts = {
            split: {name: int(np.sum((splits == split) & (np.asarray(decoded.labels) == i)))
                    for i, name in enumerate(decoded.classes)}
            for split in SPLITS
        }
        small = [i for i, (h, w) in zip(decoded.ids, decoded.shapes, strict=True)
                 if min(h, w) < 32]
        meta = {"source": source, "classes": decoded.classes, "short_side": short_side,
                "counts": {split: sum(c.values()) for split, c in counts.items()},
                "pixel_format": "RGB uint8, row-major (H, W, 3), images concatenated"}
        write_json(tmp / "meta.json", meta)
    return {"source": source, "classes": decoded.classes, "counts": counts,
            "left_out_by_max_per_class": int(np.sum(splits == "")),
            "small_images": {"min_side_below": 32, "count": len(small), "examples": small[:10]},
            "skipped": decoded.skipped, "duplicates": decoded.duplicates}


class ImageStore:
    """One split of a prepared store: ``store[i]`` is an RGB uint8 (H, W, 3) array."""

    def __init__(self, directory: str | Path, split: str) -> None:
        directory = Path(directory)
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        self.meta = read_json(directory / "meta.json")
        index = load_arrays(directory / "index.npz")
        keep = index["splits"] == split
        self.classes: list[str] = list(self.meta["classes"])
        self.labels: np.ndarray = index["labels"][keep]
        self.ids: np.ndarray = index["ids"][keep]
        self._offsets = index["offsets"][keep]
        self._shapes = index["shapes"][keep]
        pixels_path = directory / "pixels.bin"
        size = pixels_path.stat().st_size
        self._pixels = (np.memmap(pixels_path, dtype=np.uint8, mode="r") if size
                        else np.zeros(0, dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self._shapes[i])
        start = int(self._offsets[i])
        return np.asarray(self._pixels[start:start + h * w * 3]).reshape(h, w, 3)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))
