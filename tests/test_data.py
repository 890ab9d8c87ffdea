from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.data import (
    SPLITS,
    ImageStore,
    assign_splits,
    decode_image,
    prepare_store,
    scan_image_folder,
    source_files,
    write_digits_image_folder,
)
from stages.errors import PipelineError
from tests.conftest import write_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_digits_are_written_as_an_image_folder(tmp_path):
    write_digits_image_folder(tmp_path)
    classes = sorted(p.name for p in tmp_path.iterdir())
    assert classes == [str(d) for d in range(10)]
    files = list(tmp_path.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as image:
        assert image.size == (8, 8)
        assert image.mode == "L"
        assert np.asarray(image).max() > 200  # ink scaled from 0..16 to 0..255


def test_scan_labels_every_file_below_a_class_folder(image_folder):
    (image_folder / "red" / "nested").mkdir()
    write_image(image_folder / "red" / "nested" / "deep.png", (200, 0, 0), seed=99)
    (image_folder / "blue" / ".DS_Store").write_bytes(b"junk")
    files = scan_image_folder(image_folder)
    assert [f.label for f in files].count("red") == 7
    assert "red/nested/deep.png" in {f.id for f in files}
    assert not any(".DS_Store" in f.id for f in files)


def test_scan_errors_name_the_path(tmp_path):
    with pytest.raises(PipelineError, match=r"'.*missing' is not a directory"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(PipelineError, match="holds no files in class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    for split in ("training", "validation"):
        write_image(tmp_path / "presplit" / split / "a" / "0.png", (1, 2, 3))
    with pytest.raises(PipelineError, match=r"looks pre-split \(training, validation\)"):
        scan_image_folder(tmp_path / "presplit")


def test_unsupported_sources_say_what_works(tmp_path):
    with pytest.raises(PipelineError, match="not supported yet; use 'digits' or an image-folder"):
        source_files("torchvision:CIFAR10", tmp_path)
    with pytest.raises(PipelineError, match="not supported yet"):
        source_files("data/raw/list.csv", tmp_path)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_decodes_to_rgb_uint8(mode):
    image = Image.new("RGB", (20, 10), (120, 60, 30)).convert(mode)
    array = decode_image(encode(image, "TIFF" if mode == "CMYK" else "PNG"), short_side=256)
    assert array.shape == (10, 20, 3)
    assert array.dtype == np.uint8


def test_transparent_pixels_become_the_fixed_background():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (decode_image(encode(image), 256) == 255).all()
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert (decode_image(encode(opaque), 256) == [10, 20, 30]).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    value = decode_image(encode(image), 256)[0, 0, 0]
    assert 126 <= value <= 129


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    array = decode_image(encode(image, "JPEG", exif=exif), 256)
    assert array.shape[:2] == (30, 10)


def test_large_images_are_downscaled_to_the_short_side_and_small_ones_kept():
    large = decode_image(encode(Image.new("RGB", (1000, 500))), short_side=100)
    assert large.shape[:2] == (100, 200)
    small = decode_image(encode(Image.new("RGB", (50, 40))), short_side=100)
    assert small.shape[:2] == (40, 50)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"),
    (b"hello, I am a text file", "not a readable image"),
])
def test_unreadable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data, 256)


