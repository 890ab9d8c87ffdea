import os

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image

from tests.conftest import write_colour_folder, write_image
from transfer.errors import PipelineError
from transfer.sources import (
    list_image_folder,
    list_manifest,
    list_source,
    write_digits_image_folder,
    write_torchvision_dataset,
)


def test_digits_are_written_as_an_image_folder(tmp_path):
    write_digits_image_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(d) for d in range(10)]
    files = list(tmp_path.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as image:
        assert image.size == (8, 8) and image.mode == "L"
        assert np.asarray(image).max() > 200  # ink scaled from 0..16 to 0..255


def test_every_file_below_a_class_folder_is_that_class(image_folder):
    write_image(image_folder / "red" / "nested" / "deep" / "x.png", (200, 0, 0), seed=99)
    (image_folder / "blue" / ".DS_Store").write_bytes(b"junk")
    (image_folder / ".hidden-class").mkdir()
    listing = list_image_folder(image_folder)
    labels = [image.label for image in listing.images()]
    assert sorted(set(labels)) == ["blue", "green", "red"]
    assert labels.count("red") == 7
    assert "red/nested/deep/x.png" in {image.id for image in listing.images()}
    assert all(image.split is None for image in listing.images())
    assert not any(".DS_Store" in image.id for image in listing.images())


def test_unicode_class_names_are_kept_as_written(tmp_path):
    for name in ("café", "日本", "Zebra"):
        write_image(tmp_path / name / "a.png", (1, 2, 3), seed=len(name))
    labels = {image.label for image in list_image_folder(tmp_path).images()}
    assert sorted(labels) == ["Zebra", "café", "日本"]


def test_a_link_out_of_the_root_is_refused(image_folder, tmp_path):
    outside = write_image(tmp_path / "secret.png", (0, 0, 0))
    os.symlink(outside, image_folder / "red" / "link.png")
    with pytest.raises(PipelineError) as err:
        list_image_folder(image_folder)
    assert str(err.value) == (f"data.source: '{image_folder}/red/link.png' is a link to "
                              f"'{outside}', outside the data root '{image_folder}'; copy the "
                              "file into the data root or remove the link")


def test_a_class_folder_linked_from_outside_the_root_is_named(image_folder, tmp_path):
    outside = write_colour_folder(tmp_path / "elsewhere") / "red"
    os.symlink(outside, image_folder / "crimson", target_is_directory=True)
    with pytest.raises(PipelineError) as err:
        list_image_folder(image_folder)
    assert str(err.value) == (f"data.source: class folder '{image_folder}/crimson' is a link "
                              f"to '{outside}', outside the data root '{image_folder}'; copy "
                              "the folder into the data root or remove the link")


def test_a_link_inside_the_root_is_read(image_folder):
    os.symlink(image_folder / "red" / "0.png", image_folder / "red" / "again.png")
    assert "red/again.png" in {image.id for image in list_image_folder(image_folder).images()}


def test_pre_split_root_keeps_its_splits(tmp_path):
    for split in ("training", "validation", "test"):
        for cls in ("a", "b"):
            write_image(tmp_path / split / cls / "0.png", (1, 2, 3), seed=hash((split, cls)) % 999)
    listing = list_image_folder(tmp_path)
    splits = {image.id: image.split for image in listing.images()}
    assert splits["training/a/0.png"] == "train"
    assert splits["validation/b/0.png"] == "val"
    assert splits["test/a/0.png"] == "test"
    assert {image.label for image in listing.images()} == {"a", "b"}


@pytest.mark.parametrize(("folders", "message"), [
    (["train", "val", "validation"], "has two folders for one split"),
    (["val", "test"], "looks pre-split \\(test, val\\) but has no train/ folder"),
])
def test_ambiguous_pre_split_roots_are_refused(tmp_path, folders, message):
    for folder in folders:
        write_image(tmp_path / folder / "cls" / "0.png", (1, 2, 3))
    with pytest.raises(PipelineError, match=message):
        list_image_folder(tmp_path)


@pytest.mark.parametrize("names", [["test", "cat", "dog"], ["train", "val", "extra"]])
def test_classes_named_like_splits_beside_other_classes_are_classes(tmp_path, names, caplog):
    for i, name in enumerate(names):
        write_image(tmp_path / name / "0.png", (i, 2, 3))
    listing = list_image_folder(tmp_path)
    assert sorted((image.label, image.split) for image in listing.images()) == \
        sorted((name, None) for name in names)
    split_named = ", ".join(sorted(n for n in names if n in ("test", "train", "val")))
    assert f"{split_named} read as classes" in caplog.text


def test_a_class_folder_named_test_inside_a_pre_split_root_is_a_class(tmp_path):
    for split in ("train", "test"):
        for cls in ("test", "other"):
            write_image(tmp_path / split / cls / "0.png", (1, 2, 3), seed=hash((split, cls)) % 99)
    listing = list_image_folder(tmp_path)
    assert {(image.label, image.split) for image in listing.images()} == {
        ("test", "train"), ("other", "train"), ("test", "test"), ("other", "test")}


@pytest.mark.parametrize(("name", "what"), [
    ("line\nbreak", "the control character '\\n'"),
    ("tab\there", "the control character '\\t'"),
    ("esc\x1b[31m", "the control character '\\x1b'"),
    ("para\u2029graph", "the control character '\\u2029'"),
    (os.fsdecode(b"caf\xe9"), "bytes that are not UTF-8"),
])
def test_a_class_folder_name_with_a_control_character_is_refused(tmp_path, name, what):
    write_image(tmp_path / "fine" / "0.png", (1, 2, 3))
    write_image(tmp_path / name / "0.png", (3, 2, 1))
    with pytest.raises(PipelineError) as err:
        list_image_folder(tmp_path)
    shown = repr(os.fsencode(name).decode("utf-8", "backslashreplace"))
    assert str(err.value) == (f"data.source: class folder '{tmp_path / name}': the class name "
                              f"{shown} holds {what}; rename the folder")


def test_a_file_name_that_is_not_utf8_is_skipped_and_reported(image_folder):
    write_image(image_folder / "red" / os.fsdecode(b"caf\xe9.png"), (1, 2, 3))
    listing = list_image_folder(image_folder)
    assert listing.skipped == [{"path": "red/caf\\xe9.png", "reason": "the file name is not "
                                "UTF-8 or holds a control character; rename the file"}]
    assert len(listing) == 18


def test_files_beside_the_class_folders_are_skipped_and_reported(image_folder, tmp_path):
    (image_folder / "README.md").write_text("about these photos")
    write_image(image_folder / "unfiled.png", (1, 2, 3))
    write_image(image_folder / ".thumbnail.png", (1, 2, 3))  # hidden: not even reported
    listing = list_image_folder(image_folder)
    assert len(listing) == 18  # the class folders' images, as before
    reason = "not in a class folder, so it has no label"
    assert listing.skipped == [{"path": "README.md", "reason": reason},
                               {"path": "unfiled.png", "reason": reason}]
    root = tmp_path / "split"
    for split in ("train", "test"):
        write_image(root / split / "cat" / "0.png", (1, 2, 3), seed=len(split))
    write_image(root / "train" / "stray.png", (3, 2, 1))
    (root / "NOTES.txt").write_text("notes")
    assert list_image_folder(root).skipped == [{"path": "NOTES.txt", "reason": reason},
                                               {"path": "train/stray.png", "reason": reason}]


def test_links_to_folders_and_to_nothing_are_reported_and_empty_classes_named(
        image_folder, caplog):
    elsewhere = image_folder.parent / "elsewhere"
    elsewhere.mkdir()
    (image_folder / "red" / "more").symlink_to(elsewhere, target_is_directory=True)
    (image_folder / "red" / "gone.png").symlink_to(image_folder / "nothing.png")
    (image_folder / "red" / "loop.png").symlink_to("loop.png")  # a link that leads to itself
    (image_folder / "purple").mkdir()
    (image_folder / "purple" / ".DS_Store").write_bytes(b"\0")
    listing = list_image_folder(image_folder)
    assert sorted(listing.skipped, key=lambda s: s["path"]) == [
        {"path": "red/gone.png", "reason": "a link to nothing (its target is gone)"},
        {"path": "red/loop.png", "reason": "cannot be read (Too many levels of symbolic links)"},
        {"path": "red/more", "reason": "a link to a folder (not followed: copy the folder into "
                                       "the data instead)"}]
    assert len(listing) == 18  # the class folders' images, all of them
    assert "purple" not in listing.classes()
    assert f"class folder '{image_folder / 'purple'}' holds no files, so it is no class" \
        in caplog.text


def test_missing_and_empty_roots_are_named(tmp_path):
    with pytest.raises(PipelineError, match=r"'.*nowhere' does not exist"):
        list_source(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"'.*a-file' is not a directory"):
        list_source(str(tmp_path / "a-file"), tmp_path)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"'.*empty' holds no files in class sub-folders"):
        list_source(str(tmp_path / "empty"), tmp_path)


