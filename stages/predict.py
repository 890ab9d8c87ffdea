"""Classify image files with the trained model: ``python -m stages.predict PATH... [options]``.

Paths may be files or folders (searched recursively). Prints the top-k classes with their
probabilities as a table, CSV or JSON. With ``--min-confidence P`` a file whose top probability
is below P is marked ``uncertain`` instead of given a class. Where the audit stage has run, a
file whose embedding is farther from the training images than nearly every validation image
(``audit.unfamiliar_percentile``) is marked ``unfamiliar`` beside its prediction. A file that
cannot be read gets an error row and the others still run; the exit status is non-zero only
when nothing could be predicted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from transfer.data import read_image_file
from transfer.errors import (
    ArgumentParser,
    PipelineError,
    one_line,
    run_stage,
    without_surrogates,
)
from transfer.layout import (
    EMBEDDING_STORE,
    EMBEDDINGS_DIR,
    FAMILIARITY,
    FINETUNE_DIR,
    HEAD_PATH,
    ONNX_CACHE,
    PARAMS,
    shared_by_experiments,
)
from transfer.params import ENGINES, MAX_BATCH_SIZE, MODEL_CHOICES, load_params
from transfer.prediction import UNCERTAIN, UNFAMILIAR, Prediction, classify, decode_for
from transfer.predictor import (
    Embedder,
    FamiliarityCheck,
    Predictor,
    check_familiarity,
    chosen_model,
)
from transfer.sources import walk_visible_files
from transfer.warm import gpu_visible
from transfer.warm_finetune import WarmFinetuned, warm_finetuned
from transfer.warm_finetune import leave_record as leave_finetuned_record
from transfer.warm_head import WarmClassifier, leave_record, warm_classifier

log = logging.getLogger(__name__)

CHUNK = 256  # files decoded and held in memory at a time


def list_inputs(paths: Iterable[str]) -> tuple[list[Path], dict[Path, str]]:
    """Files as given, and every non-hidden entry below the given folders that is not a
    folder, in sorted order; and why each entry found below a folder cannot be read (a link to
    nothing or to a folder, a pipe, a folder it cannot list), so that it gets an error row
    like a damaged file instead of going unmentioned."""
    found: list[Path] = []
    unreadable: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            left_out: dict[Path, str] = {}
            files = list(walk_visible_files(path, left_out.__setitem__, lenient=True,
                                            link_hint="name the folder itself instead"))
            found.extend(sorted(files + list(left_out)))
            unreadable.update(left_out)
        else:
            found.append(path)
    return found, unreadable


def predict_files(classifier: Predictor, files: list[Path], top_k: int, batch_size: int,
                  min_confidence: float = 0.0, familiarity: FamiliarityCheck | None = None,
                  unreadable: dict[Path, str] | None = None) -> Iterator[Prediction]:
    """Decode and classify ``files`` chunk by chunk, in input order (``classify`` says how);
    a file in ``unreadable`` gets its reason as the error, without being opened."""
    unreadable = unreadable or {}
    # No bar where stderr is not a terminal (a log file, CI): no cursor escapes end up there.
    with tqdm(total=len(files), desc="predict", unit="img", leave=False,
              disable=None) as progress:
        for start in range(0, len(files), CHUNK):
            chunk = files[start:start + CHUNK]
            results = [Prediction(str(path)) for path in chunk]
            images, readable = [], []
            for result, path in zip(results, chunk, strict=True):
                if path in unreadable:
                    result.error = unreadable[path]
                    continue
                try:
                    images.append(decode_for(classifier, read_image_file(path)))
                    readable.append(result)
                except (OSError, ValueError) as err:
                    result.error = getattr(err, "strerror", None) or str(err)
            classify(classifier, readable, images, top_k, batch_size, min_confidence,
                     familiarity)
            progress.update(len(chunk))
            yield from results


def columns(text: str) -> int:
    """How many terminal columns ``text`` takes: two for a wide character (CJK), none for a
    combining mark."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else
               0 if unicodedata.combining(c) else 1 for c in text)


