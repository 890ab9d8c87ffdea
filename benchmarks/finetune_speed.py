"""How fast fine-tuning trains, against a bare PyTorch training loop, in one run.

The pipeline's ``train`` (reading the store, augmenting, forward, backward, AdamW with
layer-wise groups, clipping, schedule, per-epoch checkpoint) against the bare loop on the
same network, trainable blocks, batch size and precision: tensors already preprocessed and in
memory, forward, backward, ``AdamW.step``. Their ratio says what the pipeline costs on top of
the network's own training speed (goal: 0.9 or more).

    python -m benchmarks.finetune_speed [--images DIR] [--count 256] [--strategy last_k]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks import MONKEYS, training_store
from transfer.backbones import load_backbone
from transfer.network import build_network, mark_trainable, set_train_mode
from transfer.params import FinetuneParams
from transfer.runtime import resolve_runtime
from transfer.strategies import STRATEGIES
from transfer.training import LabelledImages, train, train_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=MONKEYS)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--strategy", default="last_k")
    parser.add_argument("--unfreeze-k", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    runtime = resolve_runtime("auto", args.precision, training=True)
    params = FinetuneParams(enabled=True, strategy=args.strategy, unfreeze_k=args.unfreeze_k,
                            epochs=1, batch_size=args.batch_size, augment="light",
                            patience=None)

    with tempfile.TemporaryDirectory() as scratch:
        store, root = training_store(args.images, Path(scratch))
        count = min(args.count, len(store)) // args.batch_size * args.batch_size
        images = [store[i] for i in range(count)]
        labels = store.labels[:count]
        n_classes = len(store.classes)

        def fresh_net():
            net = build_network(load_backbone("tf_efficientnet_lite0"), n_classes)
            mark_trainable(net, args.strategy, args.unfreeze_k)
            return net.to(runtime.device, memory_format=torch.channels_last)

        preprocessing = load_backbone("tf_efficientnet_lite0").preprocessing
        train_set = LabelledImages(images, labels, train_transform(preprocessing, "light"))
        val_set = LabelledImages(images[:1], labels[:1], preprocessing.eval_transform())
        transform = preprocessing.eval_transform()
        tensors = torch.stack([transform(Image.fromarray(image)) for image in images])
        targets = torch.as_tensor(labels)

        def pipeline() -> float:
            net = fresh_net()
            with tempfile.TemporaryDirectory() as ckpt:
                result = train(net, train_set, val_set, params, 0, runtime,
                               Path(ckpt) / "c.pt", "key")
            return count / result.train_images_per_second

        def bare_loop() -> float:
            net = fresh_net()
            set_train_mode(net, "frozen")
            optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                          lr=1e-4)
            order = torch.randperm(count)
            started = time.perf_counter()
            for batch in torch.split(order, args.batch_size):
                images_ = tensors[batch].to(runtime.device, memory_format=torch.channels_last)
                with runtime.autocast():
                    loss = torch.nn.functional.cross_entropy(
                        net(images_).float(), targets[batch].to(runtime.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        bare_loop()  # warm-up: first calls allocate and pick kernels
        timings: dict[str, list[float]] = {"bare": [], "pipeline": []}
        for _ in range(2):  # interleaved, so both see the same machine load
            timings["bare"].append(bare_loop())
            timings["pipeline"].append(pipeline())
    best = {name: min(values) for name, values in timings.items()}
    print(f"device {runtime.device}, precision {runtime.precision}, {count} images from "
          f"{root}, batch {args.batch_size}, strategy {args.strategy}"
          f" ({STRATEGIES[args.strategy].label(args.unfreeze_k)}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare training loop (tensors in memory) : {count / best['bare']:7.1f} images/s")
    print(f"pipeline train() (store + augmentation): {count / best['pipeline']:7.1f} images/s")
    print(f"pipeline / bare = {best['bare'] / best['pipeline']:.2f}")
    print(f"all timings (s): {({k: [round(v, 2) for v in vs] for k, vs in timings.items()})}")


if __name__ == "__main__":
    main()
