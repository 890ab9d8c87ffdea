import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from transfer.artifacts import (
    atomic_output,
    atomic_outputs,
    load_arrays,
    read_json,
    save_arrays,
    save_arrays_streamed,
    scratch_directory,
    write_csv,
    write_files,
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


def test_several_outputs_are_replaced_together_or_not_at_all(tmp_path):
    first, second = tmp_path / "metrics.json", tmp_path / "plots" / "gallery.png"
    write_files({first: "old", second: b"old"})
    with pytest.raises(RuntimeError), atomic_outputs(first, second) as (tmp1, tmp2):
        tmp1.write_text("new")
        raise RuntimeError("the second output could not be drawn")
    assert first.read_text() == "old" and second.read_bytes() == b"old"
    write_files({first: "new", second: b"new"})
    assert first.read_text() == "new" and second.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gallery.png", "metrics.json", "plots"]


def test_an_output_written_into_a_temporary_is_written_in_place(tmp_path):
    with atomic_outputs(tmp_path / "head.npz", tmp_path / "metrics.json") as (head, metrics):
        save_arrays(head, x=np.arange(2))
        write_json(metrics, {"accuracy": 1.0})
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".head.npz.tmp-{os.getpid()}", f".metrics.json.tmp-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.npz", "metrics.json"]


def test_ctrl_c_while_outputs_are_renamed_waits_for_the_renames(tmp_path, monkeypatch):
    import signal

    real_replace = os.replace

    def interrupted_replace(src, dst):  # Ctrl-C arrives during the first rename
        real_replace(src, dst)
        signal.raise_signal(signal.SIGINT)

    outputs = [tmp_path / name for name in ("a", "b", "c")]
    with pytest.raises(KeyboardInterrupt, match="interrupted after the outputs were written"), \
            atomic_outputs(*outputs) as temps:
        for i, tmp in enumerate(temps):
            tmp.write_text(str(i))
        monkeypatch.setattr(os, "replace", interrupted_replace)
    assert [p.read_text() for p in outputs] == ["0", "1", "2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_scratch_directory_is_removed_and_a_killed_runs_one_too(tmp_path):
    stale = tmp_path / f".prepared.scratch-{_finished_pid()}"
    (stale / "digits").mkdir(parents=True)
    with scratch_directory(tmp_path / "prepared") as scratch:
        assert scratch.parent == tmp_path and scratch.name == f".prepared.scratch-{os.getpid()}"
        assert not stale.exists()
        (scratch / "0.png").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporaries_cleared_by_another_run_at_once_are_no_error(tmp_path,
                                                                              monkeypatch):
    # Two extractions sharing the embedding store both find a killed run's scratch folder
    # and remove it; the other one gets there first.
    stale = tmp_path / f".shard.scratch-{_finished_pid()}"
    (stale / "rows").mkdir(parents=True)
    stale_file = tmp_path / f".shard.tmp-{_finished_pid()}"
    stale_file.write_bytes(b"half")
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink

    def removed_by_the_other_run_first(path, *args, **kwargs):
        real_rmtree(path)
        real_rmtree(path, *args, **kwargs)  # FileNotFoundError, as the tree is gone

    def unlinked_by_the_other_run_first(path, missing_ok=False):
        if path == stale_file and path.exists():
            real_unlink(path)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(shutil, "rmtree", removed_by_the_other_run_first)
    monkeypatch.setattr(Path, "unlink", unlinked_by_the_other_run_first)
    with scratch_directory(tmp_path / "shard") as scratch:
        (scratch / "rows.npz").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_side_files_of_a_killed_runs_temporary_are_cleaned_up(tmp_path):
    stale = tmp_path / f".classifier.onnx.tmp-{_finished_pid()}.data"
    stale.write_bytes(b"external data")
    write_files({tmp_path / "classifier.onnx": b"model"})
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.onnx"]


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "meta.json"
    path.write_bytes(b'{"classes": ["caf\xe9"]}')
    with pytest.raises(PipelineError, match=r"meta.json: not UTF-8 text \(byte 0xe9\); save it "
                                            r"as UTF-8, with or without BOM"):
        read_json(path)
    path.write_bytes('{"classes": ["café"]}'.encode("utf-8-sig"))
    assert read_json(path) == {"classes": ["café"]}


@pytest.mark.parametrize("content", [b"PK\x03\x04" + bytes(range(256)) * 4,
                                     b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'}",
                                     b"", bytes(range(256))],
                         ids=["broken zip", "bare npy", "empty", "random"])
def test_damaged_array_files_are_one_error(tmp_path, content):
    path = tmp_path / "head.npz"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="head.npz: not a readable array file"):
        load_arrays(path)


def _finished_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
