import json
import shutil
import sqlite3

import pytest

from stages import prepare
from tests.conftest import kill_stage_midway, run_stage_cli, write_colour_folder, write_params
from transfer.catalog import Catalog
from transfer.data import SPLITS, ImageStore
from transfer.errors import PipelineError


def test_prepare_writes_the_store_and_the_report(embedded_project):
    report = json.loads((embedded_project / "reports" / "data.json").read_text())
    assert report["classes"] == ["blue", "green", "red"]
    assert report["skipped"] == [] and report["duplicates"] == []
    for split in SPLITS:
        store = ImageStore(embedded_project / "data" / "prepared", split)
        assert len(store) == sum(report["counts"][split].values()) == report["totals"][split] > 0


def test_digits_source_gives_all_1797_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"source": "digits"}})
    prepare.main()
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    totals = report["totals"]
    assert sum(totals.values()) == 1797
    assert 200 < totals["test"] < 340 and 200 < totals["val"] < 340  # about 15% each
    assert report["small_images"]["count"] == 1797  # 8x8 pixels: reported, not hidden


def test_bad_params_fail_with_one_line_and_no_output(tmp_path):
    write_params(tmp_path, {"data": {"sorce": "digits"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key 'data.sorce' (did you mean 'data.source'?); "
        "valid keys in data: source, val_size, test_size, min_per_class, max_per_class, short_side"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_missing_source_and_tiny_class_are_named(tmp_path):
    write_params(tmp_path, {"data": {"source": "data/raw/nothing"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert "error: data.source: 'data/raw/nothing' is not a directory" in result.stderr
    assert "Traceback" not in result.stderr

    write_colour_folder(tmp_path / "data" / "raw" / "few", per_class=2)
    write_params(tmp_path, {"data": {"source": "data/raw/few"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert ("error: classes 'blue' (2), 'green' (2), 'red' (2) have fewer usable images than "
            "data.min_per_class=5" in result.stderr)
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_partial_store_and_reruns_identically(tmp_path, monkeypatch):
    from benchmarks.decode_speed import generate

    generate(tmp_path / "data" / "raw" / "photos", 120, size=(1600, 1200))
    write_params(tmp_path, {"data": {"source": "data/raw/photos", "min_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    prepare.main()
    store = tmp_path / "data" / "prepared"
    reference = {p.name: p.read_bytes() for p in store.iterdir()}
    shutil.rmtree(store)
    staging = (tmp_path / "data").glob
    kill_stage_midway("prepare", tmp_path, lambda: any(
        p.stat().st_size for p in staging(".prepared.tmp-*/staging/*")))
    assert not store.exists()
    prepare.main()  # what `dvc repro` runs next
    assert not list((tmp_path / "data").glob(".prepared.*"))
    assert {p.name: p.read_bytes() for p in store.iterdir()} == reference


def test_a_full_catalog_disk_names_tmpdir_and_leaves_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_colour_folder(tmp_path / "data" / "raw" / "colours")
    write_params(tmp_path, {"data": {"source": "data/raw/colours"}})

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "find_duplicates", full)
    with pytest.raises(PipelineError, match=r"prepare's temporary catalog failed \(database "
                                            r"or disk is full\); it lives in \$TMPDIR"):
        prepare.main()
    assert not (tmp_path / "data" / "prepared").exists()
    assert not list((tmp_path / "data").glob(".prepared*"))
