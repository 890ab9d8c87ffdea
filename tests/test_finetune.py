import json
import time

from tests.conftest import run_stage_cli, write_params


def test_disabled_finetune_is_recorded_as_skipped_in_well_under_a_second(tmp_path):
    write_params(tmp_path, {"finetune": {"enabled": False}})
    started = time.perf_counter()
    result = run_stage_cli("finetune", tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    status = json.loads((tmp_path / "models" / "finetune" / "status.json").read_text())
    assert status == {"enabled": False, "status": "skipped", "reason": "finetune.enabled is false"}
    assert elapsed < 1.0, f"disabled finetune took {elapsed:.2f}s (interpreter start included)"


def test_enabled_finetune_says_it_is_not_built_yet(tmp_path):
    write_params(tmp_path, {"finetune": {"enabled": True}})
    result = run_stage_cli("finetune", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: finetune.enabled: true, but fine-tuning is not built")
    assert not (tmp_path / "models").exists()
