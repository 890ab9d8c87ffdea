import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import (
    one_error_line,
    run_stage_cli,
    working_directory,
    write_colour_folder,
    write_image,
    write_params,
)
from transfer.curation import content_id, read_exclude, read_relabel
from transfer.errors import PipelineError


def prepared(root: Path, exclude: str = "", relabel: str = "") -> dict:
    """Run prepare on ``root`` (a project with data/raw/colours) with these curation files;
    returns the data report."""
    from stages import prepare

    (root / "data" / "exclude.txt").write_text(exclude)
    (root / "data" / "relabel.csv").write_text(relabel)
    with working_directory(root):
        prepare.main()
    return json.loads((root / "reports" / "data.json").read_text())


def stored(root: Path) -> dict[str, tuple[str, str, str]]:
    """Every prepared image by path: (split, class, content id)."""
    meta = json.loads((root / "data" / "prepared" / "meta.json").read_text())
    out = {}
    for split in ("train", "val", "test"):
        with np.load(root / "data" / "prepared" / f"{split}.npz") as index:
            for path, label, sha in zip(index["ids"], index["labels"], index["sha256"],
                                        strict=True):
                out[str(path)] = (split, meta["classes"][label], content_id(sha.decode()))
    return out


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    write_colour_folder(tmp_path / "data" / "raw" / "colours", per_class=8)
    write_params(tmp_path, {"seed": 0, "data": {"source": "data/raw/colours", "val_size": 0.25,
                                                "test_size": 0.25}})
    return tmp_path


def test_exclude_and_relabel_change_the_store_and_the_report_says_what(colours):
    prepared(colours)
    before = stored(colours)
    blue_id = before["blue/3.png"][2]
    report = prepared(colours,
                      exclude="red/0.png   # blurry\n# a comment line\n\n" + blue_id + "\n"
                              "red/missing.png\n",
                      relabel="image,label\ngreen/1.png,red\n./green/2.png,red\n"
                              "green/5.png,green\n")
    after = stored(colours)
    assert set(before) - set(after) == {"red/0.png", "blue/3.png"}
    assert after["green/1.png"][1] == "red" and after["green/2.png"][1] == "red"
    assert after["green/5.png"][1] == "green"
    assert {k: v for k, v in after.items() if k not in ("green/1.png", "green/2.png")} == \
        {k: v for k, v in before.items() if k not in ("red/0.png", "blue/3.png", "green/1.png",
                                                      "green/2.png")}
    exclude, relabel = report["curation"]["exclude"], report["curation"]["relabel"]
    assert exclude["entries"] == 3
    assert exclude["excluded"] == [{"path": "red/0.png", "entry": "data/exclude.txt:1"},
                                   {"path": "blue/3.png", "entry": "data/exclude.txt:4"}]
    assert exclude["unmatched"] == ["data/exclude.txt:5"]
    assert [(r["path"], r["from"], r["to"]) for r in relabel["relabelled"]] == \
        [("green/1.png", "green", "red"), ("green/2.png", "green", "red")]
    assert relabel["unmatched"] == [] and relabel["entries"] == 3
    assert sum(report["counts"][split]["red"] for split in ("train", "val", "test")) == \
        8 - 1 + 2


def test_curating_test_images_leaves_every_file_finetune_depends_on_as_it_was(colours):
    # dvc.yaml makes finetune depend on these files of data/prepared, so that an excluded
    # leak or a relabelled photo in the test split re-runs evaluate, not fine-tuning.
    stage = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())
    watched = sorted(d for d in stage["stages"]["finetune"]["deps"]
                     if d.startswith("data/prepared"))
    assert watched == ["data/prepared/meta.json", "data/prepared/train.bin",
                       "data/prepared/train.npz", "data/prepared/val.bin",
                       "data/prepared/val.npz"]
    prepared(colours)
    tests = [path for path, (split, _, _) in sorted(stored(colours).items()) if split == "test"]
    before = {d: (colours / d).read_bytes() for d in watched}
    test_index = (colours / "data" / "prepared" / "test.npz").read_bytes()
    relabelled = tests[1]
    other = "red" if not relabelled.startswith("red/") else "green"
    report = prepared(colours, exclude=f"{tests[0]}\n",
                      relabel=f"image,label\n{relabelled},{other}\n")
    assert report["totals"]["test"] == len(tests) - 1
    assert stored(colours)[relabelled][1] == other
    assert {d: (colours / d).read_bytes() for d in watched} == before
    assert (colours / "data" / "prepared" / "test.npz").read_bytes() != test_index


