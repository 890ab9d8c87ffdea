import csv
import json

import numpy as np
import pytest
from PIL import Image

from stages import evaluate, finetune, train_head
from transfer import layout
from transfer.errors import PipelineError
from transfer.evaluation import FINETUNE_STATUS_KEY, GALLERY_FILE, HEADLINE_METRICS, PLOT_FILES


def test_metrics_report_plots_gallery_and_summary(project):
    train_head.main()
    finetune.main()
    evaluate.main()
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head"}  # no finetune entry while fine-tuning is skipped
    # The metrics file holds the headline numbers only: one `dvc exp show` column each.
    assert list(metrics["head"]) == list(HEADLINE_METRICS)
    assert metrics["head"]["accuracy"] == metrics["head"]["balanced_accuracy"] == 1.0
    assert metrics["head"]["macro_f1"] == 1.0
    assert metrics["head"]["ece"] < 0.5 and metrics["head"]["log_loss"] > 0
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert set(report) == {"head", FINETUNE_STATUS_KEY}
    assert report[FINETUNE_STATUS_KEY]["status"] == "skipped"
    head = report["head"]  # everything else, per class too
    assert not set(head) & set(HEADLINE_METRICS)
    assert head["split"] == "test"
    assert head["ece_uncalibrated"] < 0.5 and head["log_loss_uncalibrated"] > 0
    assert "top5_accuracy" not in head  # three classes
    assert set(head["per_class"]) == {"blue", "green", "red"}
    assert all(s["f1"] == 1.0 for s in head["per_class"].values() if s["support"])
    assert head["n_mistakes"] == 0 and head["most_confused"] == []
    plots = project / "plots" / "evaluate"
    for name in PLOT_FILES:
        with open(plots / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and {row["model"] for row in rows} == {"head"}, name
    with open(plots / "confusion.csv", newline="") as f:
        confusion = list(csv.DictReader(f))
    # Aggregated: one row per cell; all right, so one diagonal cell per class in the split.
    assert all(r["actual"] == r["predicted"] and r["rate"] == "1.0" for r in confusion)
    assert len(confusion) == head["n_classes_present"]
    assert sum(int(r["count"]) for r in confusion) == head["n_images"]
    with Image.open(plots / GALLERY_FILE) as gallery:
        assert gallery.format == "PNG" and gallery.height < 100  # "no mistakes" only
    summary = (project / "reports" / "summary.md").read_text()
    assert "| head | 1.0000 |" in summary and "Fine-tuning: skipped" in summary


def test_the_gallery_shows_the_evaluation_images(project, monkeypatch):
    """A head that gets everything wrong puts the split's own pixels in the gallery."""
    from transfer.data import ImageStore
    from transfer.heads import LogisticHead

    train_head.main()
    finetune.main()

    def always_wrong(self, X, n_classes, calibrated=True):
        return np.roll(np.eye(n_classes)[np.zeros(len(X), dtype=int)], 1, axis=1)

    monkeypatch.setattr(LogisticHead, "predict_proba_all", always_wrong)
    evaluate.main()
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    store = ImageStore(project / "data" / "prepared", "test")
    assert report["head"]["n_mistakes"] == int(np.sum(store.labels != 1))
    with Image.open(project / "plots" / "evaluate" / GALLERY_FILE) as gallery:
        pixels = np.asarray(gallery.convert("RGB")).reshape(-1, 3)
    first = report["head"]["most_confident_mistakes"][0]
    image = store[list(store.ids).index(first["id"])]
    colour = np.median(image.reshape(-1, 3), axis=0)
    assert (np.abs(pixels.astype(int) - colour).max(axis=1) <= 4).sum() > 1000


def test_the_stored_temperature_is_what_evaluate_scores_and_both_are_reported(project):
    from sklearn.metrics import log_loss

    from transfer.embeddings import load_split
    from transfer.heads import load_head
    from transfer.metrics import expected_calibration_error

    train_head.main()
    finetune.main()
    path = project / "models" / "head.npz"
    head, classes = load_head(path)
    head.temperature_ = 3.0  # far softer than fitted: log loss and ECE must show it
    head.save(path, classes)
    evaluate.main()
    metrics = {**json.loads((project / "metrics" / "evaluate.json").read_text())["head"],
               **json.loads((project / "reports" / "evaluate.json").read_text())["head"]}
    features, labels, _ = load_split(project / "data" / "embeddings", "test")
    softened = head.predict_proba_all(features, 3)
    untempered = head.predict_proba_all(features, 3, calibrated=False)
    assert metrics["log_loss"] == pytest.approx(log_loss(labels, softened, labels=[0, 1, 2]))
    assert metrics["ece"] == pytest.approx(expected_calibration_error(labels, softened))
    assert metrics["log_loss_uncalibrated"] == pytest.approx(
        log_loss(labels, untempered, labels=[0, 1, 2]))
    assert metrics["ece_uncalibrated"] == pytest.approx(
        expected_calibration_error(labels, untempered))
    assert metrics["log_loss"] > metrics["log_loss_uncalibrated"] + 0.05


def test_missing_head_says_to_run_the_pipeline(project):
    with pytest.raises(PipelineError, match="head.npz: missing; run the stage that writes it"):
        evaluate.main()


def test_missing_prepared_store_is_named(project):
    import shutil

    train_head.main()
    finetune.main()
    shutil.rmtree(project / "data" / "prepared")
    with pytest.raises(PipelineError, match="data/prepared/meta.json: missing"):
        evaluate.main()


def test_a_failure_leaves_every_previous_output_as_it_was(project, monkeypatch):
    train_head.main()
    finetune.main()
    evaluate.main()
    plots = layout.EVALUATE_PLOTS_DIR
    outputs = [layout.EVALUATE_METRICS, layout.EVALUATE_REPORT, layout.SUMMARY,
               plots / GALLERY_FILE, *(plots / f for f in PLOT_FILES)]
    before = {path: path.read_bytes() for path in outputs}
    (project / "metrics" / "evaluate.json").write_text('{"head": {}}')  # as if older
    before[layout.EVALUATE_METRICS] = layout.EVALUATE_METRICS.read_bytes()

    def gallery_fails(*args, **kwargs):
        raise PipelineError("the gallery could not be drawn")

    monkeypatch.setattr(evaluate, "draw_gallery", gallery_fails)
    with pytest.raises(PipelineError, match="could not be drawn"):
        evaluate.main()
    assert {path: path.read_bytes() for path in outputs} == before
    assert not [p for p in project.rglob(".*tmp-*")]


def test_a_class_without_training_images_is_a_warning_in_the_log_and_the_summary(project,
                                                                                 caplog):
    import logging

    from transfer.embeddings import EmbeddingMeta, load_split
    from transfer.heads import LogisticHead

    finetune.main()
    features, labels, _ = load_split("data/embeddings", "train")
    kept = labels != 1  # the head never sees class 1 ("green")
    classes = EmbeddingMeta.read("data/embeddings").classes
    LogisticHead().fit(np.asarray(features)[kept], labels[kept]).save(layout.HEAD_PATH, classes)
    with caplog.at_level(logging.WARNING):
        evaluate.main()
    assert "no training image for class green: no model can predict it" in caplog.text
    summary = layout.SUMMARY.read_text()
    assert "**Warning:** no training image for class green: no model can predict it." in summary


class _Store(list):
    """Images in a list, with the ids the evaluate stage checks."""

    def __init__(self, images, ids):
        super().__init__(images)
        self.ids = ids


def test_flip_averaging_gives_an_image_and_its_mirror_equal_probabilities(flip_finetuned):
    images = [np.asarray(Image.open(flip_finetuned / "mirrored" / name).convert("RGB"))
              for name in ("a.png", "b.png")]
    ids = np.array([0, 1])
    probabilities = evaluate.finetuned_probabilities(_Store(images, ids), ids)
    assert np.abs(probabilities[0] - probabilities[1]).max() < 1e-7
    evaluate.main()  # and the stage scores the fine-tuned model through the same call
    assert "finetune" in json.loads((flip_finetuned / "metrics" / "evaluate.json").read_text())
