"""Shared fixtures: tiny real images written to temporary folders, and the loaded backbone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (48, 36),
                fmt: str = "PNG", seed: int = 0) -> Path:
    """A small image of one colour with a faint seeded speckle, so every file is unique."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), dtype=np.int16)
    pixels[:] = rgb
    pixels += rng.integers(-3, 4, size=pixels.shape, dtype=np.int16)
    pixels = np.clip(pixels, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return path


def write_colour_folder(root: Path, per_class: int = 6) -> Path:
    """``<root>/<class>/*.png``: three colour classes, easy for any ImageNet backbone."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", rgb, seed=100 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_colour_folder(tmp_path / "images")


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    """Stages read and write paths relative to the project root, as under ``dvc repro``."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def stage_environment() -> dict[str, str]:
    """The environment with this checkout's ``stages`` first on the path: outside the checkout,
    ``python -m stages.<stage>`` would otherwise import wherever the editable install points."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def predict_without_torch(cwd: Path, *args: str) -> str:
    """``python -m stages.predict ARGS`` in a fresh interpreter in ``cwd``, which must never
    import torch, timm or torchvision; its table."""
    code = (f"import sys; from stages import predict; predict.main({list(args)!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'timm', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                            text=True, env=stage_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    *table, imported = result.stdout.splitlines()
    assert imported == "[]"
    return "\n".join(table)


def run_stage_cli(stage: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<stage> ARGS`` in ``cwd`` as DVC (or a user) would."""
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd,
                          env=stage_environment(), capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The whole of stderr of a stage or command that failed on bad input: one ``error:`` line
    (no traceback) and exit code ``code``."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def kill_stage_midway(stage: str, cwd: Path, started: Callable[[], bool]) -> None:
    """Run ``python -m stages.<stage>`` and SIGKILL it, with its workers, once ``started()``."""
    process = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=cwd,
                               env=stage_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not started():
        assert process.poll() is None, f"{stage} finished before it could be interrupted"
        assert time.monotonic() < deadline, f"{stage} never reached the point to interrupt"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session")
def embedded_project(tmp_path_factory) -> Path:
    """A project whose colour images went through ``prepare`` and ``extract`` (run once)."""
    from stages import extract, prepare

    root = tmp_path_factory.mktemp("project")
    write_colour_folder(root / "data" / "raw" / "colours", per_class=10)
    write_params(root, {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64},
                        "backbone": {"batch_size": 8}})
    with working_directory(root):
        prepare.main()
        extract.main()
    return root


@pytest.fixture
def trained(project: Path) -> Path:
    """``project`` with its head trained, and new images to classify under ``inputs/``."""
    from stages import finetune, train_head

    train_head.main()
    finetune.main()
    inputs = project / "inputs"
    write_image(inputs / "a-red.png", (225, 25, 25), seed=901)
    write_image(inputs / "more" / "b-green.jpg", (25, 205, 35), fmt="JPEG", seed=902)
    write_image(inputs / "more" / "c-blue", (25, 35, 215), seed=903)  # no extension
    (inputs / "notes.txt").write_text("not an image")
    return project


def write_halves(path: Path, left: tuple[int, int, int], right: tuple[int, int, int],
                 size: tuple[int, int] = (64, 64)) -> Path:
    """An image whose left half is one colour and right half another: unlike its mirror. Square,
    so the centre crop of its mirror is the mirror of its centre crop."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, :size[0] // 2], pixels[:, size[0] // 2:] = left, right
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def flip_finetuned(trained: Path) -> Path:
    """``trained`` fine-tuned for an epoch with ``finetune.flip_average: true``, and an image
    and its mirror image under ``mirrored/``."""
    from stages import finetune

    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["finetune"] = {"enabled": True, "strategy": "head", "epochs": 1, "batch_size": 8,
                          "augment": "none", "flip_average": True, "lr": 0.01}
    write_params(trained, params)
    finetune.main()
    image = write_halves(trained / "mirrored" / "a.png", (220, 30, 30), (30, 40, 210))
    with Image.open(image) as opened:
        opened.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image.with_name("b.png"))
    return trained


@pytest.fixture
def project(embedded_project: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of ``embedded_project``, entered as the working directory."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(embedded_project, root)
    with working_directory(root):
        yield root


@pytest.fixture
def determinism_restored(monkeypatch) -> Iterator[None]:
    """PyTorch's default (non-deterministic) settings and environment again after the test."""
    from transfer.runtime import set_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    set_determinism(False)


@pytest.fixture(scope="session")
def backbone():
    from transfer.backbones import load_backbone

    return load_backbone("tf_efficientnet_lite0")


@pytest.fixture
def net():
    """Pretrained lite0 with a 3-class head; private to each test, which may change it."""
    from transfer.backbones import load_backbone
    from transfer.network import build_network

    return build_network(load_backbone("tf_efficientnet_lite0"), 3)