def write_manifest(root, text):
    path = root / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_rows_are_resolved_against_its_folder(tmp_path):
    root = tmp_path / "set"
    write_image(root / "img" / "1.png", (1, 2, 3))
    write_image(root / "img" / "2.png", (3, 2, 1), seed=2)
    write_image(tmp_path / "outside.png", (9, 9, 9))
    manifest = write_manifest(root, "path,label,split\nimg/1.png,cat,train\n"
                                    "img/2.png,dog,validation\nimg/3.png,dog,\n"
                                    "../outside.png,cat,\n/etc/passwd,cat,\n")
    listing = list_manifest(manifest)
    assert [(i.id, i.label, i.split) for i in listing.images()] == [
        ("img/1.png", "cat", "train"), ("img/2.png", "dog", "val")]
    assert listing.skipped == [
        {"path": "img/3.png", "reason": "does not exist"},
        {"path": "../outside.png", "reason": "escapes the data root (the manifest's folder)"},
        {"path": "/etc/passwd", "reason": "escapes the data root (the manifest's folder)"},
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("file,class\na.png,x\n", "must name the columns path,label\\[,split\\]; found: file,class"),
    ("path,label,split\na.png,x,holdout\n", "line 2: split 'holdout' is not one of train"),
    ("path,label\na.png,x\nb.png,\n", "line 3: every row needs a path and a label"),
    ("path,label\n", "the manifest lists no images"),
])
def test_bad_manifests_name_the_line_or_the_columns(tmp_path, text, message):
    write_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(PipelineError, match=message):
        list_manifest(write_manifest(tmp_path, text))


