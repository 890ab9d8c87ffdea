"""The models for new images: the fine-tuned network's scores, its temperature, probabilities."""

import numpy as np
import pytest
import torch

from transfer.backbones import Preprocessing
from transfer.heads import softmax
from transfer.inference import FinetunedModel
from transfer.network import FinetuneNet
from transfer.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "float32")
TINY = Preprocessing((3, 8, 8), 8, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "test")


def tiny_model(info: dict) -> FinetunedModel:
    torch.manual_seed(0)
    net = FinetuneNet(torch.nn.Flatten(), 8 * 8 * 3, 3)
    return FinetunedModel(net, TINY, ["a", "b", "c"], {"short_side": 8, **info})


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_probabilities_are_the_softmax_of_the_scores_over_the_temperature():
    model = tiny_model({"temperature": 2.5})
    scores = np.concatenate(list(model.scores(images(5), runtime=CPU)))
    calibrated = np.concatenate(list(model.predict_proba(images(5), runtime=CPU)))
    plain = np.concatenate(list(model.predict_proba(images(5), runtime=CPU, calibrated=False)))
    np.testing.assert_allclose(calibrated, softmax(scores / 2.5), rtol=1e-12)
    np.testing.assert_allclose(plain, softmax(scores), rtol=1e-12)
    assert (calibrated.max(axis=1) < plain.max(axis=1)).all()  # softer, same classes
    assert (calibrated.argmax(axis=1) == plain.argmax(axis=1)).all()


def test_a_model_saved_without_a_temperature_scores_as_it_did():
    assert tiny_model({}).temperature == 1.0
    with_one = np.concatenate(list(tiny_model({}).predict_proba(images(3), runtime=CPU)))
    without = np.concatenate(list(tiny_model({}).predict_proba(images(3), runtime=CPU,
                                                               calibrated=False)))
    assert np.array_equal(with_one, without)


class Store(list):
    """What the temperature fit reads of a prepared store: images in order, and labels."""

    def __init__(self, items, labels):
        super().__init__(items)
        self.labels = np.asarray(labels)


def test_the_fine_tuned_temperature_softens_an_over_confident_network():
    from transfer.training import fit_temperature_on

    model = tiny_model({})
    with torch.no_grad():
        model.net.head.weight.mul_(50)  # very sure of itself
    pictures = images(30)
    scores = np.concatenate(list(model.scores(pictures, runtime=CPU)))
    predicted = scores.argmax(axis=1)
    labels = np.where(np.arange(30) % 3 == 0, (predicted + 1) % 3, predicted)  # a third wrong
    result = fit_temperature_on(model.net, Store(pictures, labels), TINY, 8, CPU, 3)
    assert result["temperature"] > 1.5
    assert result["log_loss"] < result["log_loss_uncalibrated"]


def test_all_right_validation_images_sharpen_an_unsure_network_to_what_they_vouch_for():
    from transfer.calibration import mean_confidence, vouched_accuracy
    from transfer.training import fit_temperature_on

    model = tiny_model({})
    pictures = images(12)
    scores = np.concatenate(list(model.scores(pictures, runtime=CPU)))
    assert mean_confidence(scores) < vouched_accuracy(12)  # an untrained network: unsure
    result = fit_temperature_on(model.net, Store(pictures, scores.argmax(axis=1)), TINY, 4, CPU,
                                3)
    assert result["temperature"] < 1.0
    assert mean_confidence(scores, result["temperature"]) == pytest.approx(vouched_accuracy(12))
    assert result["log_loss"] < result["log_loss_uncalibrated"]
    with torch.no_grad():
        model.net.head.weight.mul_(50)  # now surer than 12 right images can vouch for
    scores = np.concatenate(list(model.scores(pictures, runtime=CPU)))
    assert mean_confidence(scores) > vouched_accuracy(12)
    result = fit_temperature_on(model.net, Store(pictures, scores.argmax(axis=1)), TINY, 4, CPU,
                                3)
    assert result["temperature"] == 1.0  # right images cannot show over-confidence


@pytest.mark.parametrize(("best_epoch", "model", "chosen"), [
    (2, "auto", "finetune"), (0, "auto", "head"), (0, "finetune", "finetune"),
    (None, "auto", "head"), ("damaged", "auto", "finetune"), (1, "head", "head")])
def test_auto_takes_the_fine_tuned_network_only_where_it_moved_from_its_start(
        tmp_path, monkeypatch, best_epoch, model, chosen):
    import json

    from transfer import inference

    monkeypatch.setattr(inference, "load_finetuned", lambda *args: "finetune")
    monkeypatch.setattr(inference, "load_classifier", lambda *args: "head")
    finetune_dir = tmp_path / "finetune"
    finetune_dir.mkdir()
    if best_epoch == "damaged":  # loading it says what is wrong
        (finetune_dir / "model.json").write_text("{not json")
    elif best_epoch is not None:
        (finetune_dir / "model.json").write_text(json.dumps({"best_epoch": best_epoch}))
    assert inference.load_predictor(model, tmp_path, tmp_path / "head.npz",
                                    finetune_dir) == chosen
