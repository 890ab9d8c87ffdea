import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from transfer.errors import PipelineError
from transfer.evaluation import Mistake
from transfer.gallery import (
    BACKGROUND,
    COLUMNS,
    LINE_HEIGHT,
    MARGIN,
    TEXT,
    TILE,
    draw_gallery,
    images_by_id,
    png_bytes,
)

RED = (220, 30, 30)


def red_square(image_id: str) -> np.ndarray:
    return np.full((8, 8, 3), RED, dtype=np.uint8)


def test_each_mistake_gets_a_tile_with_its_image():
    mistakes = [Mistake(f"{i}.png", "cat", "dog", 0.9) for i in range(COLUMNS + 1)]
    sheet = np.asarray(draw_gallery([("head", mistakes)], red_square))
    red = np.all(sheet == RED, axis=2)
    # Two rows of tiles; each 8x8 image is enlarged to a TILE x TILE square with crisp pixels.
    assert red.sum() == (COLUMNS + 1) * TILE * TILE
    rows_with_red = np.flatnonzero(red.any(axis=1))
    assert rows_with_red[-1] - rows_with_red[0] > TILE


def test_a_model_without_mistakes_gets_a_short_block_saying_so():
    sheet = draw_gallery([("head: 0 mistakes", [])], red_square)
    assert sheet.height < TILE
    # Exactly the title and the sentence, in Pillow's built-in font, and nothing else.
    expected = Image.new("RGB", sheet.size, BACKGROUND)
    draw = ImageDraw.Draw(expected)
    draw.text((MARGIN, MARGIN), "head: 0 mistakes", fill=TEXT,
              font=ImageFont.load_default(size=16))
    draw.text((MARGIN, MARGIN + 2 * LINE_HEIGHT),
              "no mistakes: every image was classified correctly", fill=TEXT,
              font=ImageFont.load_default(size=13))
    assert np.array_equal(np.asarray(sheet), np.asarray(expected))
    other = draw_gallery([("finetune: 0 mistakes", [])], red_square)
    assert not np.array_equal(np.asarray(other), np.asarray(sheet))


def test_images_are_looked_up_by_id_and_a_missing_one_is_named():
    class Store:
        ids = np.array(["a.png", "b.png"])

        def __getitem__(self, i):
            return np.full((2, 2, 3), i, dtype=np.uint8)

    image_of = images_by_id(Store(), ["b.png"], "data/prepared/test")
    assert image_of("b.png")[0, 0, 0] == 1
    with pytest.raises(PipelineError, match="data/prepared/test: image 'c.png'"):
        images_by_id(Store(), ["a.png", "c.png"], "data/prepared/test")


@pytest.mark.parametrize("label", ["line\nbreak", "日本語", "emoji 🐱", "\u202eright-to-left",
                                   "x" * 300, "tab\there"])
def test_any_class_name_is_drawn_on_one_line(label):
    """Prepare refuses control characters in class names; the gallery escapes them anyway, so
    a store made some other way cannot stop evaluate inside Pillow."""
    sheet = draw_gallery([("head", [Mistake("0.png", label, "dog", 0.9)])], red_square)
    assert sheet.width == MARGIN + COLUMNS * (TILE + MARGIN)


def test_a_long_path_keeps_its_file_name_and_other_captions_their_start():
    from transfer.gallery import _clip, _font

    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), _font(13)
    paths = [f"training/n4/moved_from_another_folder_n30{i}.jpg" for i in range(2)]
    clipped = [_clip(path, draw, font) for path in paths]
    assert clipped[0] != clipped[1]  # two tiles of one folder told apart
    assert all(c.startswith("…") and p.endswith(c[1:]) for c, p in zip(clipped, paths, strict=True))
    assert all(draw.textlength(c, font=font) <= TILE for c in clipped)
    label = _clip("given: a class with a very long name indeed, longer than a tile", draw, font)
    assert label.startswith("given: a class") and label.endswith("…")


def test_a_sheet_is_saved_in_a_few_colours_and_the_same_bytes_each_time():
    # Git keeps every version of the sheets: photos are saved in 256 colours, not millions.
    pixels = np.random.default_rng(0).integers(0, 256, (240, 360, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels))
    saved = Image.open(io.BytesIO(data))
    assert saved.mode == "P" and len(saved.convert("RGB").getcolors(1 << 24)) <= 256
    assert png_bytes(Image.fromarray(pixels)) == data
    # A sheet of a few colours keeps them exactly.
    plain = np.zeros((40, 60, 3), np.uint8)
    plain[:, 30:] = (190, 30, 30)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(Image.fromarray(plain))))
                                     .convert("RGB")), plain)