@pytest.mark.parametrize(("content", "message"), [
    (b"path,label\na.png,\"cat\nwith a line break\"\n",
     "labels.csv line 3: the class name 'cat\\nwith a line break' holds the control "
     "character '\\n'; edit the label"),
    (b"path,label\na.png,\x07bell\n",
     "labels.csv line 2: the class name '\\x07bell' holds the control character '\\x07'; "
     "edit the label"),
    ("path,label\na.png,café\n".encode("latin-1"),
     "labels.csv: not UTF-8 text (byte 0xe9); save it as UTF-8, with or without BOM"),
    ("path,label\na.png,cat\n".encode("utf-16"),
     "labels.csv: not UTF-8 text (byte 0xff; the file looks like UTF-16); save it as UTF-8, "
     "with or without BOM"),
    (b"path,label\na.png,c\x00t\n", "labels.csv line 2: the class name 'c\\x00t' holds the "
                                      "control character '\\x00'; edit the label"),
    (b"path,label\na.png," + b"x" * 200_000 + b"\n",
     "labels.csv line 2: not a valid CSV row (field larger than field limit (131072))"),
], ids=["newline", "bell", "latin-1", "utf-16", "nul", "huge field"])
def test_a_bad_manifest_label_or_encoding_is_one_line(tmp_path, content, message):
    write_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(PipelineError) as err:
        list_manifest(tmp_path / "labels.csv")
    assert str(err.value) == f"{tmp_path}/{message}"


def test_a_manifest_with_a_byte_order_mark_and_odd_paths_is_read(tmp_path):
    write_image(tmp_path / "a.png", (1, 2, 3))
    rows = ["path,label", "a.png,cat", f"{'x' * 300}.png,cat", "b\x01.png,dog"]
    (tmp_path / "labels.csv").write_bytes("\n".join(rows).encode("utf-8-sig"))
    listing = list_manifest(tmp_path / "labels.csv")
    assert [image.id for image in listing.images()] == ["a.png"]
    assert [item["reason"] for item in listing.skipped] == [
        "cannot be read (File name too long)", "does not exist"]


