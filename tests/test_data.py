import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_colour_folder, write_image
from transfer.artifacts import load_arrays
from transfer.data import (
    SPLITS,
    ImageStore,
    assign_split,
    decode_file,
    decode_image,
    prepare_store,
    split_fraction,
)
from transfer.errors import PipelineError
from transfer.pixels import fit_short_side
from transfer.sources import list_image_folder


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def prepare(listing, out, **overrides):
    options = {"source": "test", "short_side": 64, "val_size": 0.2, "test_size": 0.2,
               "seed": 0, "min_per_class": 1, "max_per_class": None, "workers": 1}
    return prepare_store(listing, out, **{**options, **overrides})


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_decodes_to_rgb(mode):
    image = Image.new("RGB", (20, 10), (120, 60, 30)).convert(mode)
    decoded = decode_image(encode(image, "TIFF" if mode in ("CMYK", "PA") else "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparent_pixels_become_the_fixed_background():
    clear = decode_image(encode(Image.new("RGBA", (4, 4), (10, 20, 30, 0))))
    assert (np.asarray(clear) == 255).all()
    opaque = decode_image(encode(Image.new("RGBA", (4, 4), (10, 20, 30, 255))))
    assert (np.asarray(opaque) == [10, 20, 30]).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    assert 126 <= np.asarray(decode_image(encode(image)))[0, 0, 0] <= 129


def test_sixteen_bit_and_float_grey_convert_in_bands_to_the_same_bytes():
    # Converted whole in float64, a 95 KB 16-bit PNG of 7,000 x 7,000 took 1.3 GB to decode.
    import tracemalloc

    rng = np.random.default_rng(0)
    for array, fmt in ((rng.integers(0, 65536, (2000, 1000), dtype=np.uint16), "PNG"),
                       (rng.integers(-5, 70000, (600, 300)).astype(np.int32), "TIFF"),
                       ((rng.random((600, 300)) * 300).astype(np.float32), "TIFF")):
        data = encode(Image.fromarray(array), fmt)
        whole = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
        peak = 65535.0 if array.dtype == np.uint16 or whole.max() > 255 else 255.0
        expected = np.clip(np.round(whole * (255.0 / peak)), 0, 255).astype(np.uint8)
        tracemalloc.start()
        decoded = np.asarray(decode_image(data))
        _, most = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert (decoded == expected[..., None]).all()
        assert most < 4 * array.nbytes + 3 * decoded.nbytes  # not 8 bytes a pixel, thrice


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(encode(Image.new("RGB", (30, 10)), "JPEG", exif=exif))
    assert image.size == (10, 30)


def test_large_images_shrink_to_the_short_side_and_small_ones_stay():
    assert fit_short_side(Image.new("RGB", (1000, 500)), 100).size == (200, 100)
    assert fit_short_side(Image.new("RGB", (50, 40)), 100).size == (50, 40)
    assert fit_short_side(Image.new("RGB", (223, 300)), 256).size == (223, 300)  # < 7/8 of it


@pytest.mark.parametrize("size", [(250, 333), (333, 250), (224, 224), (255, 1000)])
def test_images_a_little_small_are_stored_as_extraction_would_resize_them(size):
    # Upscaled as torchvision's Resize(256) upscales (the longer side truncated), so that
    # extraction only crops them and their embeddings are those it made before.
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    stored = fit_short_side(image, 256)
    expected = v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(image)
    assert min(stored.size) == 256
    assert stored.size == expected.size
    assert np.array_equal(np.asarray(stored), np.asarray(expected))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"),
    (b"hello, I am a text file", "not an image"),
])
def test_unreadable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data)


def test_truncated_image_is_reported_as_such():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ValueError, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2])


def test_identity_is_the_pixels_not_the_bytes(tmp_path):
    image = Image.new("RGB", (300, 200), (5, 6, 7))
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    image.save(png)
    image.save(bmp)
    a, b = decode_file(png, 100, tmp_path), decode_file(bmp, 100, tmp_path)
    assert a.pixel_sha256 == b.pixel_sha256 and a.byte_sha256 != b.byte_sha256
    assert a.shape == (100, 150) and a.original_size == (300, 200)


