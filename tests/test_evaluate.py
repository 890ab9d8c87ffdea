import csv
import json

from stages import evaluate, finetune, train_head


def test_metrics_report_and_confusion_rows(project):
    train_head.main()
    finetune.main()
    evaluate.main()
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head"}  # no finetune entry while fine-tuning is skipped
    head = metrics["head"]
    assert head["split"] == "test"
    assert head["accuracy"] == head["balanced_accuracy"] == head["macro_f1"] == 1.0
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert set(report["head"]["per_class"]) == {"blue", "green", "red"}
    assert report["finetune_status"]["status"] == "skipped"
    with open(project / "plots" / "head_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == head["n_images"]
    assert all(row["actual"] == row["predicted"] for row in rows)


def test_missing_head_says_to_run_the_pipeline(project, capsys):
    import pytest

    from stages.errors import PipelineError

    with pytest.raises(PipelineError, match="head.npz: missing; run the stage that writes it"):
        evaluate.main()