def test_ids_do_not_change_when_files_are_added_renamed_or_moved(colours):
    prepared(colours)
    before = stored(colours)
    raw = colours / "data" / "raw" / "colours"
    for i in range(8, 20):  # more images in every class
        write_image(raw / "red" / f"{i}.png", (220, 30, 30), seed=5000 + i)
    (raw / "blue" / "3.png").rename(raw / "blue" / "three.png")
    blue_id = before["blue/3.png"][2]
    report = prepared(colours, exclude=f"{blue_id}\n")
    after = stored(colours)
    for path, (split, label, image_id) in before.items():
        if path != "blue/3.png":
            assert after[path] == (split, label, image_id), path
    assert "blue/three.png" not in after  # excluded by its id under its new name
    assert report["curation"]["exclude"]["excluded"] == [
        {"path": "blue/three.png", "entry": "data/exclude.txt:1"}]


def test_an_id_excludes_every_copy_and_a_path_only_that_file(colours):
    raw = colours / "data" / "raw" / "colours"
    shutil.copy(raw / "red" / "1.png", raw / "red" / "1-copy.png")
    prepared(colours)
    red_id = stored(colours)["red/1-copy.png"][2]  # of two copies, the first by path is kept
    assert "red/1.png" not in stored(colours)
    prepared(colours, exclude="red/1-copy.png\n")
    assert "red/1.png" in stored(colours)  # the other copy is kept now
    report = prepared(colours, exclude=f"{red_id}\n")
    assert {e["path"] for e in report["curation"]["exclude"]["excluded"]} == \
        {"red/1.png", "red/1-copy.png"}
    assert not {"red/1.png", "red/1-copy.png"} & set(stored(colours))


def test_a_path_with_exact_copies_says_which_stay_and_names_the_id(colours, caplog):
    # The audit shows one path of a picture that has exact copies: excluding or relabelling
    # that path leaves the copies as they were (relabelled, they then conflict and every copy
    # is set aside), which the log and the report say, with the id that reaches them all.
    raw = colours / "data" / "raw" / "colours"
    shutil.copy(raw / "red" / "1.png", raw / "red" / "1-copy.png")
    prepared(colours)
    red_id = stored(colours)["red/1-copy.png"][2]
    with caplog.at_level("WARNING", "stages.prepare"):
        exclude = prepared(colours, exclude="red/1-copy.png\n")["curation"]["exclude"]
        report = prepared(colours,
                          relabel="image,label\nred/1-copy.png,blue\ngreen/2.png,blue\n")
    relabel = report["curation"]["relabel"]
    assert exclude["copies_left"] == [{"entry": "data/exclude.txt:1", "path": "red/1-copy.png",
                                       "copies": ["red/1.png"], "id": red_id}]
    assert relabel["copies_left"] == [{"entry": "data/relabel.csv:2", "path": "red/1-copy.png",
                                       "copies": ["red/1.png"], "id": red_id}]
    assert [c["labels"] for c in report["conflicts"]] == [["blue", "red"]]  # as it warns
    assert "data/exclude.txt:1: 'red/1-copy.png' has exact copies that stay in: red/1.png; to " \
        f"exclude every copy, name the picture by its id, {red_id}" in caplog.text
    assert "data/relabel.csv:2: 'red/1-copy.png' has exact copies that keep their label" \
        in caplog.text
    # Named by its id (in capitals, as some viewers show hex), every copy goes.
    report = prepared(colours, exclude=f"{red_id.upper()}\n")
    assert report["curation"]["exclude"]["copies_left"] == []
    assert {e["path"] for e in report["curation"]["exclude"]["excluded"]} == \
        {"red/1.png", "red/1-copy.png"}


