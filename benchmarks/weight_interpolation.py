"""Weight-space ensembles of the start and the fine-tuned network (WiSE-FT), on one project.

Fine-tuning starts from the pretrained backbone with the linear probe as its head, so the
start and the trained network share every tensor's shape and each point between them,
``(1 - alpha) * start + alpha * trained``, is a network too (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022). The command trains as the ``finetune`` stage
does with the project's ``finetune.*`` keys (and the given ones), keeping the last epoch
whatever validation says, then scores each alpha from 0 (the start) to 1 (the last epoch) in
steps of 0.1 on the validation and the test split: accuracy, log loss, and log loss after
the temperature fitted on validation (as the stage calibrates the model it keeps). Prints one
tab-separated row per alpha; docs/finetune-defaults.md holds what it measured.

    python -m benchmarks.weight_interpolation PROJECT [finetune.KEY=VALUE ...]

PROJECT is a project folder in which ``prepare``, ``extract`` and ``train_head`` have run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.finetune_defaults import finetune_keys, keep_last_epoch
from transfer import training
from transfer.backbones import compile_on_pixels, preprocessing_of
from transfer.calibration import fitted_temperature
from transfer.data import ImageStore
from transfer.embeddings import EmbeddingMeta
from transfer.engines import TorchEngine
from transfer.heads import softmax
from transfer.inference import network_scores
from transfer.layout import EMBEDDINGS_DIR, HEAD_PATH, PARAMS, PREPARED_DIR
from transfer.network import mark_trainable, starting_network
from transfer.params import load_params
from transfer.runtime import resolve_runtime
from transfer.selection import ValidationScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("keys", nargs="*", help="finetune keys as KEY=VALUE (YAML values)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.chdir(args.project)
    params = load_params(PARAMS)
    ft = dataclasses.replace(params.finetune, enabled=True, **finetune_keys(args.keys))
    params = dataclasses.replace(params, finetune=ft)
    keep_last_epoch()

    runtime = resolve_runtime(ft.device, "float32", training=True)
    meta = EmbeddingMeta.read(EMBEDDINGS_DIR)
    preprocessing = preprocessing_of(meta)
    stores = {split: ImageStore(PREPARED_DIR, split) for split in ("train", "val", "test")}
    classes = stores["train"].classes
    net = starting_network(params, meta, classes, HEAD_PATH)
    mark_trainable(net, ft.strategy, ft.unfreeze_k)
    start = training._copy_state(net)
    train_set = training.LabelledImages(stores["train"], stores["train"].labels,
                                        training.train_transform(preprocessing, ft.augment))
    val_set = training.LabelledImages(stores["val"], stores["val"].labels,
                                      preprocessing.eval_transform())
    with tempfile.TemporaryDirectory() as scratch:
        result = training.train(net, train_set, val_set, ft, params.seed, runtime,
                                Path(scratch) / "checkpoint.pt", "weight-interpolation")
    trained = training._copy_state(net)
    print("epochs: " + " ".join(f"{r.epoch}: val accuracy {r.val_accuracy:.4f}"
                                for r in result.state.history))

    def scores(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The validation and test scores of ``net`` with the weights ``state``."""
        net.load_state_dict(state)
        net.eval()
        compiled = compile_on_pixels(net, preprocessing, TorchEngine(), runtime, "mixed")
        return {split: np.concatenate(list(network_scores(compiled, stores[split],
                                                          preprocessing, ft.batch_size,
                                                          runtime)))
                for split in ("val", "test")}

    print("\t".join(["alpha", "T", "val accuracy", "val log loss", "val log loss (T)",
                     "test accuracy", "test log loss", "test log loss (T)"]))
    for alpha in np.linspace(0.0, 1.0, 11):
        mixed = {name: (1 - alpha) * start[name] + alpha * trained[name]
                 if start[name].is_floating_point() else trained[name] for name in start}
        by_split = scores(mixed)
        temperature = fitted_temperature(by_split["val"], np.arange(len(classes)),
                                         stores["val"].labels)
        cells = [f"{alpha:.1f}", f"{temperature:.3f}"]
        for split, split_scores in by_split.items():
            raw = ValidationScores.of(stores[split].labels, softmax(split_scores))
            tempered = ValidationScores.of(stores[split].labels,
                                           softmax(split_scores / temperature))
            cells += [f"{raw.accuracy:.4f}", f"{raw.loss:.4f}", f"{tempered.loss:.4f}"]
        print("\t".join(cells), flush=True)


if __name__ == "__main__":
    main()