def test_split_is_a_pure_function_of_seed_and_content():
    assert split_fraction(1, "split", "abc") == split_fraction(1, "split", "abc")
    assert split_fraction(1, "split", "abc") != split_fraction(2, "split", "abc")
    fractions = [split_fraction(0, "split", str(i)) for i in range(4000)]
    assert 0.18 < np.mean(np.asarray(fractions) < 0.2) < 0.22  # uniform enough


def test_given_splits_are_kept_and_missing_ones_carved_from_train():
    assert assign_split(0.05, None, set(), 0.2, 0.1) == "test"
    assert assign_split(0.25, None, set(), 0.2, 0.1) == "val"
    assert assign_split(0.95, None, set(), 0.2, 0.1) == "train"
    # A source with train and val only: test is carved from train, val is left as given.
    assert assign_split(0.05, "train", {"train", "val"}, 0.2, 0.1) == "test"
    assert assign_split(0.25, "train", {"train", "val"}, 0.2, 0.1) == "train"
    assert assign_split(0.05, "val", {"train", "val"}, 0.2, 0.1) == "val"


def test_every_bad_kind_is_skipped_or_reported(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=8)
    red = root / "red"
    (red / "empty.png").write_bytes(b"")
    (red / "notes.txt").write_text("not an image")
    jpeg = encode(Image.new("RGB", (48, 36), (230, 10, 10)), "JPEG")
    (red / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (red / "jpeg-named.png").write_bytes(jpeg)                    # recognised by content
    (red / "no-extension").write_bytes(encode(Image.new("RGB", (49, 36), (220, 0, 0)), "JPEG"))
    Image.new("CMYK", (48, 36), (0, 255, 255, 0)).save(red / "cmyk.tif")
    Image.fromarray(np.full((36, 48), 40000, dtype=np.uint16)).save(root / "green" / "deep.png")
    Image.new("RGBA", (48, 36), (20, 40, 220, 128)).save(root / "blue" / "alpha.png")
    Image.new("RGB", (8, 6), (30, 40, 210)).save(root / "blue" / "tiny.png")
    shutil.copy(root / "blue" / "0.png", root / "blue" / "copy-of-0.png")           # bytes
    Image.open(root / "blue" / "1.png").save(root / "blue" / "zz-1.bmp")             # pixels
    shutil.copy(root / "green" / "2.png", root / "red" / "green-or-red.png")         # conflict

    report = prepare(list_image_folder(root), tmp_path / "prepared")
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons["red/empty.png"] == "empty file"
    assert reasons["red/notes.txt"].startswith("not an image")
    assert reasons["red/truncated.jpg"].startswith("truncated or corrupt image")
    assert len(reasons) == 3
    assert sorted((d["path"], d["duplicate_of"], d["same"]) for d in report["duplicates"]) == [
        ("blue/copy-of-0.png", "blue/0.png", "bytes"), ("blue/zz-1.bmp", "blue/1.png", "pixels")]
    assert report["conflicts"] == [{"paths": ["green/2.png", "red/green-or-red.png"],
                                    "labels": ["green", "red"]}]
    assert report["small_images"]["paths"] == ["blue/tiny.png"]
    stored = {split: ImageStore(tmp_path / "prepared", split) for split in SPLITS}
    ids = {str(i): split for split, store in stored.items() for i in store.ids}
    for kept in ("red/jpeg-named.png", "red/no-extension", "red/cmyk.tif", "green/deep.png",
                 "blue/alpha.png", "blue/tiny.png", "blue/0.png", "blue/1.png"):
        assert kept in ids, kept
    for gone in ("blue/copy-of-0.png", "blue/zz-1.bmp", "green/2.png", "red/green-or-red.png"):
        assert gone not in ids
    # blue 8 + alpha + tiny; green 8 + deep - the conflict; red 8 + three odd files
    assert sum(report["totals"].values()) == len(ids) == 10 + 8 + 11


def test_old_images_keep_their_split_when_ten_percent_are_added(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=40)
    before = prepare(list_image_folder(root), tmp_path / "v1")
    old = {str(i): s for s in SPLITS for i in ImageStore(tmp_path / "v1", s).ids}
    for c, name in enumerate(("red", "green", "blue")):
        for i in range(4):
            write_image(root / name / f"new-{i}.png", (90, 90, 90), seed=5000 + 10 * c + i)
    prepare(list_image_folder(root), tmp_path / "v2")
    new = {str(i): s for s in SPLITS for i in ImageStore(tmp_path / "v2", s).ids}
    assert len(new) == len(old) + 12
    assert all(new[i] == s for i, s in old.items())
    assert before["totals"]["test"] > 0 and before["totals"]["val"] > 0


def test_the_same_picture_in_two_given_splits_is_kept_once(tmp_path):
    root = tmp_path / "raw"
    for split in ("train", "val", "test"):
        write_colour_folder(root / split, per_class=4)  # identical images in every split
    report = prepare(list_image_folder(root), tmp_path / "prepared")
    assert sum(report["totals"].values()) == 12
    hashes = [h for s in SPLITS for h in load_arrays(tmp_path / "prepared" / f"{s}.npz")["sha256"]]
    assert len(set(hashes)) == len(hashes) == 12
    assert len(report["duplicates"]) == 24


def test_store_round_trip_and_train_statistics(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=10)
    report = prepare(list_image_folder(root), tmp_path / "prepared", short_side=16)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == [
        "meta.json", "test.bin", "test.npz", "train.bin", "train.npz", "val.bin", "val.npz"]
    train = ImageStore(tmp_path / "prepared", "train")
    pixels = np.concatenate([image.reshape(-1, 3) for image in train]) / 255.0
    np.testing.assert_allclose(report["train_mean"], pixels.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(report["train_std"], pixels.std(axis=0), atol=1e-5)
    for split in SPLITS:
        store = ImageStore(tmp_path / "prepared", split)
        assert len(store) == report["totals"][split] > 0
        for image, label in zip(store, store.labels, strict=True):
            assert image.dtype == np.uint8 and image.shape == (16, 21, 3)  # 48x36 -> 21x16
            assert image.mean(axis=(0, 1)).argmax() == {"blue": 2, "green": 1, "red": 0}[
                store.classes[label]]


def test_parallel_decoding_writes_the_same_store(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=30)  # 90 files: above the pool cut-off
    prepare(list_image_folder(root), tmp_path / "serial", workers=1)
    prepare(list_image_folder(root), tmp_path / "parallel", workers=2)
    for name in ("train.bin", "val.bin", "test.bin", "train.npz"):
        serial, parallel = tmp_path / "serial" / name, tmp_path / "parallel" / name
        assert serial.read_bytes() == parallel.read_bytes()


def test_max_per_class_caps_each_class(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=20)
    report = prepare(list_image_folder(root), tmp_path / "prepared", max_per_class=12)
    per_class = {name: sum(report["counts"][s][name] for s in SPLITS)
                 for name in report["classes"]}
    assert per_class == {"blue": 12, "green": 12, "red": 12}
    assert report["left_out_by_max_per_class"] == 24


def test_small_classes_fail_naming_them_and_leave_no_store(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=6)
    for path in list((root / "red").iterdir())[:4]:
        path.write_bytes(b"broken")
    (root / "empty-class").mkdir()
    (root / "empty-class" / "readme.txt").write_text("no images here")
    with pytest.raises(PipelineError, match=r"classes 'empty-class' \(0\), 'red' \(2\) have fewer "
                                            r"usable images than data.min_per_class=5"):
        prepare(list_image_folder(root), tmp_path / "prepared", min_per_class=5)
    assert not (tmp_path / "prepared").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_a_class_short_of_images_names_the_files_skipped(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=6)
    for i in range(2):
        (root / "red" / f"cut{i}.png").write_bytes((root / "red" / "0.png").read_bytes()[:40])
    (root / "red" / "0.png").unlink()
    with pytest.raises(PipelineError) as err:
        prepare(list_image_folder(root), tmp_path / "prepared", min_per_class=6)
    assert str(err.value).startswith(
        "class 'red' (5) has fewer usable images than data.min_per_class=6 (2 files of the "
        "source skipped, the first red/cut0.png: not an image (content not recognised as JPEG, "
        "PNG, WebP, GIF, BMP, TIFF, PNM or AVIF))")
    assert str(err.value).endswith("; add images, remove the class folder, or lower "
                                   "data.min_per_class")


def test_an_empty_split_fails_with_what_to_change(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=2)
    with pytest.raises(PipelineError, match="split '.*' ends up empty .*data.val_size=0.01"):
        prepare(list_image_folder(root), tmp_path / "prepared", val_size=0.01, test_size=0.01)


def test_an_empty_carved_split_says_it_was_carved_from_the_training_images(tmp_path):
    root = tmp_path / "raw"
    write_colour_folder(root / "train", per_class=2)
    write_colour_folder(root / "val", per_class=2)
    with pytest.raises(PipelineError) as err:
        prepare(list_image_folder(root), tmp_path / "prepared", test_size=0.01)
    assert str(err.value) == (
        "split 'test' ends up empty: the source gives no test folder or rows, so it is carved "
        "from its 6 usable training images (data.test_size=0.01 of them), and none fell there; "
        "add images, give that split, or raise data.test_size")


def test_image_store_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ImageStore(tmp_path, "dev")


def test_odd_paths_and_a_read_only_folder_are_fine(tmp_path):
    root = tmp_path / "my photos ✓"
    for c, name in enumerate(("chat noir", "猫", "dog's")):
        for i in range(4):
            colour = (40 * c, 90, 200 - 40 * c)
            write_image(root / name / f"photo {i} é.png", colour, seed=c * 9 + i)
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)
    try:
        report = prepare(list_image_folder(root), tmp_path / "prepared")
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755)
    assert report["classes"] == ["chat noir", "dog's", "猫"]
    assert sum(report["totals"].values()) == 12 and report["skipped"] == []


