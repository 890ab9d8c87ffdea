"""Where the pipeline reads and writes, relative to the repository root: one home per path.

Stage modules import these names; ``dvc.yaml`` spells the same paths, and
``tests/test_layout.py`` checks that every path a stage module uses is declared for its stage.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")

# extract: where a state-dict file named in backbone.weights lives; dvc.yaml watches it for
# extract, so a changed file re-runs it (the file itself is tracked with `dvc add`).
WEIGHTS_DIR = Path("weights")

# prepare
RAW_DIR = Path("data/raw")
TORCHVISION_ROOT = RAW_DIR / "torchvision"
PREPARED_DIR = Path("data/prepared")
DATA_REPORT = Path("reports/data.json")
# Where data.exclude and data.relabel point by default; a default one that is missing is empty.
EXCLUDE_FILE = Path("data/exclude.txt")
RELABEL_FILE = Path("data/relabel.csv")

# extract
EMBEDDINGS_DIR = Path("data/embeddings")
# The backbone's ONNX graphs (backbone.engine: onnxruntime), built once per network and reused
# by extract and predict; outside every DVC output, which `dvc repro` removes before a stage runs.
ONNX_CACHE = Path("cache/onnx")
# Every embedding extract has computed, keyed by the image's pixels and the extraction's whole
# configuration (transfer/embedding_store.py), so extract embeds only images it has not seen;
# outside every DVC output, bounded by backbone.store_max_gb.
EMBEDDING_STORE = Path("cache/embeddings")

# audit
AUDIT_REPORT = Path("reports/audit.json")  # Git-tracked: audit.max_listed of each finding
# Every finding of each kind, for `python -m stages.curate` (DVC-cached: it grows with the set).
AUDIT_FINDINGS = Path("data/audit_findings.json")
# The matching keypoints of the near-duplicate pairs audit checked before, keyed by the two
# images' stored pixels (transfer/keypoints.py: PairCache); outside every DVC output.
KEYPOINT_CACHE = Path("cache/keypoints")
AUDIT_PICTURE = Path("plots/audit/suspects.png")
# What predict compares new images with to call them unfamiliar.
FAMILIARITY = Path("models/familiarity.npz")

# train_head
HEAD_PATH = Path("models/head.npz")
TRAIN_HEAD_REPORT = Path("reports/train_head.json")
REGULARISATION_PLOT = Path("plots/train_head/regularisation.csv")  # head.C or head.alpha search

# finetune
FINETUNE_DIR = Path("models/finetune")
FINETUNE_STATUS = FINETUNE_DIR / "status.json"
# dvclive's folder, a second (cached, so Git-ignored) output of finetune: the curves are written
# there after every epoch, where `dvc plots show` and the VS Code extension see them while the
# stage runs.
FINETUNE_CURVES = Path("dvclive")
# Outside every DVC output (`dvc repro` removes a stage's outputs before running it), so that
# an interrupted run can resume.
CHECKPOINT_DIR = Path("checkpoints")
FINETUNE_CHECKPOINTS = "finetune*.pt"  # in CHECKPOINT_DIR, one per set of parameters and data
# The per-epoch curves dvclive writes (``curve_file``; dvc.yaml plots them).
CURVES = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr")
# finetune.lr: auto's range test: learning rate against smoothed training loss (a header only
# when the rate is fixed; dvc.yaml plots it).
FINETUNE_LR_RANGE = FINETUNE_DIR / "lr_range.csv"

# evaluate
EVALUATE_METRICS = Path("metrics/evaluate.json")
EVALUATE_REPORT = Path("reports/evaluate.json")
# The numbers experiments are compared by, per model: metrics/evaluate.json holds these (a
# `dvc exp show` column each); the rest of a model's scores go to reports/evaluate.json.
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")
# Where reports/evaluate.json keeps the fine-tuning stage's status, beside the models' entries.
FINETUNE_STATUS_KEY = "finetune_status"
SUMMARY = Path("reports/summary.md")
EVALUATE_PLOTS_DIR = Path("plots/evaluate")

# export (export.enabled): the model file and a copy of the metadata inside it
EXPORT_DIR = Path("models/export")
EXPORT_OUTPUTS = {"onnx": EXPORT_DIR / "classifier.onnx",
                  "torchscript": EXPORT_DIR / "classifier.pt"}
EXPORT_METADATA = EXPORT_DIR / "metadata.json"

# commands outside the DVC graph
TRANSFER_STUDY_REPORT = Path("reports/transfer_study.md")


def shared_by_experiments(path: Path) -> Path:
    """Where a folder outside DVC's outputs (``EMBEDDING_STORE``) is: in the workspace that DVC
    names in ``DVC_ROOT``, which is also the workspace when ``dvc queue`` runs an experiment in
    a temporary copy of it, so that queued experiments share it; else here."""
    root = os.environ.get("DVC_ROOT")
    return Path(root) / path if root else path


def curve_file(curve: str, curves_dir: Path = FINETUNE_CURVES) -> Path:
    """Where dvclive writes the curve named ``curve`` (one of ``CURVES``) in ``curves_dir``."""
    return curves_dir / "plots" / "metrics" / f"{curve}.tsv"


def outside(path: Path, folder: Path) -> tuple[str, Path] | None:
    """How ``path`` lies outside ``folder`` (one that ``dvc.yaml`` watches): ``("written",
    p)`` where its normalised absolute path ``p`` is elsewhere, ``("linked", target)`` where
    it is written inside but a link on the way leads out (DVC records the link, not what it
    leads to); None where it lies inside."""
    written = Path(os.path.normpath(path.absolute()))
    if folder.absolute() not in written.parents:
        return "written", written
    if path.exists() and folder.resolve() not in path.resolve().parents:
        return "linked", path.resolve()
    return None


def write_missing_curves(curves_dir: Path) -> None:
    """A header and no rows for each curve of ``CURVES`` not written in ``curves_dir`` (when
    fine-tuning is skipped, or stops before an epoch trains): its plot shows nothing, where
    a missing file has `dvc plots show` warn that it failed to load the plots."""
    for curve in CURVES:
        path = curve_file(curve, curves_dir)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step\t{curve.rpartition('/')[2]}\n", encoding="utf-8")


def finetune_checkpoint(key: str) -> str:
    """The checkpoint's file name in CHECKPOINT_DIR for the run identified by ``key``."""
    return f"finetune-{key[:16]}.pt"