def test_unknown_torchvision_data_set_suggests_names(tmp_path):
    with pytest.raises(PipelineError, match="no data set 'CIFAR11'; did you mean CIFAR10"):
        write_torchvision_dataset("CIFAR11", tmp_path / "in", tmp_path / "out")


def test_torchvision_offline_says_which_files_to_place_where(tmp_path):
    with pytest.raises(PipelineError) as err:
        write_torchvision_dataset("CIFAR10", tmp_path / "CIFAR10", tmp_path / "out")
    message = str(err.value)
    assert "torchvision:CIFAR10 is not on disk" in message
    assert "cifar-10-python.tar.gz (from https://" in message
    assert f"into '{tmp_path / 'CIFAR10'}/'" in message


class TinySplitDataset(torchvision.datasets.VisionDataset):
    """Stands in for a torchvision data set with a ``split`` argument, like Flowers102."""

    classes = ["ant", "bee"]

    def __init__(self, root, split="train", download=False):
        super().__init__(root)
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split}")
        self.offset = 0 if split == "train" else 100

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return Image.new("RGB", (6, 5), (index + self.offset, 0, 0)), index % 2


def test_torchvision_splits_are_written_as_a_pre_split_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "TinySplitDataset", TinySplitDataset,
                        raising=False)
    listing = list_source("torchvision:TinySplitDataset", tmp_path)
    by_split = {}
    for image in listing.images():
        by_split.setdefault(image.split, set()).add(image.label)
    assert by_split == {"train": {"ant", "bee"}, "test": {"ant", "bee"}}
    assert len(listing) == 8


class NumberedDataset(torchvision.datasets.VisionDataset):
    """Enough samples for the writing processes: sample i is a 7x5 image of one colour, its
    class i % 3; ``broken`` names a sample whose file cannot be read."""

    classes = ["ant", "bee", "wasp/hornet"]

    def __init__(self, root, size=300, broken=None):
        super().__init__(root)
        self.size, self.broken = size, broken

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index == self.broken:
            raise OSError("image file is truncated (3 bytes not processed)")
        return Image.new("RGB", (7, 5), (index % 256, index // 256, 9)), index % 3


def written(folder):
    return {path.relative_to(folder).as_posix(): np.asarray(Image.open(path)).tobytes()
            for path in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("workers", [1, 2])
def test_torchvision_samples_are_written_by_every_process_alike(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(torchvision.datasets, "NumberedDataset", NumberedDataset, raising=False)
    write_torchvision_dataset("NumberedDataset", tmp_path / "in", tmp_path / "out",
                              workers=workers)
    files = written(tmp_path / "out")
    assert len(files) == 300
    for index in (0, 1, 2, 257, 299):
        label = ["ant", "bee", "wasp_hornet"][index % 3]
        pixels = np.asarray(Image.new("RGB", (7, 5), (index % 256, index // 256, 9)))
        assert files[f"train/{label}/{index:06d}.png"] == pixels.tobytes()


def test_torchvision_processes_write_what_one_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "NumberedDataset", NumberedDataset, raising=False)
    for workers in (1, 2):
        write_torchvision_dataset("NumberedDataset", tmp_path / "in", tmp_path / str(workers),
                                  workers=workers)
    assert written(tmp_path / "1") == written(tmp_path / "2")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_torchvision_sample_is_named(tmp_path, monkeypatch, workers):
    class Broken(NumberedDataset):
        def __init__(self, root):
            super().__init__(root, broken=270)

    monkeypatch.setattr(torchvision.datasets, "Broken", Broken, raising=False)
    with pytest.raises(PipelineError, match=r"^data.source: torchvision:Broken, train sample "
                                            r"270 cannot be read: image file is truncated"):
        write_torchvision_dataset("Broken", tmp_path / "in", tmp_path / "out", workers=workers)


def test_an_unreadable_folder_is_named_not_skipped(image_folder, monkeypatch):
    write_image(image_folder / "red" / "nested" / "x.png", (200, 0, 0), seed=99)
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "nested":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PipelineError, match=r"folder '.*nested' \(Permission denied\)"):
        list_image_folder(image_folder)