def test_a_decompression_bomb_is_skipped_without_decoding_it(tmp_path):
    root = write_colour_folder(tmp_path / "raw", per_class=4)
    Image.new("1", (20_000, 20_000)).save(root / "red" / "bomb.png")  # 400 megapixels
    report = prepare(list_image_folder(root), tmp_path / "prepared")
    [item] = report["skipped"]
    assert item["path"] == "red/bomb.png"
    assert item["reason"].startswith("too many pixels to decode safely")


def test_images_are_read_by_position_without_mapping_the_store(embedded_project):
    directory = embedded_project / "data" / "prepared"
    store = ImageStore(directory, "train")
    images = list(store)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system")
    assert str((directory / "train.bin").resolve()) not in maps.read_text()
    raw = (directory / "train.bin").read_bytes()
    with np.load(directory / "train.npz") as index:
        offsets, shapes = index["offsets"], index["shapes"]
    for i in (0, len(store) // 2, len(store) - 1):
        h, w = (int(v) for v in shapes[i])
        assert images[i].shape == (h, w, 3) and images[i].dtype == np.uint8
        assert images[i].tobytes() == raw[int(offsets[i]):int(offsets[i]) + h * w * 3]


def test_the_report_lists_what_was_skipped_by_path_whatever_order_folders_list_it(
        tmp_path, monkeypatch):
    # os.scandir gives a folder's entries in the file system's order, which differs between
    # machines: the Git-tracked report must not.
    import os

    root = write_colour_folder(tmp_path / "raw", per_class=6)
    for name in ("zz-gone.png", "aa-gone.png", "mm-gone.png"):
        (root / "red" / name).symlink_to(tmp_path / "nothing.png")
    scandir = os.scandir

    class Reversed:
        def __init__(self, path="."):
            with scandir(path) as entries:
                self.entries = sorted(entries, key=lambda e: e.name, reverse=True)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Reversed)
    report = prepare(list_image_folder(root), tmp_path / "prepared")
    assert [entry["path"] for entry in report["skipped"]] == [
        "red/aa-gone.png", "red/mm-gone.png", "red/zz-gone.png"]
