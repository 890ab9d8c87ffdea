"""Contact sheets of images with captions (a model's most confident mistakes, the audit's
suspects), drawn with PIL alone."""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transfer.data import ImageStore
from transfer.errors import PipelineError, one_line

if TYPE_CHECKING:
    from transfer.evaluation import Mistake

TILE = 120          # each image is fitted into a TILE x TILE square
COLUMNS = 6
CAPTION_LINES = 3
LINE_HEIGHT = 16
MARGIN = 10
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
WRONG = (190, 30, 30)


@dataclass(frozen=True)
class Tile:
    """One image of a contact sheet: what ``image_of`` looks it up by, and its caption lines
    with their colours."""

    key: Hashable
    caption: tuple[tuple[str, tuple[int, int, int]], ...]


@dataclass(frozen=True)
class Section:
    """A titled block of tiles; ``when_empty`` is written where there is none."""

    title: str
    tiles: Sequence[Tile]
    when_empty: str = ""


def draw_gallery(sections: Sequence[tuple[str, Sequence[Mistake]]],
                 image_of: Callable[[str], np.ndarray]) -> Image.Image:
    """One block per model: a title, then its mistakes with true and predicted class.

    ``image_of`` returns the RGB uint8 pixels of an image id. A model without mistakes gets a
    line saying so.
    """
    return draw_sheet([Section(title, [mistake_tile(m) for m in mistakes],
                               "no mistakes: every image was classified correctly")
                       for title, mistakes in sections], image_of)


def mistake_tile(mistake: Mistake) -> Tile:
    return Tile(mistake.id, ((f"true: {mistake.actual}", TEXT),
                             (f"pred: {mistake.predicted}", WRONG),
                             (f"confidence {mistake.confidence:.2f}", WRONG)))


def draw_sheet(sections: Sequence[Section], image_of: Callable[[Any], np.ndarray]) -> Image.Image:
    """A contact sheet: per section its title, then its tiles, ``COLUMNS`` to a row."""
    font = _font(13)
    title_font = _font(16)
    cell_h = TILE + CAPTION_LINES * LINE_HEIGHT + MARGIN
    width = MARGIN + COLUMNS * (TILE + MARGIN)
    heights = [2 * LINE_HEIGHT + (-(-len(s.tiles) // COLUMNS) * cell_h if s.tiles
                                  else 2 * LINE_HEIGHT) for s in sections]
    sheet = Image.new("RGB", (width, MARGIN + sum(heights)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = MARGIN
    for section, height in zip(sections, heights, strict=True):
        draw.text((MARGIN, top), section.title, fill=TEXT, font=title_font)
        y0 = top + 2 * LINE_HEIGHT
        if not section.tiles:
            draw.text((MARGIN, y0), section.when_empty, fill=TEXT, font=font)
        for k, tile in enumerate(section.tiles):
            x = MARGIN + (k % COLUMNS) * (TILE + MARGIN)
            y = y0 + (k // COLUMNS) * cell_h
            picture = _fit(Image.fromarray(image_of(tile.key)))
            sheet.paste(picture, (x + (TILE - picture.width) // 2,
                                  y + (TILE - picture.height) // 2))
            draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(200, 200, 200))
            for line, (text, colour) in enumerate(tile.caption[:CAPTION_LINES]):
                draw.text((x, y + TILE + 2 + line * LINE_HEIGHT), _clip(text, draw, font),
                          fill=colour, font=font)
        top += height
    return sheet


def images_by_id(store: ImageStore, ids: Sequence[str],
                 where: str) -> Callable[[str], np.ndarray]:
    """Look images of ``store`` up by id; every id in ``ids`` must be there."""
    position = {str(image_id): i for i, image_id in enumerate(store.ids)}
    missing = [str(i) for i in ids if str(i) not in position]
    if missing:
        raise PipelineError(f"{where}: image '{missing[0]}' of the embeddings is not in the "
                            f"prepared store ({len(missing)} missing); run dvc repro")
    return lambda image_id: store[position[image_id]]


# Colours of the saved sheet: Git keeps every version of it (a DVC plot with cache: false), and
# photos saved in full colour made the audit's sheet 776 KB on monkeys10, 255 KB in 256 colours
# (dithered: the thumbnails look the same, the captions are a few exact colours).
PALETTE = 256


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as a PNG of at most ``PALETTE`` colours (the same bytes for the same image)."""
    out = io.BytesIO()
    image.convert("RGB").quantize(PALETTE, Image.Quantize.MEDIANCUT,
                                  dither=Image.Dither.FLOYDSTEINBERG).save(
        out, format="PNG", optimize=True)
    return out.getvalue()


def _fit(image: Image.Image) -> Image.Image:
    """Scale to fit the tile; tiny images (8x8 digits) are enlarged with crisp pixels."""
    scale = TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.BICUBIC
    return image.resize(size, method)


def _clip(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> str:
    """``text`` on one line (control characters escaped), shortened with an ellipsis until it
    fits under its tile: a path (with a ``/``) loses its start, so that the file name, which
    tells tiles of one folder apart, stays."""
    text = one_line(text)
    if draw.textlength(text, font=font) <= TILE:
        return text
    if "/" in text:
        while text and draw.textlength("…" + text, font=font) > TILE:
            text = text[1:]
        return "…" + text
    while text and draw.textlength(text + "…", font=font) > TILE:
        text = text[:-1]
    return text + "…"


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's built-in font: the same on every machine, no font files needed.
    return ImageFont.load_default(size=size)
