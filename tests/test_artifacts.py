import os
import subprocess

import numpy as np
import pytest

from transfer.artifacts import (
    atomic_output,
    load_arrays,
    read_json,
    save_arrays,
    save_arrays_streamed,
    write_csv,
    write_json,
)
from transfer.errors import PipelineError


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text('{"version": ')
        raise RuntimeError("killed")
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_directory_output_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "store"
    for version in (1, 2):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / f"v{version}").write_text("x")
    assert [p.name for p in target.iterdir()] == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_arrays_round_trip_and_object_arrays_are_refused(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, x=np.arange(3.0), names=np.asarray(["é", "b"]))
    loaded = load_arrays(path)
    assert np.array_equal(loaded["x"], np.arange(3.0))
    assert list(loaded["names"]) == ["é", "b"]
    with pytest.raises(TypeError, match="dtype object"):
        save_arrays(path, bad=np.asarray([{"a": 1}], dtype=object))


def test_streamed_arrays_give_the_same_file_as_whole_ones(tmp_path):
    ids = np.asarray([f"img{i}é" for i in range(10)])
    shapes = np.arange(20, dtype=np.int32).reshape(10, 2)
    save_arrays(tmp_path / "whole.npz", ids=ids, shapes=shapes)
    save_arrays_streamed(tmp_path / "streamed.npz", {
        "ids": (ids.dtype, (10,), [ids[:4], ids[4:]]),
        "shapes": (np.int32, (10, 2), (shapes[i:i + 3] for i in range(0, 10, 3)))})
    assert (tmp_path / "streamed.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


def test_a_streamed_array_short_of_rows_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="'x' got 2 rows, expected 3"):
        save_arrays_streamed(tmp_path / "a.npz", {"x": (np.int64, (3,), [np.arange(2)])})
    assert list(tmp_path.iterdir()) == []


def test_pickled_arrays_are_not_loaded(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, bad=np.asarray([{"a": 1}], dtype=object))
    with pytest.raises(PipelineError, match="not a readable array file"):
        load_arrays(path)


def test_missing_inputs_say_how_to_make_them(tmp_path):
    with pytest.raises(PipelineError, match="missing; run the stage that writes it"):
        read_json(tmp_path / "none.json")
    with pytest.raises(PipelineError, match="missing; run the stage that writes it"):
        load_arrays(tmp_path / "none.npz")
    (tmp_path / "bad.json").write_text("{\n  oops")
    with pytest.raises(PipelineError, match=r"bad.json: not valid JSON \(line 2\)"):
        read_json(tmp_path / "bad.json")


def test_csv_has_a_header_and_one_line_per_row(tmp_path):
    path = tmp_path / "rows.csv"
    write_csv(path, [{"actual": "a", "predicted": "b"}, {"actual": "b", "predicted": "b"}])
    assert path.read_text().splitlines() == ["actual,predicted", "a,b", "b,b"]


def test_temporaries_of_killed_processes_are_cleaned_up(tmp_path):
    dead = _finished_pid()
    stale_file = tmp_path / f".out.json.tmp-{dead}"
    stale_dir = tmp_path / f".store.tmp-{dead}"
    stale_file.write_text("half")
    stale_dir.mkdir()
    live = tmp_path / f".out.json.tmp-{os.getppid()}"  # a running process: left alone
    live.write_text("in progress")
    write_json(tmp_path / "out.json", {"ok": True})
    with atomic_output(tmp_path / "store") as tmp:
        tmp.mkdir()
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists()


def _finished_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
