import errno
import subprocess
import sys

import pytest

from tests.conftest import one_error_line, run_stage_cli
from transfer.errors import ArgumentParser, PipelineError, one_line, run_stage, unprintable


def _fails_with(error):
    def main():
        raise error
    return main


@pytest.mark.parametrize(("error", "code", "stderr"), [
    (PipelineError("data.source: 'x' is not a directory"), 1,
     "error: data.source: 'x' is not a directory\n"),
    (OSError(errno.ENOSPC, "No space left on device", "data/embeddings/train.npy"), 1,
     "error: no space left on the disk writing data/embeddings/train.npy; free space and run "
     "it again\n"),
    (KeyboardInterrupt(), 130, "interrupted; nothing was written\n"),
    (KeyboardInterrupt("interrupted after the outputs were written"), 130,
     "interrupted after the outputs were written\n"),
    (PipelineError("class 'a\nb\tc\udcff' is bad"), 1,
     "error: class 'a\\nb\\tc\\udcff' is bad\n"),
], ids=["bad input", "full disk", "ctrl-c", "ctrl-c held back during the renames",
        "control characters escaped"])
def test_a_failure_is_one_line_and_an_exit_code(capsys, error, code, stderr):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(_fails_with(error))
    assert exit_info.value.code == code
    assert capsys.readouterr().err == stderr


def test_a_reader_that_goes_away_ends_the_output_quietly():
    # `python -m stages.predict photos/ | head`: head leaves after a few lines.
    program = ("from transfer.errors import run_stage\n"
               "def main():\n"
               "    for _ in range(100_000):\n"
               "        print('cat.jpg,cat,0.99')\n"
               "run_stage(main)\n")
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.read(18) == b"cat.jpg,cat,0.99\nc"
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait() == 141
    assert stderr == b""


def test_other_errors_keep_their_traceback():
    with pytest.raises(PermissionError):
        run_stage(_fails_with(PermissionError(errno.EACCES, "Permission denied")))


def test_unprintable_finds_line_breaks_controls_and_undecodable_bytes():
    assert unprintable("ok café 日本 ✓") == []
    assert unprintable("a\nb\rc\x00d\x1b\x7f\x85\u2028\u2029\udcff") == [
        "\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\udcff"]
    assert one_line("a\u2028b") == "a\\u2028b"


def test_a_bad_command_line_argument_is_one_line_and_exit_code_2(capsys):
    parser = ArgumentParser(prog="python -m stages.predict")
    parser.add_argument("--top-k", type=int)

    def main():
        parser.parse_args(["--top-k", "many"])

    with pytest.raises(SystemExit) as exit_info:
        run_stage(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: python -m stages.predict: argument --top-k: invalid int value: 'many' "
        "(see --help)\n")


@pytest.mark.parametrize("where", ["workspace experiment", "queued experiment", "dvc repro"])
def test_a_bad_parameter_in_a_workspace_experiment_says_how_to_put_params_back(
        tmp_path, monkeypatch, where):
    # After a failed `dvc exp run -S`, DVC leaves the value in params.yaml, where the next
    # `dvc exp run -S` of another key fails on it again.
    (tmp_path / "params.yaml").write_text("finetune:\n  epochs: 0\n")
    if where != "dvc repro":
        monkeypatch.setenv("DVC_EXP_NAME", "fleet-lees")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(workspace if where == "queued experiment" else tmp_path))
    line = one_error_line(run_stage_cli("check_params", tmp_path))
    assert line.startswith("error: params.yaml: finetune.epochs=0 is out of range")
    # Both commands touch the file first: Git may trust its index and see no change.
    hint = "`touch params.yaml && git diff params.yaml` shows it; " \
        "`touch params.yaml && git checkout params.yaml` puts back the committed file"
    assert (hint in line) == (where == "workspace experiment")


@pytest.mark.parametrize("where", ["dvc repro", "first run", "queued experiment", "by hand"])
def test_a_failed_stage_under_dvc_says_how_to_get_back_the_outputs_dvc_deleted(
        tmp_path, monkeypatch, capsys, where):
    # DVC deletes a stage's outputs before running its command: a stage stopped by bad input
    # leaves none, and the user is told how to bring back the ones dvc.lock records (on a
    # first run there are none, and `dvc checkout` would fail).
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  prepare:\n    cmd: python -m stages.prepare\n"
        "    outs:\n      - data/prepared\n"
        "    metrics:\n      - reports/data.json:\n          cache: false\n"
        "      - still/there.json:\n          cache: false\n")
    if where != "first run":
        (tmp_path / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m stages.prepare\n"
            "    outs:\n    - path: data/prepared\n      md5: 1.dir\n"
            "    - path: reports/data.json\n      md5: '2'\n"
            "    - path: still/there.json\n      md5: '3'\n")
    (tmp_path / "still").mkdir()
    (tmp_path / "still" / "there.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    if where != "by hand":
        monkeypatch.setenv("DVC_STAGE", "prepare")
        monkeypatch.setenv("DVC_ROOT", str(workspace if where == "queued experiment" else tmp_path))

    def main():
        raise PipelineError("data.source: 'Digits' does not exist")

    with pytest.raises(SystemExit):
        run_stage(main)
    hint = ("; DVC deleted this stage's outputs before it ran: `dvc checkout prepare` brings "
            "back data/prepared and `git checkout -- reports/data.json` the files Git keeps")
    expected = "error: data.source: 'Digits' does not exist" + \
        (hint if where == "dvc repro" else "")
    assert capsys.readouterr().err == expected + "\n"
