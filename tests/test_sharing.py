"""Team sharing through DVC remotes: push, a teammate's clone and pull, the shared run cache."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_pipeline import make_repo, run, stages_run

pytestmark = pytest.mark.slow

# Files per output directory, counted recursively; skipped fine-tuning writes its status and a
# header-only range-test curve, and five header-only curve files in dvclive/; skipped export,
# its metadata file.
OUTPUT_FILES = {"data/prepared": 7, "data/embeddings": 5, "models/finetune": 2, "dvclive": 5,
                "models/export": 1}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, Path]:
    """A repo that ran the pipeline and a bfloat16 experiment, pushed with its run cache."""
    repo = make_repo(tmp_path_factory.mktemp("owner"))
    remote = tmp_path_factory.mktemp("remote")
    run(["dvc", "repro"], repo)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results and the team remote"], repo)
    run(["dvc", "exp", "run", "-S", "backbone.precision=bfloat16"], repo)
    # Push while the experiment's outputs are in the workspace: `--run-cache` sends the
    # run records, and the outputs they point to must be on the remote too.
    run(["dvc", "push", "--run-cache"], repo)
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout"], repo)
    run(["dvc", "push", "--run-cache"], repo)
    return repo, remote


def test_stage_outputs_are_few_files(pushed):
    repo, _ = pushed
    for output, count in OUTPUT_FILES.items():
        files = [path for path in (repo / output).rglob("*") if path.is_file()]
        assert len(files) == count, output


def test_a_teammate_pulls_and_nothing_recomputes(pushed, tmp_path):
    repo, _ = pushed
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert "up to date" in run(["dvc", "status"], clone)
    assert stages_run(run(["dvc", "repro"], clone)) == []


def test_the_shared_run_cache_restores_a_teammates_experiment(pushed, tmp_path):
    repo, _ = pushed
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull", "--run-cache"], clone)
    output = run(["dvc", "exp", "run", "--pull", "-S", "backbone.precision=bfloat16"], clone)
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in output
    assert "Running stage 'extract'" not in output


def test_a_registered_model_version_is_fetched_by_name_in_a_fresh_folder(pushed, tmp_path):
    import json

    import numpy as np
    import yaml

    from transfer.exported import load_exported

    repo, _ = pushed
    owner = tmp_path / "owner"
    run(["git", "clone", "-q", str(repo), str(owner)], tmp_path)
    run(["dvc", "pull"], owner)
    params = yaml.safe_load((owner / "params.yaml").read_text())
    params["export"]["enabled"] = True
    (owner / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], owner)) == ["check_params", "export"]
    run(["dvc", "push"], owner)
    run(["git", "add", "-A"], owner)
    run(["git", "commit", "-qm", "export the classifier"], owner)
    run(["gto", "register", "classifier", "--version", "v1.0.0"], owner)
    run(["gto", "register", "head", "--version", "v1.0.0"], owner)

    fresh = tmp_path / "fresh"  # no Git, no DVC: what a service's deploy step starts from
    fresh.mkdir()
    run(["dvc", "artifacts", "get", str(owner), "classifier", "--rev", "v1.0.0"], fresh)
    run(["dvc", "artifacts", "get", str(owner), "head", "--rev", "v1.0.0"], fresh)
    assert (fresh / "head.npz").read_bytes() == (owner / "models" / "head.npz").read_bytes()
    metadata = json.loads((fresh / "export" / "metadata.json").read_text())
    model = load_exported(fresh / "export" / metadata["file"])
    digit = np.zeros((64, 64, 3), np.uint8)
    digit[8:56, 28:36] = 255  # a white stroke: a one, more or less
    [probabilities] = list(model.predict_proba([digit]))
    assert probabilities.shape == (1, len(metadata["classes"]))
    assert abs(probabilities.sum() - 1) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    pytest.importorskip("dvc_s3", reason="dvc-s3 is in the dev extra")
    boto3 = pytest.importorskip("boto3")
    server = shutil.which("moto_server") or pytest.skip("moto[server] is in the dev extra")
    port = free_port()
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.skip("moto_server did not start")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, "testing")  # credentials from the environment, not the repo
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_s3_remote_round_trip(pushed, s3_server, tmp_path):
    repo, _ = pushed
    run(["dvc", "remote", "add", "s3", "s3://team/store"], repo)
    run(["dvc", "remote", "modify", "s3", "endpointurl", s3_server], repo)
    run(["dvc", "push", "-r", "s3"], repo)
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "remote", "add", "s3", "s3://team/store"], clone)
    run(["dvc", "remote", "modify", "s3", "endpointurl", s3_server], clone)
    run(["dvc", "pull", "-r", "s3"], clone)
    assert "up to date" in run(["dvc", "status"], clone)
    assert stages_run(run(["dvc", "repro"], clone)) == []
    assert "testing" not in (repo / ".dvc" / "config").read_text()

