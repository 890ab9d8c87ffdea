"""Which way of running the backbone is fastest on this machine, and whether each keeps the
head's accuracy: the measurements behind ``backbone.engine: auto`` (docs/engines.md).

Speed: the bare forward pass of the backbone (normalization included) over ``--count``
monkeys10 photos already resized, cropped and in memory, batch 8, every variant interleaved in
each of ``--rounds`` rounds, the best round kept. The variants: PyTorch eager in NCHW and in
channels-last layout, ``torch.compile`` (channels-last), ONNX Runtime at each graph
optimization level with one thread per core, with thread spinning off, with one thread, and
ONNX Runtime on the graph quantized to int8 by ``quantize_dynamic``.

Accuracy: each variant embeds every image of each set in ``--sets`` (prepared as ``dvc repro``
would, default parameters), the default head (logistic, ``head.C: auto``) is trained on its
embeddings and scored on the test split; also the largest difference from PyTorch eager
NCHW's embeddings, relative to their largest magnitude.

    python -m benchmarks.engines [--sets DIR ...] [--count 256] [--rounds 3] [--no-accuracy]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from benchmarks import MONKEYS, training_store
from transfer.backbones import Backbone, Normalized, embed_batches, load_backbone, pixel_batches
from transfer.data import SPLITS, ImageStore, prepare_store
from transfer.engines import CompiledNetwork, TorchEngine, cached_graph
from transfer.head_training import LogisticTrainer
from transfer.params import HeadParams, Params
from transfer.runtime import Runtime, resolve_runtime
from transfer.sources import list_image_folder

SETS = [MONKEYS.parent, MONKEYS.parents[1] / "catsdogs"]
BATCH = 8
TORCH_ENGINE = "PyTorch eager, channels-last (torch engine)"
LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class NchwNormalized(Normalized):
    """``Normalized`` handing the network its input in PyTorch's default (NCHW) layout."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).contiguous().float()
        return self.module((images * (1.0 / 255) - self.mean) / self.std)


def eager_nchw(backbone: Backbone, runtime: Runtime, scratch: Path) -> Callable:
    network = NchwNormalized(backbone.encoder, backbone.preprocessing).eval()
    network.to(memory_format=torch.contiguous_format)

    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return network(batch).numpy()

    return run


def eager_channels_last(backbone: Backbone, runtime: Runtime, scratch: Path) -> Callable:
    return TorchEngine().compile(Normalized(backbone.encoder, backbone.preprocessing),
                                 backbone.preprocessing.pixel_shape, runtime, backbone.name)


def compiled(backbone: Backbone, runtime: Runtime, scratch: Path) -> Callable:
    network = Normalized(backbone.encoder, backbone.preprocessing).eval()
    network.to(memory_format=torch.channels_last)
    compiled_network = torch.compile(network)

    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return compiled_network(batch).numpy()

    return run


def onnx_runtime(level: str = "all", threads: int | None = None, spinning: bool = True,
                 int8: str = "") -> Callable:
    """``int8``: quantize the weights to ``QUInt8`` or ``QInt8`` with ``quantize_dynamic``
    (activations on the fly), else the float32 graph."""

    def build(backbone: Backbone, runtime: Runtime, scratch: Path) -> Callable:
        graph = cached_graph(Normalized(backbone.encoder, backbone.preprocessing),
                             backbone.preprocessing.pixel_shape, scratch / "onnx", backbone.name)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            (scratch / "float.onnx").write_bytes(graph)
            quantize_dynamic(scratch / "float.onnx", scratch / "int8.onnx",
                             weight_type=getattr(QuantType, int8))
            graph = (scratch / "int8.onnx").read_bytes()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel,
                                                   LEVELS[level])
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        session = onnxruntime.InferenceSession(graph, options,
                                               providers=["CPUExecutionProvider"])
        return lambda batch: session.run(None, {"images": batch.numpy()})[0]

    return build


