"""Benchmarks, run as ``python -m benchmarks.<name>``; each prints ratios measured in one run."""

from __future__ import annotations

from pathlib import Path

from transfer.data import ImageStore, prepare_store
from transfer.sources import list_image_folder, write_digits_image_folder

# The real photo set beside the repository, when present.
MONKEYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "monkeys10" / "training"


def training_store(images: Path, scratch: Path) -> tuple[ImageStore, Path]:
    """Prepare the image-folder root ``images`` (the built-in digits when it is missing) into
    a store under ``scratch``; returns its training split and the root used (store ids are
    paths relative to it)."""
    root = images
    if not root.is_dir():
        root = scratch / "digits"
        write_digits_image_folder(root)
    prepare_store(list_image_folder(root), scratch / "store", source=str(root), short_side=256,
                  val_size=0.1, test_size=0.1, seed=0, min_per_class=1, max_per_class=None)
    return ImageStore(scratch / "store", "train"), root
