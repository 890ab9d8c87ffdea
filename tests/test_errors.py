import errno

import pytest

from stages.errors import ArgumentParser, PipelineError, one_line, run_stage, unprintable


def _fails_with(error):
    def main():
        raise error
    return main


def test_a_pipeline_error_is_one_line_and_exit_code_1(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(_fails_with(PipelineError("data.source: 'x' is not a directory")))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: data.source: 'x' is not a directory\n"


def test_a_full_disk_is_one_line_naming_the_file(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "data/embeddings/train.npy")
    with pytest.raises(SystemExit) as exit_info:
        run_stage(_fails_with(full))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: no space left on the disk writing "
                                       "data/embeddings/train.npy; free space and run the "
                                       "stage again\n")


def test_other_errors_keep_their_traceback():
    with pytest.raises(PermissionError):
        run_stage(_fails_with(PermissionError(errno.EACCES, "Permission denied")))


def test_ctrl_c_is_one_line_and_exit_code_130(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(_fails_with(KeyboardInterrupt()))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"


def test_an_interrupt_held_back_until_the_outputs_were_written_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(_fails_with(KeyboardInterrupt("interrupted after the outputs were written")))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted after the outputs were written\n"


def test_a_message_with_control_characters_stays_on_one_line(capsys):
    with pytest.raises(SystemExit):
        run_stage(_fails_with(PipelineError("class 'a\nb\tc\udcff' is bad")))
    assert capsys.readouterr().err == "error: class 'a\\nb\\tc\\udcff' is bad\n"


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
