"""Hostile inputs, generated: random and damaged bytes in every file the pipeline reads, every
parameter at and beyond its bounds, odd encodings and odd names.

Whatever comes in, the pipeline either works or stops with a ``PipelineError`` whose message is
one line; no other exception escapes. Each test feeds a few hundred inputs, made from a fixed
seed, to the function that reads that kind of file (the stages call the same functions), and a
few go through the real entry points to check what the user sees: one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import shutil
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.predict import predict_files
from tests.conftest import REPO_ROOT, one_error_line, run_stage_cli, write_colour_folder
from transfer.data import ImageStore, decode_image, read_image_file
from transfer.embeddings import EmbeddingMeta, load_split, row_chunks
from transfer.errors import PipelineError
from transfer.heads import LogisticHead, MLPHead, load_head
from transfer.params import Params, load_params, params_from_dict
from transfer.sources import list_image_folder, list_manifest

SEED = 16
# Names a user's files and folders may have; each must work or be refused in one line.
ODD_NAMES = ["with space", "café", "日本語", "emoji-🐱", "-starts-with-dash", "'quote\"",
             "semi;colon", "back\\slash", "percent%20", "dots...", "x" * 200, "ñ" * 120,
             "\u202eright-to-left", "zero\u200bwidth", "tab\there", "new\nline", "bell\a",
             os.fsdecode(b"latin1-\xe9"), "CON", "train", "Test", ".hidden"]


def damaged(data: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    """``count`` variants of ``data``: random bytes, truncations, flipped and inserted bytes,
    control characters, byte-order marks and other encodings of the same text."""
    yield b""
    yield b"\x00" * 64
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        yield bom + data
    try:
        text = data.decode("utf-8")
        yield text.encode("utf-16")
        yield text.encode("latin-1", "replace")
    except UnicodeDecodeError:
        pass
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            yield rng.randbytes(rng.choice([1, 7, 100, 4096]))
        elif kind == 1 and data:
            yield data[:rng.randrange(len(data))]
        elif kind == 2 and data:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            yield bytes(flipped)
        elif kind == 3 and data:
            at = rng.randrange(len(data))
            yield data[:at] + rng.choice([b"\n", b"\r", b"\x00", b"\x1b[2J", b"\t", b":",
                                          b"[", b"{", b"\"", b",", b"\xe2\x80\xa8"]) + data[at:]
        else:
            yield data * rng.randint(2, 3)


def outcome(call: Callable[[], object], names_in_message: bool = False) -> object:
    """What ``call`` returns, or the ``PipelineError`` it raises, checked to be one short line
    (a line break is allowed only inside a name the user gave, which ``run_stage`` escapes).
    Any other exception propagates: that is the failure these tests look for."""
    try:
        return call()
    except PipelineError as err:
        message = str(err)
        assert message and len(message) < 1000 and "Traceback" not in message, message
        assert names_in_message or "\n" not in message, message
        return err


def each_survives(inputs: Iterable[bytes], path: Path, read: Callable[[Path], object]) -> int:
    """Write each input to ``path`` and ``read`` it; returns how many were refused."""
    refused = 0
    for data in inputs:
        path.write_bytes(data)
        try:
            refused += isinstance(outcome(lambda: read(path)), PipelineError)
        except Exception as err:
            raise AssertionError(f"{path.name} holding {data[:80]!r}... raised "
                                 f"{type(err).__name__}: {err}") from err
    return refused


# Parameters

def every_key() -> Iterator[tuple[str, dataclasses.Field, typing.Any]]:
    for section in dataclasses.fields(Params):
        value = getattr(Params(), section.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            for f in dataclasses.fields(value):
                yield f"{section.name}.{f.name}", f, hints[f.name]
        else:
            yield section.name, section, typing.get_type_hints(Params)[section.name]


HOSTILE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 0.0, -0.0, 1e-320,
                  1e308, math.nan, math.inf, -math.inf, "nan", "inf", "1e999", "", " ", "auto",
                  "\x00", "a\nb", "é" * 5000, [], [1, 2, 3], [math.nan, 0, 0], {}, {"a": 1}]


def nested(name: str, value: object) -> dict:
    section, _, key = name.rpartition(".")
    return {section: {key: value}} if section else {key: value}


@pytest.mark.parametrize(("name", "field", "hint"), list(every_key()),
                         ids=[name for name, _, _ in every_key()])
def test_every_parameter_at_and_beyond_its_bounds(name, field, hint):
    values = list(HOSTILE_VALUES)
    if "range" in field.metadata:
        low, high = field.metadata["range"]
        for bound in (low, high):
            if bound is not None:
                values += [bound, bound - 1, bound + 1, bound * 10, bound - 1e-9, bound + 1e-9]
    for value in values:
        result = outcome(lambda value=value: params_from_dict(nested(name, value)))
        if isinstance(result, PipelineError):
            assert f"{name}=" in str(result), str(result)
            continue
        section, _, key = name.rpartition(".")
        got = getattr(getattr(result, section) if section else result, key)
        numbers = got if isinstance(got, tuple) else (got,)
        for number in numbers:
            if isinstance(number, float):
                assert math.isfinite(number), (name, value)
            if "range" in field.metadata and isinstance(number, (int, float)) and \
                    not isinstance(number, bool):
                low, high = field.metadata["range"]
                assert low is None or number >= low, (name, value)
                assert high is None or number <= high, (name, value)


def test_params_files_of_damaged_bytes(tmp_path):
    rng = random.Random(SEED)
    original = (REPO_ROOT / "params.yaml").read_bytes()
    extra = [b"seed: &a [*a]\n", b"seed: " + b"[" * 3000 + b"]" * 3000, b"- a\n- b\n",
             b"!!python/object:os.system\n", b"seed: !!binary aGVsbG8=\n", b"? [a, b]\n: 1\n",
             b"seed: 1\nseed: 2\n", b"head:\n  C: .nan\n",
             b"data:\n  max_per_class: " + b"9" * 400 + b"\n"]
    inputs = [*damaged(original, rng, 300), *extra]
    refused = each_survives(iter(inputs), tmp_path / "params.yaml", load_params)
    assert refused > len(inputs) // 3  # most damage is noticed, not read as defaults


def test_a_params_file_of_random_bytes_through_the_stage_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_bytes(random.Random(SEED).randbytes(300))
    assert one_error_line(run_stage_cli("prepare", tmp_path)).startswith("error: params.yaml")


# Data sources

def test_csv_manifests_of_damaged_bytes(tmp_path):
    rng = random.Random(SEED)
    write_colour_folder(tmp_path, per_class=2)
    rows = ["path,label,split", "red/0.png,red,train", "green/0.png,green,", "blue/1.png,blue,test",
            "../escape.png,red,", "red/1.png,\"quoted, label\",val", "missing.png,red,"]
    original = "\n".join(rows).encode()

    def listed(path: Path) -> object:
        with list_manifest(path) as catalog:
            return len(catalog)

    each_survives(damaged(original, rng, 300), tmp_path / "labels.csv", listed)


@pytest.mark.parametrize("name", ODD_NAMES, ids=[repr(n)[1:20] for n in ODD_NAMES])
def test_class_folders_and_files_with_odd_names(tmp_path, name):
    root = write_colour_folder(tmp_path / "root", per_class=1)
    try:
        (root / name).mkdir()
        (root / name / name).write_bytes(b"")
        shutil.copy(root / "red" / "0.png", root / name / f"{name}.png")
    except OSError:  # a name this file system refuses (too long in bytes)
        pytest.skip(f"file system refuses {name!r}")
    result = outcome(lambda: list_image_folder(root), names_in_message=True)
    if not isinstance(result, PipelineError):
        labels = {image.label for image in result.images()}
        assert name in labels or name.startswith("."), labels
        json.dumps(result.skipped, ensure_ascii=False).encode("utf-8")  # the report can hold it
        result.close()


# Images

def image_bytes() -> dict[str, bytes]:
    """One small picture in every format Pillow writes here."""
    pixels = np.random.default_rng(SEED).integers(0, 255, (20, 16, 3), dtype=np.uint8)
    found = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "PCX",
                "SGI", "DDS"):
        out = io.BytesIO()
        try:
            Image.fromarray(pixels).save(out, format=fmt)
        except (OSError, KeyError, ValueError):
            continue
        found[fmt] = out.getvalue()
    return found


def test_images_of_damaged_bytes_decode_or_give_a_reason():
    rng = random.Random(SEED)
    for fmt, data in image_bytes().items():
        for variant in damaged(data, rng, 60):
            try:
                image = decode_image(variant)
            except ValueError as err:
                assert str(err) and "\n" not in str(err)
                continue
            except Exception as err:
                raise AssertionError(f"{fmt} {variant[:40]!r}: {type(err).__name__}: {err}"
                                     ) from err
            assert image.mode == "RGB"


def test_formats_outside_the_list_are_not_offered_to_pillow(tmp_path, monkeypatch):
    # Pillow's EPS reader runs Ghostscript on the file: a photo set, an upload or a file
    # handed to predict must never start a program.
    ran = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    with pytest.raises(ValueError, match=r"^not an image \(content not recognised as JPEG, "):
        decode_image(eps)
    assert not ran.exists()
    formats = image_bytes()
    for fmt in ("TGA", "PCX", "SGI", "ICO"):  # decoders a photo set has no use for
        with pytest.raises(ValueError, match="^not an image"):
            decode_image(formats[fmt])
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"):
        assert decode_image(formats[fmt]).size == (16, 20)


def test_files_that_are_not_regular_files_are_never_read(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for path in (Path("/dev/zero"), Path("/dev/null"), tmp_path / "pipe", tmp_path / "folder"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_image_file(path)
    with pytest.raises(OSError):
        read_image_file(tmp_path / "loop")


def test_prepare_over_a_folder_of_hostile_files(tmp_path, monkeypatch):
    """The stage runs through; every hostile file is kept (when it is an image) or reported."""
    from stages import prepare
    from tests.conftest import write_params

    rng = random.Random(SEED)
    root = write_colour_folder(tmp_path / "data" / "raw" / "set", per_class=6)
    hostile = root / "red"
    for i, (fmt, data) in enumerate(image_bytes().items()):
        for j, variant in enumerate(damaged(data, rng, 3)):
            (hostile / f"{fmt}-{i}-{j}.img").write_bytes(variant)
    for i, name in enumerate(n for n in ODD_NAMES if not n.startswith(".")):
        try:
            shutil.copy(root / "green" / "0.png", hostile / f"{name}{i}")
        except OSError:
            continue
    (hostile / "folder.png").mkdir()
    os.mkfifo(hostile / "pipe.png")
    os.symlink(root / "blue" / "0.png", hostile / "inner-link.png")
    write_params(tmp_path, {"data": {"source": "data/raw/set", "min_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    prepare.main()
    report = json.loads((tmp_path / "reports" / "data.json").read_text(encoding="utf-8"))
    seen = {item["path"] for item in report["skipped"]} | \
        {item["path"] for item in report["duplicates"]} | \
        {path for group in report["conflicts"] for path in group["paths"]}
    kept = {str(i) for i in ImageStore(tmp_path / "data" / "prepared", "train").ids}
    for split in ("val", "test"):
        kept |= {str(i) for i in ImageStore(tmp_path / "data" / "prepared", split).ids}
    listed = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
              and p.name != "pipe.png" and not p.name.startswith(".")}
    missing = {path for path in listed if path not in kept | seen
               and os.fsencode(path).decode("utf-8", "backslashreplace") not in seen}
    assert not missing


# Pipeline outputs read by later stages

def npz_bytes(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def each_damaged_copy_survives(outputs: Path, tmp_path: Path, folder: str, name: str,
                               read: Callable[[Path], object]) -> None:
    """Copy ``data/<folder>`` of ``outputs``, then ``read`` it (the copy's folder) with each
    damaged version of its file ``name`` in place."""
    copy = tmp_path / folder
    shutil.copytree(outputs / "data" / folder, copy)
    each_survives(damaged((copy / name).read_bytes(), random.Random(SEED), 100), copy / name,
                  lambda _: read(copy))

@pytest.fixture(scope="module")
def outputs(embedded_project, tmp_path_factory) -> Path:
    """A copy of the embedded project with a trained head, the files to damage."""
    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(embedded_project / "data", root / "data")
    features, labels, _ = load_split(root / "data" / "embeddings", "train")
    classes = EmbeddingMeta.read(root / "data" / "embeddings").classes
    (root / "models").mkdir()
    LogisticHead().fit(np.asarray(features), labels).save(root / "models" / "head.npz", classes)
    return root


def test_head_files_of_damaged_bytes_and_arrays(outputs, tmp_path):
    rng = random.Random(SEED)
    good = outputs / "models" / "head.npz"
    path = tmp_path / "head.npz"

    def scored(p: Path) -> object:
        head, classes = load_head(p)
        return head.predict_proba_all(np.zeros((2, len(head.mean_))), len(classes))

    each_survives(damaged(good.read_bytes(), rng, 150), path, scored)
    arrays = dict(np.load(good))
    # Older files lack these two: a head is then read as logistic, with temperature 1.
    optional = ("kind", "temperature")
    variants = [{k: v for k, v in arrays.items() if k != name} for name in arrays
                if name not in optional]
    variants += [{**arrays, name: value} for name in arrays
                 for value in (np.asarray([]), np.asarray("text"), np.full((2, 2), np.nan),
                               np.asarray([[1, 2], [3, 4]]), np.asarray(5))
                 if not (name == "temperature" and value.shape == ())]  # 5 is a temperature
    variants += [{**arrays, "temperature": np.asarray(value)} for value in (0.0, -1.0, np.inf)]
    variants += [{**arrays, "kind": np.asarray("mlp")}, {**arrays, "scale": -arrays["scale"]},
                 {**arrays, "classes": np.asarray([0, 0, 1])},
                 {**arrays, "classes": np.asarray([0, 1, 7])}]
    refused = each_survives((npz_bytes(**variant) for variant in variants), path, scored)
    assert refused == len(variants)
    assert isinstance(outcome(lambda: scored(good)), np.ndarray)


def test_an_mlp_head_file_with_layers_that_do_not_chain_is_refused(outputs, tmp_path):
    features, labels, _ = load_split(outputs / "data" / "embeddings", "train")
    val_x, val_y, _ = load_split(outputs / "data" / "embeddings", "val")
    head = MLPHead(hidden_units=4, max_epochs=2).fit(np.asarray(features), labels, val_x, val_y)
    head.weights_[1] = head.weights_[1][:3]
    head.save(tmp_path / "head.npz", ["blue", "green", "red"])
    with pytest.raises(PipelineError, match="arrays do not fit together"):
        load_head(tmp_path / "head.npz")


def every_row(cache: Path) -> float:
    features, labels, _ = load_split(cache, "train")
    return sum(float(chunk.sum()) for _, chunk in row_chunks(features)) + labels.sum()


@pytest.mark.parametrize("name", ["meta.json", "index.npz", "train.npy"])
def test_embedding_cache_files_of_damaged_bytes(outputs, tmp_path, name):
    each_damaged_copy_survives(outputs, tmp_path, "embeddings", name, every_row)


def test_embedding_meta_of_the_wrong_shape(outputs, tmp_path):
    cache = tmp_path / "embeddings"
    shutil.copytree(outputs / "data" / "embeddings", cache)
    meta = json.loads((cache / "meta.json").read_text())
    variants = [[], 5, "meta", None, {}, {**meta, "dim": "1280"}, {**meta, "dim": -1},
                {**meta, "dim": 7}, {**meta, "classes": "abc"}, {**meta, "dtype": "banana"},
                {**meta, "dtype": "object"}, {**meta, "flip_average": 1},
                {k: v for k, v in meta.items() if k != "classes"}, {**meta, "classes": ["a"]},
                {**meta, "dim": 10**12}]
    refused = each_survives((json.dumps(v).encode() for v in variants), cache / "meta.json",
                            lambda _: every_row(cache))
    assert refused == len(variants)


def test_embedding_meta_whose_preprocessing_would_size_images_absurdly(outputs, tmp_path):
    # A side of 60,000 pixels got predict killed for memory, and short_side 0 shrank every
    # image to one pixel and changed its answers, without a word.
    from transfer.backbones import preprocessing_of

    cache = tmp_path / "embeddings"
    shutil.copytree(outputs / "data" / "embeddings", cache)
    meta = json.loads((cache / "meta.json").read_text())
    pre = meta["preprocessing"]
    variants = [{**meta, "short_side": 0}] + [
        {**meta, "preprocessing": {**pre, key: value}} for key, value in (
            ("input_size", [3, 60000, 60000]), ("input_size", [3, 0, 224]),
            ("input_size", [1, 224, 224]), ("input_size", [3, 224]), ("input_size", "224"),
            ("input_size", [3, 224.5, 224]), ("input_size", [3, True, 224]),
            ("resize_size", 100000), ("resize_size", 0), ("resize_size", "256"),
            ("interpolation", "sinc"), ("mean", [0.5, 0.5]), ("mean", [0.5, 0.5, "x"]),
            ("std", [0.2, 0.0, 0.2]), ("std", [0.2, -1, 0.2]))]
    refused = each_survives((json.dumps(v).encode() for v in variants), cache / "meta.json",
                            lambda _: preprocessing_of(EmbeddingMeta.read(cache)))
    assert refused == len(variants)
    (cache / "meta.json").write_text(json.dumps(meta))
    assert preprocessing_of(EmbeddingMeta.read(cache)).input_size == tuple(pre["input_size"])


def test_a_familiarity_reference_that_does_not_fit_is_refused(outputs, tmp_path):
    # A reference of another width was a NumPy traceback; a threshold of NaN or an empty
    # reference marked no image unfamiliar, silently.
    from transfer.audit import Familiarity

    rows = np.ones((4, 6), dtype=np.float16)
    good = {"centre": np.zeros(6), "reference": rows, "k": np.int64(2),
            "percentile": np.float64(99), "threshold": np.float64(0.3),
            "embeddings": np.str_(json.dumps({"dim": 6}))}
    variants = [{**good, "reference": np.ones((4, 5), dtype=np.float16)},
                {**good, "reference": rows[:0]}, {**good, "threshold": np.float64(np.nan)},
                {**good, "k": np.int64(5)}, {**good, "embeddings": np.str_("[]")},
                {**good, "embeddings": np.str_(json.dumps({"dim": 5}))}]
    path = tmp_path / "familiarity.npz"
    refused = each_survives((npz_bytes(**v) for v in variants), path,
                            lambda p: Familiarity.load(p).unfamiliar(np.ones((2, 6))))
    assert refused == len(variants)
    path.write_bytes(npz_bytes(**good))
    assert Familiarity.load(path).unfamiliar(np.ones((2, 6))).tolist() == [False, False]


@pytest.mark.parametrize("name", ["meta.json", "train.npz", "train.bin"])
def test_prepared_store_files_of_damaged_bytes(outputs, tmp_path, name):
    each_damaged_copy_survives(outputs, tmp_path, "prepared", name, lambda store: sum(
        int(image.sum()) for image in ImageStore(store, "train")))


def test_a_store_index_pointing_past_its_pixels_is_refused(outputs, tmp_path):
    store = tmp_path / "prepared"
    shutil.copytree(outputs / "data" / "prepared", store)
    index = dict(np.load(store / "train.npz"))
    for variant in ({**index, "shapes": index["shapes"] * 1000},
                    {**index, "offsets": index["offsets"] + 2**62},
                    {**index, "shapes": np.full_like(index["shapes"], 2**31 - 1)},
                    {**index, "labels": index["labels"] + 5},
                    {k: v for k, v in index.items() if k != "ids"}):
        (store / "train.npz").write_bytes(npz_bytes(**variant))
        with pytest.raises(PipelineError, match="does not describe train.bin"):
            ImageStore(store, "train")


def test_finetuned_model_descriptions_of_damaged_bytes_and_shapes(tmp_path):
    from transfer.inference import load_finetuned

    rng = random.Random(SEED)
    info = {"backbone": "tf_efficientnet_lite0", "classes": ["a", "b"], "short_side": 64,
            "preprocessing": {"input_size": [3, 224, 224], "resize_size": 256,
                              "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
                              "source": "test"}}
    (tmp_path / "model.safetensors").write_bytes(rng.randbytes(64))
    each_survives(damaged(json.dumps(info).encode(), rng, 40), tmp_path / "model.json",
                  lambda _: load_finetuned(tmp_path))
    variants = ([], {}, {**info, "classes": 3}, {**info, "preprocessing": "bicubic"},
                {**info, "backbone": "no-such-model"}, info)
    refused = each_survives((json.dumps(v).encode() for v in variants),
                            tmp_path / "model.json", lambda _: load_finetuned(tmp_path))
    assert refused == len(variants)  # the last: its tensors are random bytes


def test_damaged_outputs_through_the_stages_are_one_line(outputs, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(outputs, project)
    (project / "params.yaml").write_text("seed: 0\n")
    (project / "data" / "embeddings" / "index.npz").write_bytes(b"PK\x03\x04 damaged")
    assert one_error_line(run_stage_cli("train_head", project)).startswith(
        "error: data/embeddings/index.npz: not a readable array file")
    shutil.copy(outputs / "data" / "embeddings" / "index.npz", project / "data" / "embeddings")
    (project / "models" / "head.npz").write_bytes(b"\x93NUMPY garbage")
    assert one_error_line(run_stage_cli("evaluate", project)).startswith(
        "error: models/head.npz: not a readable array file")


# Prediction inputs

class UniformClassifier:
    """Stands in for the model: predict's reading and decoding are what is under test."""

    name = "uniform"
    classes = ["a", "b", "c"]
    short_side = 32

    def predict_proba(self, images, batch_size=8):
        for start in range(0, len(images), batch_size):
            yield np.full((len(images[start:start + batch_size]), 3), 1 / 3)


def test_prediction_inputs_of_damaged_bytes_and_odd_names(tmp_path):
    rng = random.Random(SEED)
    files = []
    for i, (fmt, data) in enumerate(image_bytes().items()):
        for j, variant in enumerate(damaged(data, rng, 10)):
            files.append(tmp_path / f"{fmt}-{i}-{j}")
            files[-1].write_bytes(variant)
    for i, name in enumerate(ODD_NAMES):
        try:
            (tmp_path / f"{name}{i}").write_bytes(image_bytes()["PNG"])
            files.append(tmp_path / f"{name}{i}")
        except OSError:
            continue
    os.mkfifo(tmp_path / "pipe")
    files += [tmp_path / "pipe", Path("/dev/zero"), tmp_path, tmp_path / "missing"]
    predictions = list(predict_files(UniformClassifier(), files, top_k=5, batch_size=4))
    assert [p.path for p in predictions] == [str(f) for f in files]
    assert all(bool(p.top) != bool(p.error) for p in predictions)
    assert all(len(p.top) == 3 for p in predictions if p.top)
