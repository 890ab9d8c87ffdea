"""How close an exported file's probabilities are to ``predict``'s, on real photos.

Run in a project where the pipeline ran: exports the model (``--model``) as ONNX and as
TorchScript into a temporary folder, classifies every photo under ``--images`` with the
pipeline's model (both engines) and with each exported file, and prints the largest
difference of any class probability and how many top classes agree.

    python -m benchmarks.export_parity --images ../shared/data/monkeys10/validation [--model head]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from stages.export import write_export
from stages.predict import list_inputs
from transfer.data import read_image_file
from transfer.engines import engine_named
from transfer.exported import load_exported
from transfer.inference import load_predictor
from transfer.layout import EMBEDDINGS_DIR, FINETUNE_DIR, HEAD_PATH, ONNX_CACHE
from transfer.prediction import decode_for


def probabilities(model, images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(list(model.predict_proba(images, 16)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", default="auto", choices=("auto", "head", "finetune"))
    args = parser.parse_args()
    files, unreadable = list_inputs([str(args.images)])
    files = [path for path in files if path not in unreadable]
    pipeline = {engine: load_predictor(args.model, EMBEDDINGS_DIR, HEAD_PATH, FINETUNE_DIR,
                                       engine_named(engine, ONNX_CACHE, "engine"))
                for engine in ("torch", "onnxruntime")}
    images = [decode_for(pipeline["torch"], read_image_file(path)) for path in files]
    reference = probabilities(pipeline["torch"], images)
    rows = [("predict --engine onnxruntime", probabilities(pipeline["onnxruntime"], images))]
    with tempfile.TemporaryDirectory() as scratch:
        for suffix in (".onnx", ".pt"):
            path = Path(scratch) / f"classifier{suffix}"
            metadata = write_export(args.model, "onnx" if suffix == ".onnx" else "torchscript",
                                    path)
            rows.append((f"exported {suffix} ({metadata['model']}, flip_average "
                         f"{metadata['flip_average']})",
                         probabilities(load_exported(path), images)))
    print(f"{len(files)} photos under {args.images}; reference: predict --engine torch "
          f"({pipeline['torch'].name} model)")
    print("| against the reference | max abs difference of a probability | same top class |")
    print("|---|---:|---:|")
    for name, values in rows:
        same = int((values.argmax(1) == reference.argmax(1)).sum())
        print(f"| {name} | {np.abs(values - reference).max():.1e} | {same}/{len(files)} |")


if __name__ == "__main__":
    main()
