import json

from stages import train_head
from tests.conftest import write_params
from transfer.heads import LogisticHead, MLPHead, load_head


def test_head_is_saved_with_class_names_and_metrics(project):
    train_head.main()
    head, classes = load_head(project / "models" / "head.npz")
    assert isinstance(head, LogisticHead)
    assert classes == ["blue", "green", "red"]
    assert head.coef_.shape == (3, 1280)
    metrics = json.loads((project / "metrics" / "train_head.json").read_text())
    assert metrics["train_accuracy"] == 1.0
    assert metrics["val"]["accuracy"] == 1.0  # colours are easy for an ImageNet backbone
    assert metrics["converged"] is True


def test_head_params_change_the_model(project):
    train_head.main()
    first, _ = load_head(project / "models" / "head.npz")
    write_params(project, {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64},
                           "backbone": {"batch_size": 8}, "head": {"C": 0.001}})
    train_head.main()
    second, _ = load_head(project / "models" / "head.npz")
    assert abs(second.coef_).sum() < abs(first.coef_).sum()


def test_an_mlp_head_is_trained_when_asked(project):
    write_params(project, {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64},
                           "backbone": {"batch_size": 8},
                           "head": {"kind": "mlp", "hidden_units": 16, "patience": 3}})
    train_head.main()
    head, classes = load_head(project / "models" / "head.npz")
    assert isinstance(head, MLPHead) and head.weights_[0].shape == (1280, 16)
    metrics = json.loads((project / "metrics" / "train_head.json").read_text())
    assert metrics["val"]["accuracy"] == 1.0
    assert metrics["n_iter"] == metrics["best_epoch"] + 3