def write_table(predictions: list[Prediction], out) -> None:
    """One line per file for a terminal: a name's line breaks, control characters and bytes
    that are not UTF-8 are written as escapes, so that no name splits a row or moves the
    cursor."""
    paths = [one_line(p.path) for p in predictions]
    width = max(map(columns, paths), default=4)
    for path, p in zip(paths, predictions, strict=True):
        if p.error:
            cells = f"error: {one_line(p.error)}"
        else:
            cells = "  ".join(f"{name} {probability:.3f}" for name, probability in p.top)
            if p.flags:
                cells = f"{', '.join(p.flags)}: {cells}"
        out.write(f"{path}{' ' * (width - columns(path))}  {cells}\n")


def write_csv(predictions: list[Prediction], out, top_k: int) -> None:
    """CSV (quoted where a name holds a comma, quote or line break); bytes of a name that are
    not UTF-8 are written as ``\\udcXX`` escapes."""
    writer = csv.writer(out)
    writer.writerow(["path", *[f"{kind}_{i}" for i in range(1, top_k + 1)
                               for kind in ("class", "probability")], "error", "prediction",
                     UNFAMILIAR])
    for p in predictions:
        cells = [value for name, probability in p.top for value in (name, f"{probability:.6f}")]
        unfamiliar = "" if p.unfamiliar is None else str(p.unfamiliar).lower()
        writer.writerow([without_surrogates(p.path), *cells, *[""] * (2 * top_k - len(cells)),
                         without_surrogates(p.error), p.label, unfamiliar])


def write_json(predictions: list[Prediction], out) -> None:
    """UTF-8 JSON; a byte of a name that is not UTF-8 is the escape ``\\udcXX``, which
    Python's ``json`` reads back as the name ``os.fsencode`` turns into the file's bytes."""
    text = json.dumps([{"path": p.path, **p.answer(), "error": p.error or None}
                       for p in predictions], indent=2, ensure_ascii=False)
    out.write(without_surrogates(text) + "\n")


def add_model_arguments(parser: ArgumentParser) -> None:
    """The options that choose the model, its engine, and the answers' thresholds."""
    parser.add_argument("--model", choices=MODEL_CHOICES, default="auto",
                        help="auto (default): the fine-tuned model when fine-tuning kept an "
                             "epoch after its start, else the head on the frozen backbone")
    parser.add_argument("--exported", type=Path, metavar="FILE",
                        help="use an exported model file (.onnx or .pt, from "
                             "python -m stages.export) instead of the pipeline's models")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="what runs the network: auto (default; ONNX Runtime on CPU, "
                             "PyTorch on a GPU), onnxruntime or torch")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                        help="mark an image whose top probability is below P (0 to 1) "
                             f"'{UNCERTAIN}' instead of giving it a class (default 0: never)")


def open_model(parser: ArgumentParser,
               args: argparse.Namespace) -> tuple[Predictor, FamiliarityCheck | None]:
    """The model the options of ``add_model_arguments`` name, and what tells unfamiliar
    images apart (None where the audit has not run, or for an exported file); a bad option
    value is one error line."""
    if args.top_k < 1:
        parser.error("--top-k must be 1 or more")
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        parser.error(f"--batch-size must be from 1 to {MAX_BATCH_SIZE}")
    if not 0.0 <= args.min_confidence <= 1.0:  # NaN too
        raise PipelineError(f"--min-confidence must be a probability between 0 and 1, got "
                            f"{args.min_confidence:g}")
    if args.exported is not None:
        from transfer.exported import load_exported

        exported = load_exported(args.exported)
        log.info("%s: images are not checked for being unfamiliar (an exported file holds "
                 "no training images)", args.exported)
        return exported, None
    model = chosen_model(args.model, FINETUNE_DIR)
    backbone = backbone_params() if model == "head" else None
    if model == "head":
        warm = warm_model(args.engine, backbone)
        if warm is not None:
            return warm, check_familiarity(warm, FAMILIARITY, EMBEDDINGS_DIR, lambda: warm)
    else:
        warm = warm_finetuned_model(args.engine)
        if warm is not None:
            return warm, check_familiarity(warm, FAMILIARITY, EMBEDDINGS_DIR,
                                           lambda: head_embedder(args.engine))
    from transfer.engines import engine_named
    from transfer.inference import familiarity_check, load_predictor

    engine = engine_named(args.engine, ONNX_CACHE, "--engine")
    classifier = load_predictor(model, EMBEDDINGS_DIR, HEAD_PATH, FINETUNE_DIR, engine)
    if model == "head" and backbone is not None:
        leave_record(classifier, backbone, shared_by_experiments(EMBEDDING_STORE))
    elif model == "finetune":
        leave_finetuned_record(classifier, FINETUNE_DIR, shared_by_experiments(ONNX_CACHE))
    return classifier, familiarity_check(classifier, FAMILIARITY, EMBEDDINGS_DIR, HEAD_PATH,
                                         engine)


