"""Shared fixtures: tiny real images written to temporary folders, and the loaded backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30),
                fmt: str = "PNG", seed: int = 0) -> Path:
    """A small image of mostly one colour plus seeded noise, so every file has unique bytes."""
    rng = np.random.default_rng(seed)
    base = np.array(rgb, dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 21, size=(size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``<root>/<class>/*.png``: three colour classes with six images each."""
    root = tmp_path / "images"
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(6):
            write_image(root / name / f"{i}.png", rgb, seed=100 * c + i)
    return root


@pytest.fixture(scope="session")
def backbone():
    from stages.backbones import load_backbone

    return load_backbone("tf_efficientnet_lite0")