@pytest.mark.parametrize(("relabel", "message"), [
    ("image,label\nred/1.png,purple\n",
     "data/relabel.csv:2 (data.relabel): 'purple' is not a class; classes: blue, green, red"),
    ("path,class\nred/1.png,blue\n",
     "data/relabel.csv:1 (data.relabel): the first row must be the header image,label, got "
     "'path,class'"),
    ("image,label\nred/1.png\n",
     "data/relabel.csv:2 (data.relabel): expected two cells, image,label; got 'red/1.png'"),
    ("image,label\nred/1.png,blue\nred/1.png,green\n",
     "data/relabel.csv:3 (data.relabel): 'red/1.png' is relabelled 'green' here and 'blue' at "
     "data/relabel.csv:2; keep one"),
])
def test_a_bad_relabel_file_is_one_line_and_no_store(colours, relabel, message):
    (colours / "data" / "relabel.csv").write_text(relabel)
    assert one_error_line(run_stage_cli("prepare", colours)) == f"error: {message}"
    assert not (colours / "data" / "prepared").exists()


def test_an_id_with_a_label_that_is_not_a_class_stops_after_matching(colours):
    prepared(colours)
    red_id = stored(colours)["red/1.png"][2]
    (colours / "data" / "relabel.csv").write_text(f"image,label\n{red_id},purple\n")
    assert one_error_line(run_stage_cli("prepare", colours)) == (
        "error: data/relabel.csv:2 (data.relabel): 'purple' is not a class; classes: blue, "
        "green, red")


def test_rows_for_another_source_are_unmatched_not_an_error(colours):
    # Curated on another set (its classes, its ids and paths), then data.source switched.
    report = prepared(colours, exclude="n3/monkey.jpg\n",
                      relabel="image,label\nn1/monkey.jpg,n2\n6eed51473ac2629b,n1\n"
                              "green/1.png,red\n")
    relabel = report["curation"]["relabel"]
    assert relabel["unmatched"] == ["data/relabel.csv:2", "data/relabel.csv:3"]
    assert [r["path"] for r in relabel["relabelled"]] == ["green/1.png"]
    assert report["curation"]["exclude"]["unmatched"] == ["data/exclude.txt:1"]


def test_one_image_named_twice_with_two_labels_is_refused(colours):
    prepared(colours)
    green_id = stored(colours)["green/2.png"][2]
    (colours / "data" / "relabel.csv").write_text(
        f"image,label\n{green_id},red\ngreen/2.png,blue\n")
    assert one_error_line(run_stage_cli("prepare", colours)) == (
        f"error: data/relabel.csv:3 (data.relabel): 'green/2.png' names green/2.png, which "
        f"data/relabel.csv:2 ('{green_id}') relabels 'red'; here 'blue': keep one")
    assert (colours / "data" / "prepared").exists()  # the store of the run before, untouched
    (colours / "data" / "relabel.csv").write_text(
        f"image,label\n{green_id},red\ngreen/2.png,red\n")  # the same label twice: fine
    with working_directory(colours):
        from stages import prepare
        prepare.main()
    assert stored(colours)["green/2.png"][1] == "red"


def test_a_curation_file_params_name_must_exist(colours):
    write_params(colours, {"seed": 0, "data": {"source": "data/raw/colours", "val_size": 0.25,
                                               "test_size": 0.25, "exclude": "lists/gone.txt"}})
    assert one_error_line(run_stage_cli("prepare", colours)) == (
        "error: lists/gone.txt (data.exclude): missing; create it (an empty file changes "
        "nothing) or point data.exclude at another file")


def test_default_files_may_be_missing_or_empty(tmp_path):
    with working_directory(tmp_path):
        assert read_exclude("data/exclude.txt") == [] and read_relabel("data/relabel.csv") == []
        Path("data").mkdir()
        Path("data/relabel.csv").write_text("# nothing yet\nimage,label\n")
        assert read_relabel("data/relabel.csv") == []
    with pytest.raises(PipelineError, match="missing"):
        read_exclude(tmp_path / "elsewhere.txt")


