"""DVC stage ``export`` (``export.enabled``), and a command for a file of your own: the trained
classifier as one self-contained file that needs nothing but pixels.

The file holds the fine-tuned network when fine-tuning ran (``export.model: auto``, the
default), else the frozen backbone and the head (its linear layers, standardization and
temperature folded in); a softmax; and, as metadata, the class names and how to resize. Its
input is uint8 ``(N, 3, H, W)`` RGB pixels resized and centre-cropped to the input size (the
metadata's ``resize``); the conversion to float, the normalization, flip averaging and the
temperature are inside. Its output: calibrated class probabilities in the metadata's class
order. ``transfer.exported`` runs such a file.

    dvc exp run -S export.enabled=true          # models/export/classifier.onnx + metadata.json
    python -m stages.export --output my.pt      # any file; the format from its suffix
"""

from __future__ import annotations

import logging
from pathlib import Path

from transfer.artifacts import atomic_output, write_json
from transfer.errors import ArgumentParser, PipelineError, run_stage
from transfer.layout import (
    EMBEDDINGS_DIR,
    EXPORT_DIR,
    EXPORT_METADATA,
    EXPORT_OUTPUTS,
    FINETUNE_DIR,
    HEAD_PATH,
    PARAMS,
)
from transfer.params import EXPORT_FORMATS, EXPORT_SUFFIXES, MODEL_CHOICES, load_params

log = logging.getLogger(__name__)

def write_export(model_choice: str, fmt: str, path: Path, final: Path | None = None) -> dict:
    """Export the model chosen by ``model_choice`` as ``fmt`` to ``path`` (a temporary that
    becomes ``final``, where given); its metadata."""
    from transfer.exporting import export_model
    from transfer.inference import load_predictor

    model = load_predictor(model_choice, EMBEDDINGS_DIR, HEAD_PATH, FINETUNE_DIR)
    metadata = export_model(model, fmt, path)
    log.info("wrote %s (%s model, %s, %d classes, input uint8 %s)", final or path,
             metadata["model"], fmt, len(metadata["classes"]),
             metadata["preprocessing"]["input_size"])
    return metadata


def run_stage_export() -> None:
    """The DVC stage: ``models/export/`` holds the file and its metadata, or, while
    ``export.enabled`` is false, only a metadata file saying so."""
    params = load_params(PARAMS).export
    with atomic_output(EXPORT_DIR) as tmp:
        tmp.mkdir()
        if not params.enabled:
            write_json(tmp / EXPORT_METADATA.name, {"enabled": False, "status": "skipped",
                                                    "reason": "export.enabled is false"})
            log.info("export skipped (export.enabled is false)")
            return
        file = tmp / EXPORT_OUTPUTS[params.format].name
        metadata = write_export(params.model, params.format, file, EXPORT_OUTPUTS[params.format])
        write_json(tmp / EXPORT_METADATA.name, {"enabled": True, "file": file.name,
                                                "format": params.format, **metadata})


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.export",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path,
                        help="write this file instead of running the DVC stage "
                             f"(format from its suffix: {', '.join(EXPORT_SUFFIXES)})")
    parser.add_argument("--format", choices=EXPORT_FORMATS,
                        help="with --output: the format, whatever the suffix")
    parser.add_argument("--model", choices=MODEL_CHOICES,
                        help="with --output: auto (default; the fine-tuned model when "
                             "fine-tuning kept an epoch after its start, else the head on the "
                             "frozen backbone), head or finetune")
    args = parser.parse_args(argv)
    if args.output is None:
        if args.format or args.model:
            raise PipelineError("--format and --model need --output FILE; without it the "
                                f"command runs the DVC stage, which writes {EXPORT_DIR}/ as "
                                "params.yaml's export.* say")
        run_stage_export()
        return
    fmt = args.format or EXPORT_SUFFIXES.get(args.output.suffix)
    if fmt is None:
        raise PipelineError(f"--output {args.output}: name a file ending in "
                            f"{' or '.join(EXPORT_SUFFIXES)}, or give --format")
    write_export(args.model or "auto", fmt, args.output)


if __name__ == "__main__":
    run_stage(main)