def warm_finetuned_model(engine: str) -> WarmFinetuned | None:
    """The fine-tuned model without PyTorch (``transfer.warm_finetune``) where ONNX Runtime is
    the engine that would run it and an earlier ``predict`` left a record of it; None
    otherwise, and the model is loaded with PyTorch."""
    if not runs_on_onnxruntime(engine):
        return None
    warm = warm_finetuned(FINETUNE_DIR, shared_by_experiments(ONNX_CACHE))
    if warm is not None:
        log.debug("the fine-tuned model runs through its cached ONNX graph, without PyTorch")
    return warm


def head_embedder(engine: str) -> Embedder:
    """The head model, whose embeddings the familiarity check compares: without PyTorch where
    ``warm_model`` finds it, else loaded with it."""
    warm = warm_model(engine, backbone_params())
    if warm is not None:
        return warm
    from transfer.engines import engine_named
    from transfer.inference import load_classifier

    return load_classifier(EMBEDDINGS_DIR, HEAD_PATH, engine_named(engine, ONNX_CACHE,
                                                                   "--engine"))


def backbone_params() -> Any:
    """``params.yaml``'s backbone section, or None where it cannot be read: the model is what
    it is, whatever the file says now; it only names the warm record to look for."""
    try:
        return load_params(PARAMS).backbone
    except PipelineError as err:
        log.debug("%s not read (%s): predict loads the backbone with PyTorch", PARAMS, err)
        return None


def runs_on_onnxruntime(engine: str) -> bool:
    """Whether ``--engine`` runs the network on ONNX Runtime here (``auto``: where no GPU is
    visible), as a warm record's graph does."""
    return engine == "onnxruntime" or (engine == "auto" and not gpu_visible())


def warm_model(engine: str, backbone: Any) -> WarmClassifier | None:
    """The head model without PyTorch (``transfer.warm_head``) where ONNX Runtime is the
    engine that would run it and the last extraction left a record of the backbone
    (``params.yaml``'s section, None where it cannot be read) its embeddings came from; None
    otherwise, and the model is loaded with PyTorch."""
    if backbone is None or not runs_on_onnxruntime(engine):
        return None
    warm = warm_classifier(backbone, EMBEDDINGS_DIR, HEAD_PATH,
                           shared_by_experiments(EMBEDDING_STORE),
                           shared_by_experiments(ONNX_CACHE))
    if warm is not None:
        log.debug("the head model runs through the cached ONNX graph, without PyTorch")
    return warm


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.predict",
                            description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    files, unreadable = list_inputs(args.paths)
    if not files:
        raise PipelineError(f"no files found in {', '.join(args.paths)}")
    classifier, familiarity = open_model(parser, args)
    predictions = list(predict_files(classifier, files, args.top_k, args.batch_size,
                                     args.min_confidence, familiarity, unreadable))
    if args.format == "csv":
        write_csv(predictions, sys.stdout, min(args.top_k, len(classifier.classes)))
    elif args.format == "json":
        write_json(predictions, sys.stdout)
    else:
        write_table(predictions, sys.stdout)
    failed = sum(1 for p in predictions if p.error)
    uncertain = sum(1 for p in predictions if p.uncertain)
    if uncertain:
        log.info("%d of %d files uncertain (top probability below %g)", uncertain,
                 len(predictions), args.min_confidence)
    unfamiliar = sum(1 for p in predictions if p.unfamiliar)
    if unfamiliar:
        log.info("%d of %d files unfamiliar (farther from the training images than %g%% of "
                 "validation images)", unfamiliar, len(predictions),
                 familiarity.reference.percentile)
    if failed == len(predictions):
        raise PipelineError(f"none of the {len(predictions)} files could be classified "
                            f"(first: {predictions[0].path}: {predictions[0].error})")
    classified = len(predictions) - failed
    log.info("classified %d file%s with the %s model", classified, "s" * (classified != 1),
             classifier.name)
    if failed:
        log.warning("%d of %d files could not be classified", failed, len(predictions))


if __name__ == "__main__":
    run_stage(main)