def test_truncated_image_is_not_readable():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(data[: len(data) // 2], 256)


def make_hashes(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def test_splits_are_stratified_deterministic_and_seeded():
    labels = np.repeat([0, 1, 2], [40, 20, 10])
    hashes = make_hashes(len(labels))
    splits = assign_splits(labels, hashes, ["a", "b", "c"], 0.15, 0.2, seed=1)
    assert np.array_equal(splits, assign_splits(labels, hashes, ["a", "b", "c"], 0.15, 0.2, 1))
    for cls, n in enumerate([40, 20, 10]):
        members = splits[labels == cls]
        assert (members == "test").sum() == round(n * 0.2)
        assert (members == "val").sum() == max(1, round(n * 0.15))
        assert (members == "train").sum() == n - round(n * 0.2) - max(1, round(n * 0.15))
    other = assign_splits(labels, hashes, ["a", "b", "c"], 0.15, 0.2, seed=2)
    assert not np.array_equal(splits, other)


def test_splits_do_not_depend_on_file_order():
    labels = np.repeat([0, 1], 30)
    hashes = make_hashes(60)
    splits = assign_splits(labels, hashes, ["a", "b"], 0.2, 0.2, seed=3)
    order = np.random.default_rng(0).permutation(60)
    shuffled = assign_splits(labels[order], [hashes[i] for i in order], ["a", "b"], 0.2, 0.2, 3)
    assert np.array_equal(splits[order], shuffled)


def test_every_class_reaches_every_split_and_cap_applies():
    labels = np.repeat([0, 1], [3, 50])
    splits = assign_splits(labels, make_hashes(53), ["few", "many"], 0.1, 0.1, 0, max_per_class=5)
    assert sorted(splits[labels == 0]) == ["test", "train", "val"]
    assert (splits[labels == 1] != "").sum() == 5
    assert (splits[labels == 1] == "").sum() == 45


def test_class_too_small_for_three_splits_is_named():
    with pytest.raises(PipelineError, match="class 'tiny' has 2 usable image"):
        assign_splits([0, 0, 0, 1, 1], make_hashes(5), ["big", "tiny"], 0.2, 0.2, 0)


def test_prepare_store_round_trip_and_report(image_folder, tmp_path):
    (image_folder / "red" / "notes.txt").write_text("not an image")
    (image_folder / "green" / "empty.png").write_bytes(b"")
    # Same bytes twice in one class: a duplicate; same bytes in two classes: a conflict.
    (image_folder / "blue" / "copy.png").write_bytes((image_folder / "blue" / "0.png").read_bytes())
    shared = (image_folder / "red" / "5.png").read_bytes()
    (image_folder / "green" / "red-looking.png").write_bytes(shared)
    files = scan_image_folder(image_folder)
    out = tmp_path / "prepared"
    report = prepare_store(files, out, source="images", short_side=16, val_size=0.2,
                           test_size=0.2, seed=0, max_per_class=None)
    assert sorted(p.name for p in out.iterdir()) == ["index.npz", "meta.json", "pixels.bin"]
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert "not a readable image" in reasons["red/notes.txt"]
    assert reasons["green/empty.png"] == "empty file"
    assert "several labels: green, red" in reasons["red/5.png"]
    assert "several labels" in reasons["green/red-looking.png"]
    assert report["duplicates"] == [{"path": "blue/copy.png", "duplicate_of": "blue/0.png"}]
    assert report["classes"] == ["blue", "green", "red"]
    total = sum(sum(per_class.values()) for per_class in report["counts"].values())
    assert total == 6 + 6 + 5  # blue, green, red minus the conflicting image
    seen = set()
    for split in SPLITS:
        store = ImageStore(out, split)
        assert len(store) == sum(report["counts"][split].values())
        for image, label, image_id in zip(store, store.labels, store.ids, strict=True):
            assert image.dtype == np.uint8 and image.shape == (16, 21, 3)  # 30x40 -> short side 16
            channel = {"blue": 2, "green": 1, "red": 0}[store.classes[label]]
            assert image.mean(axis=(0, 1)).argmax() == channel
            seen.add(str(image_id))
    assert len(seen) == total


def test_prepare_store_with_no_readable_image_fails_and_leaves_nothing(tmp_path):
    root = tmp_path / "junk"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.txt").write_text(name)
    with pytest.raises(PipelineError, match="holds no readable images"):
        prepare_store(scan_image_folder(root), tmp_path / "out", source="junk", short_side=64,
                      val_size=0.2, test_size=0.2, seed=0, max_per_class=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]


def test_image_store_rejects_unknown_split(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ImageStore(tmp_path, "dev")