def variants() -> dict[str, Callable]:
    cores = torch.get_num_threads()
    found = {"PyTorch eager, NCHW": eager_nchw,
             TORCH_ENGINE: eager_channels_last,
             "torch.compile, channels-last": compiled}
    for level in LEVELS:
        found[f"ONNX Runtime, {level} optimizations, {cores} threads"] = onnx_runtime(level)
    found[f"ONNX Runtime, all, {cores} threads, no spinning (onnxruntime engine)"] = \
        onnx_runtime(spinning=False)
    found["ONNX Runtime, all, 1 thread"] = onnx_runtime(threads=1)
    for weights in ("QUInt8", "QInt8"):
        found[f"ONNX Runtime, dynamic int8 ({weights} weights), all, {cores} threads"] = \
            onnx_runtime(int8=weights)
    return found


def prepared(root: Path, scratch: Path) -> dict[str, ImageStore]:
    defaults = Params()
    data = defaults.data
    out = scratch / root.name
    prepare_store(list_image_folder(root), out, source=str(root), short_side=data.short_side,
                  val_size=data.val_size, test_size=data.test_size, seed=defaults.seed,
                  min_per_class=data.min_per_class, max_per_class=data.max_per_class)
    return {split: ImageStore(out, split) for split in SPLITS}


def head_accuracy(stores: dict[str, ImageStore], features: dict[str, np.ndarray]) -> tuple:
    """Test accuracy of the default head trained on ``features``, and its wrong test images."""
    trainer = LogisticTrainer(HeadParams(), Params().seed, stores["train"].classes)
    head = trainer.fit(features["train"], stores["train"].labels, features["val"],
                       stores["val"].labels).head
    wrong = int((head.predict(features["test"]) != stores["test"].labels).sum())
    return 1 - wrong / len(stores["test"]), wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=Path, nargs="*", default=SETS)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # quantize_dynamic warns on the root logger
    runtime = resolve_runtime()
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        backbone = load_backbone("tf_efficientnet_lite0")
        preprocessing = backbone.preprocessing
        store, root = training_store(MONKEYS, scratch / "speed")
        images = [store[i] for i in range(min(args.count, len(store)))]
        batches = list(pixel_batches(images, preprocessing, BATCH, runtime, "pixels"))
        runs, setup = {}, {}
        for name, build in variants().items():
            started = time.perf_counter()
            try:
                run = build(load_backbone("tf_efficientnet_lite0"), runtime, scratch)
                run(batches[0])  # first call: allocation, kernel choice, compilation
            except Exception as err:  # a variant that cannot run here is reported, not fatal
                print(f"{name}: cannot run ({type(err).__name__}: {err})", flush=True)
                continue
            runs[name], setup[name] = run, time.perf_counter() - started
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                for batch in batches:
                    run(batch)
                timings[name].append(time.perf_counter() - started)
        speed = {name: len(images) / min(values) for name, values in timings.items()}
        base = speed[TORCH_ENGINE]
        print(f"{len(images)} images from {root}, batch {BATCH}, {torch.get_num_threads()} "
              f"threads, best of {args.rounds} rounds; ratio: against PyTorch eager "
              "channels-last (the torch engine)")
        for name in runs:
            print(f"{name:<64} {speed[name]:7.1f} images/s  {speed[name] / base:5.2f}x  "
                  f"setup {setup[name]:6.1f} s", flush=True)
        print(f"load average after the speed rounds: {os.getloadavg()[0]:.2f}", flush=True)
        if args.no_accuracy:
            return
        for root in args.sets:
            stores = prepared(root, scratch / "sets")
            reference = None
            for name, run in runs.items():
                encoder = CompiledNetwork(name, run)
                features = {split: np.concatenate(list(embed_batches(
                    encoder, split_store, preprocessing, BATCH, runtime, desc=name)))
                    for split, split_store in stores.items()}
                every = np.concatenate([features[split] for split in SPLITS])
                reference = every if reference is None else reference
                difference = np.abs(every - reference).max() / np.abs(reference).max()
                accuracy, wrong = head_accuracy(stores, features)
                print(f"{root.name}: {name:<64} test accuracy {accuracy:.4f} ({wrong} of "
                      f"{len(stores['test'])} wrong), embeddings within {difference:.1e} of "
                      "the first", flush=True)


if __name__ == "__main__":
    main()
