"""Pixels for a network, without PyTorch: the size images are stored at (``fit_short_side``),
the eval-time resize and centre crop (``ResizeCrop``, torchvision's ``Resize`` and
``CenterCrop`` to the byte), uint8 batches of them, and a background thread that makes the
next batches while the network runs.

Importing this module does not import torch, so that ``extract`` can assemble embeddings from
the store, and embed a few new images with ONNX Runtime, without paying for it
(``transfer.warm``).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from transfer.errors import PipelineError

# torchvision's InterpolationMode names -> PIL's filters (torchvision's pil_modes_mapping).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# Images whose shorter side is below data.short_side but at least this fraction of it are
# stored upscaled to it (at most 1.31x their bytes), so that extraction, which would resize
# them to the backbone's size, only crops them: on 2 cores that resize cost ONNX Runtime a
# tenth of its speed on 250-pixel photos (docs/engines.md).
UPSCALE_FROM = 0.875


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) that torchvision's ``Resize(size)`` gives an image of that size:
    the shorter side ``size``, the longer one scaled and truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def fit_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """The image at the size it is stored (and predicted) at: the shorter side brought to
    ``short_side`` when it is larger, or smaller but at least ``UPSCALE_FROM`` of it; smaller
    images are left alone (stored upscaled they would take many times the bytes).

    Upscaled the way extraction resizes (the shorter side to exactly ``short_side``, the
    longer one truncated, bicubic): a photo a little under the backbone's resize size then has
    the pixels extraction would have made from it, and extraction only crops it.
    """
    width, height = image.size
    short = min(width, height)
    if short == short_side or short < UPSCALE_FROM * short_side:
        return image
    if short < short_side:
        return image.resize(resized_shape(height, width, short_side)[::-1],
                            Image.Resampling.BICUBIC)
    scale = short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap=2 first shrinks by whole factors in a cheap box step: several times faster
    # on camera-sized photos, and per Pillow's docs indistinguishable from a full resample.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


@dataclass(frozen=True)
class ResizeCrop:
    """Resize the shorter side to ``size`` with ``interpolation``, then centre-crop to ``crop``
    (height, width): the bytes torchvision's ``Resize(size, antialias=True)`` and
    ``CenterCrop(crop)`` give on a PIL image, with less work.

    Where the image already has the resized size (photos ``prepare`` stored at the
    backbone's size), it is only cropped, without a copy. Otherwise PIL resamples only the
    rows and columns the crop keeps (``Image.resize``'s ``box``), along each axis whose scale
    (input size / resized size) is a fraction with a power-of-two denominator, such as
    250 / 256: there every sampling position and filter weight is the same double as in the
    whole resize, so the pixels are the same to the byte (tested). Along other axes the
    whole axis is resampled and then cropped, as torchvision does; and so is the whole image
    where Pillow would run its two passes in another order for the box than for the whole
    resize. On monkeys10's 250-pixel photos this resizes 1.3x faster, which is what lets
    extraction keep up with ONNX Runtime on 2 cores (docs/engines.md).
    """

    size: int
    crop: tuple[int, int]
    interpolation: str

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        pixels = image if isinstance(image, np.ndarray) else None
        height, width = pixels.shape[:2] if pixels is not None else image.size[::-1]
        new_height, new_width = resized_shape(height, width, self.size)
        crop_height, crop_width = self.crop
        if crop_height > new_height or crop_width > new_width:  # torchvision pads: rare
            return self._torchvision(image)
        top = int(round((new_height - crop_height) / 2.0))
        left = int(round((new_width - crop_width) / 2.0))
        if (new_height, new_width) != (height, width):
            if pixels is not None:
                image = Image.fromarray(pixels)
            x0, x1, width_out, x_start = _axis_box(width, new_width, left, crop_width)
            y0, y1, height_out, y_start = _axis_box(height, new_height, top, crop_height)
            box = (x0, y0, x1, y1)
            if (_horizontal_first(width, height, width_out, height_out)
                    != _horizontal_first(width, height, new_width, new_height)):
                # The two resizes would run PIL's passes in different orders: the whole one
                box, width_out, height_out = None, new_width, new_height
            else:
                top, left = y_start, x_start
            image = image.resize((width_out, height_out), _pil_filter(self.interpolation),
                                 box=box)
            pixels = None
        if pixels is None:
            pixels = np.asarray(image)
        return pixels[top:top + crop_height, left:left + crop_width]

    def _torchvision(self, image: Image.Image | np.ndarray) -> np.ndarray:
        from torchvision.transforms import v2

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        steps = v2.Compose([v2.Resize(self.size, antialias=True,
                                      interpolation=v2.InterpolationMode(self.interpolation)),
                            v2.CenterCrop(self.crop)])
        return np.asarray(steps(image))


def _axis_box(size: int, new_size: int, start: int, length: int) -> tuple[float, float, int,
                                                                          int]:
    """One axis of ``ResizeCrop``'s resample box: the source range, the size PIL resamples it
    to, and where the crop then starts in that. Only the kept part when the scale is exact in
    binary (so the sampling positions are the same doubles as in the whole resize), else the
    whole axis."""
    denominator = new_size // math.gcd(size, new_size)
    if size == new_size or denominator & (denominator - 1):
        return 0.0, float(size), new_size, start
    scale = size / new_size
    return start * scale, (start + length) * scale, length, 0


def _horizontal_first(width: int, height: int, width_out: int, height_out: int) -> bool:
    """Whether Pillow resamples along rows before columns when resizing ``(width, height)``
    to ``(width_out, height_out)``: older releases always do; Pillow 13 does unless the height
    shrinks by more than twice what the width does (its ``ImagingResampleInner``). The
    passes round to bytes in between, so the order shows in the pixels; ``ResizeCrop`` uses
    a box only where both rules give its resize the order of the whole one."""
    shrink = height - height_out
    return not (shrink > 0 and shrink > (width - width_out) * 2)


def _pil_filter(interpolation: str) -> int:
    """PIL's filter for a torchvision interpolation mode's name (its ``pil_modes_mapping``)."""
    try:
        return PIL_FILTERS[interpolation]
    except KeyError:
        raise PipelineError(f"interpolation '{interpolation}' is not one PIL resizes with; "
                            f"expected one of {sorted(PIL_FILTERS)}") from None



T = TypeVar("T")


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` in their order, up to ``depth`` of them made ahead by a background thread
    while the caller works. An exception in the thread is raised here; when the caller stops
    early, the thread stops after the item it is making. Only for work that draws no random
    numbers: the thread's draws would interleave with the caller's."""
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                made.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def make() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the caller, raised there
            put((end, err))

    thread = threading.Thread(target=make, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = made.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join()


def pixel_arrays(images: Sequence[np.ndarray], resize_crop: ResizeCrop, batch_size: int,
                 desc: str, ahead: bool = False) -> Iterator[np.ndarray]:
    """``images`` resized and cropped by ``resize_crop``, as uint8 ``(N, H, W, 3)`` arrays of
    ``batch_size`` (the last one shorter), with a progress bar named ``desc``; ``ahead``: the
    next ones made by a background thread while the caller runs the network."""
    made = (np.stack([resize_crop(images[i])
                      for i in range(start, min(start + batch_size, len(images)))])
            for start in range(0, len(images), batch_size))
    batches = read_ahead(made) if ahead else made
    with tqdm(total=len(images), desc=desc, unit="img", leave=False, disable=None) as progress:
        for batch in batches:
            yield batch
            progress.update(len(batch))
