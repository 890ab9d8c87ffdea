import json

from stages import train_head
from stages.heads import LogisticHead
from tests.conftest import write_params


def test_head_is_saved_with_class_names_and_metrics(project):
    train_head.main()
    head, classes = LogisticHead.load(project / "models" / "head.npz")
    assert classes == ["blue", "green", "red"]
    assert head.coef_.shape == (3, 1280)
    metrics = json.loads((project / "metrics" / "train_head.json").read_text())
    assert metrics["train_accuracy"] == 1.0
    assert metrics["val"]["accuracy"] == 1.0  # colours are easy for an ImageNet backbone
    assert metrics["converged"] is True


def test_head_params_change_the_model(project):
    train_head.main()
    first, _ = LogisticHead.load(project / "models" / "head.npz")
    write_params(project, {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64},
                           "backbone": {"batch_size": 8}, "head": {"C": 0.001}})
    train_head.main()
    second, _ = LogisticHead.load(project / "models" / "head.npz")
    assert abs(second.coef_).sum() < abs(first.coef_).sum()
