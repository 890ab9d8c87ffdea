import errno

import pytest

from transfer.errors import PipelineError, run_stage


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
