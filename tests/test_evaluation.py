import numpy as np
import pytest

from transfer.errors import PipelineError
from transfer.evaluation import (
    FINETUNE_STATUS_KEY,
    HEADLINE_METRICS,
    PLOT_FILES,
    evaluate_model,
    evaluation_report,
    plot_tables,
    summary_markdown,
)

CLASSES = ["cat", "dog", "fox"]


def scored(name: str = "head", gallery_size: int = 12):
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array([
        [0.9, 0.05, 0.05],
        [0.3, 0.6, 0.1],     # cat taken for dog, 0.6 sure
        [0.1, 0.8, 0.1],
        [0.05, 0.05, 0.9],   # dog taken for fox, 0.9 sure
        [0.2, 0.1, 0.7],
        [0.1, 0.2, 0.7],
    ])
    ids = [f"img{i}.png" for i in range(6)]
    return evaluate_model(name, y_true, probabilities, CLASSES, ids, "test", gallery_size)


def test_mistakes_are_listed_most_confident_first_up_to_the_gallery_size():
    e = scored()
    assert e.n_mistakes == 2
    assert [(m.id, m.actual, m.predicted) for m in e.mistakes] == [
        ("img3.png", "dog", "fox"), ("img1.png", "cat", "dog")]
    assert e.mistakes[0].confidence == pytest.approx(0.9)
    assert [m.id for m in scored(gallery_size=1).mistakes] == ["img3.png"]


def test_metrics_entry_keeps_the_stable_keys():
    metrics = scored().metrics
    assert metrics["split"] == "test"
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    for key in ("balanced_accuracy", "macro_f1", "weighted_f1", "log_loss", "ece",
                "n_images", "n_classes_present", "n_classes", "per_class"):
        assert key in metrics


def test_probabilities_that_do_not_fit_the_split_are_refused_naming_the_model():
    with pytest.raises(PipelineError, match="model 'finetune': 2 x 3 probabilities"):
        evaluate_model("finetune", np.array([0, 1, 2]), np.full((2, 3), 1 / 3), CLASSES,
                       ["a", "b", "c"], "test")


def test_plot_tables_tag_every_row_with_its_model():
    tables = plot_tables([scored("head"), scored("finetune")])
    assert set(tables) == set(PLOT_FILES)
    for rows in tables.values():
        assert {row["model"] for row in rows} == {"head", "finetune"}
    f1_rows = [r for r in tables["per_class_f1.csv"] if r["model"] == "head"]
    assert [r["class"] for r in f1_rows] == CLASSES
    confusion = [r for r in tables["confusion.csv"] if r["model"] == "head"]
    assert sum(r["count"] for r in confusion) == 6


def test_the_headline_is_the_metrics_file_and_the_report_holds_the_rest():
    e = scored()
    assert e.headline == {key: e.metrics[key] for key in HEADLINE_METRICS}
    report = evaluation_report([e, scored("finetune")], {"status": "trained"})
    assert report[FINETUNE_STATUS_KEY] == {"status": "trained"}
    for name in ("head", "finetune"):  # the fine-tuned model's entry beside the status
        entry = report[name]
        assert set(entry) == (set(e.metrics) - set(HEADLINE_METRICS)) | {
            "n_mistakes", "most_confused", "most_confident_mistakes"}
        assert entry["per_class"]["dog"]["recall"] == pytest.approx(1 / 2)


def test_report_and_summary_name_the_models_numbers_and_plots():
    evaluations = [scored("head"), scored("finetune")]
    status = {"status": "skipped", "reason": "finetune.enabled is false"}
    report = evaluation_report(evaluations, status)
    assert report[FINETUNE_STATUS_KEY] == status
    assert report["head"]["most_confident_mistakes"][0]["id"] == "img3.png"
    assert report["head"]["most_confused"][0] == {"actual": "cat", "predicted": "dog",
                                                  "count": 1}
    text = summary_markdown(evaluations, status, "plots/evaluate")
    assert "| head | 0.6667 |" in text and "| finetune | 0.6667 |" in text
    assert "skipped (finetune.enabled is false)" in text
    assert "Mistakes: 2 of 6 images." in text
    for name in PLOT_FILES:
        assert f"`plots/evaluate/{name}`" in text
    stopped = {"status": "trained", "strategy": "last_k", "best_epoch": 0, "epochs_run": 0,
               "stop_reason": "the network it started from (epoch 0) has a validation accuracy "
                              "of 1 on the 6 validation images"}
    assert "Fine-tuning: no epoch trained (last_k; stopped: the network it started from " \
           "(epoch 0) has a validation accuracy of 1 on the 6 validation images)." in \
           summary_markdown(evaluations, stopped, "plots/evaluate")
    trained = {**stopped, "best_epoch": 2, "epochs_run": 3, "stop_reason": None}
    assert "Fine-tuning: trained (last_k, best epoch 2 of 3 trained)." in \
        summary_markdown(evaluations, trained, "plots/evaluate")
    # Epoch 0 kept after training: said in words, not as "best epoch 0".
    assert "Fine-tuning: trained (last_k, 3 epochs, none better on validation than the network " \
           "it started from (epoch 0), which is kept)." in \
        summary_markdown(evaluations, {**trained, "best_epoch": 0}, "plots/evaluate")
