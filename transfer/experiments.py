"""DVC experiments as rows: what ``dvc exp show --json`` holds of each, flattened.

Shared by ``python -m stages.compare`` (a table of experiments that fits a terminal) and the
transfer study (``python -m stages.transfer_study``).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer import layout
from transfer.errors import PipelineError

PARAMS_FILE = "params.yaml"
# `dvc exp show --json` names each metrics file by its path as written in dvc.yaml.
EVALUATE_METRICS = layout.EVALUATE_METRICS.as_posix()


def dvc(*args: str) -> str:
    """Run a DVC command; its failure stops the caller with DVC's own last line."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {lines[-1]}")
    return result.stdout


def json_at(rev: str, path: Path) -> dict[str, Any]:
    """A Git-tracked JSON file as commit ``rev`` holds it; empty where it has none."""
    result = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True,
                            text=True)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"head": {"C": 1}}`` as ``{"head.C": 1}``; a list or a scalar is one value."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass
class Experiment:
    """One row of ``dvc exp show``: the workspace, a commit or an experiment of it."""

    name: str
    rev: str | None  # None for the workspace
    params: dict[str, Any] = field(default_factory=dict)  # "head.C" -> value
    metrics: dict[str, Any] = field(default_factory=dict)  # "head.accuracy" -> value
    state: str | None = None  # "queued", "running", "failed"; None once it has run
    baseline: str | None = None  # an experiment's: the commit it was run from

    @classmethod
    def from_entry(cls, entry: dict[str, Any], name: str, state: str | None = None,
                   baseline: str | None = None) -> Experiment:
        data = entry.get("data") or {}
        params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
        metrics = ((data.get("metrics") or {}).get(EVALUATE_METRICS) or {}).get("data") or {}
        rev = entry.get("rev")
        return cls(name, None if rev == "workspace" else rev, flatten(params),
                   flatten(metrics), state, baseline)

    def report(self, path: Path) -> dict[str, Any]:
        """A Git-tracked JSON report as this row holds it: read at its commit, the
        workspace's from disk; empty where there is none."""
        if self.rev is None:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return json_at(self.rev, path)


def _state(executor: Any) -> str | None:
    """What DVC says of an experiment still queued, running or failed; None once it ran."""
    state = executor.get("state") if isinstance(executor, dict) else executor
    return None if state in (None, "success") else str(state).lower()


def experiments(exp_show: list[dict[str, Any]]) -> list[Experiment]:
    """The rows of ``dvc exp show --json`` in its order: the workspace, then each commit
    (named by its branch or short hash) followed by its experiments (by name)."""
    rows = []
    for entry in exp_show:
        rev = entry.get("rev") or ""
        name = "workspace" if rev == "workspace" else (entry.get("name") or rev[:7])
        rows.append(Experiment.from_entry(entry, name))
        for experiment in entry.get("experiments") or []:
            for run in (experiment.get("revs") or [])[:1]:  # the latest run of that name
                label = run.get("name") or experiment.get("name") or (run.get("rev") or "")[:7]
                rows.append(Experiment.from_entry(run, label, _state(experiment.get("executor")),
                                                  baseline=rev))
    return rows