def test_check_params_stops_on_a_malformed_relabel_file_before_prepare_runs(colours):
    # dvc repro runs check_params first: a bad header stops it there, before DVC deletes
    # prepare's outputs to run it.
    (colours / "data" / "relabel.csv").write_text("path,class\nred/1.png,blue\n")
    assert one_error_line(run_stage_cli("check_params", colours)) == (
        "error: data/relabel.csv:1 (data.relabel): the first row must be the header "
        "image,label, got 'path,class'")


@pytest.mark.parametrize("key", ["exclude", "relabel"])
def test_a_curation_file_outside_the_project_is_refused(colours, key):
    # Git cannot version a decision kept outside the repository; one line, before prepare.
    outside = colours.parent / f"{colours.name}-{key}.txt"
    outside.write_text("image,label\n" if key == "relabel" else "")
    write_params(colours, {"seed": 0, "data": {"source": "data/raw/colours", key: str(outside)}})
    line = one_error_line(run_stage_cli("check_params", colours))
    assert line.startswith(f"error: params.yaml: data.{key}='/") and line.endswith(
        " lies outside the project, so Git cannot track it; give a path inside it (default "
        f"data/{key}.{'csv' if key == 'relabel' else 'txt'})")
    write_params(colours, {"seed": 0, "data": {"source": "data/raw/colours",
                                               key: f"../{outside.name}"}})
    assert "lies outside the project" in one_error_line(run_stage_cli("check_params", colours))


def test_paths_written_from_the_repository_name_the_same_images(colours):
    # As `find data/raw -name ...` or a file manager gives them, beside paths relative to the
    # source as the reports write them.
    absolute = (colours / "data" / "raw" / "colours" / "red" / "1.png").as_posix()
    report = prepared(colours, exclude=f"data/raw/colours/red/0.png\n{absolute}\n",
                      relabel="image,label\n./data/raw/colours/green/1.png,red\n")
    assert [e["path"] for e in report["curation"]["exclude"]["excluded"]] == \
        ["red/0.png", "red/1.png"]
    assert [r["path"] for r in report["curation"]["relabel"]["relabelled"]] == ["green/1.png"]
    assert not report["curation"]["exclude"]["unmatched"]


def test_an_image_both_excluded_and_relabelled_is_reported_excluded_only(colours):
    report = prepared(colours, exclude="green/1.png\n",
                      relabel="image,label\ngreen/1.png,red\ngreen/2.png,red\n")
    assert [e["path"] for e in report["curation"]["exclude"]["excluded"]] == ["green/1.png"]
    assert [r["path"] for r in report["curation"]["relabel"]["relabelled"]] == ["green/2.png"]
    assert "green/1.png" not in stored(colours)
    # The relabel row that changed nothing is not lost: the report names it.
    assert report["curation"]["relabel"]["of_excluded"] == [
        {"path": "green/1.png", "entry": "data/relabel.csv:2"}]


@pytest.mark.parametrize(("exclude", "relabel"), [
    ("red/1-copy.png\n", "image,label\nred/1.png,blue\n"),   # the copy is excluded
    ("red/1.png\n", "image,label\nred/1.png,blue\n./red/1.png,blue\n"),  # the file itself
])
def test_no_copies_left_warning_where_no_copy_keeps_the_old_label(colours, exclude, relabel):
    raw = colours / "data" / "raw" / "colours"
    shutil.copy(raw / "red" / "1.png", raw / "red" / "1-copy.png")
    report = prepared(colours, exclude=exclude, relabel=relabel)
    assert report["curation"]["relabel"]["copies_left"] == [] and report["conflicts"] == []


def test_a_file_named_twice_is_warned_about_once(colours):
    raw = colours / "data" / "raw" / "colours"
    shutil.copy(raw / "red" / "1.png", raw / "red" / "1-copy.png")
    report = prepared(colours, exclude="red/1-copy.png\n./red/1-copy.png\n")
    assert len(report["curation"]["exclude"]["copies_left"]) == 1
