import logging
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from transfer import engines, params
from transfer.backbones import Normalized, compile_encoder, extract_embeddings
from transfer.engines import (
    ENGINES,
    AutoEngine,
    OnnxRuntimeEngine,
    TorchEngine,
    engine_named,
    graph_key,
)
from transfer.errors import PipelineError
from transfer.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "float32")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two real photos (scikit-learn's samples), each whole and as four corner crops."""
    found = []
    for name in ("flower.jpg", "china.jpg"):
        image = load_sample_image(name)
        h, w = image.shape[0] // 2, image.shape[1] // 2
        found += [image, image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:]]
    return found


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A cache of ONNX graphs shared by the tests that only run them."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """``import onnxruntime`` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_onnx_runtime_embeddings_match_pytorch_on_photos(backbone, photos, graphs):
    reference = extract_embeddings(backbone, photos, 4, CPU)
    features = extract_embeddings(backbone, photos, 4, CPU, OnnxRuntimeEngine(graphs))
    assert relative_difference(features, reference) < 1e-4
    assert np.abs(reference).max() > 1  # a feature scale worth the name


def test_onnx_runtime_embeddings_are_byte_identical_across_runs_batches_and_threads(
        backbone, photos, graphs):
    engine = OnnxRuntimeEngine(graphs)
    first = extract_embeddings(backbone, photos, 4, CPU, engine)
    assert extract_embeddings(backbone, photos, 4, CPU, engine).tobytes() == first.tobytes()
    assert extract_embeddings(backbone, photos, 3, CPU, engine).tobytes() == first.tobytes()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # the engine uses as many as torch
        other = extract_embeddings(backbone, photos, 4, CPU, engine)
    finally:
        torch.set_num_threads(threads)
    assert other.tobytes() == first.tobytes()


def test_flip_averaging_with_onnx_runtime_matches_pytorch(backbone, photos, graphs):
    averaged = extract_embeddings(backbone, photos[:2], 2, CPU, OnnxRuntimeEngine(graphs),
                                  flip_average=True)
    reference = extract_embeddings(backbone, photos[:2], 2, CPU, flip_average=True)
    assert relative_difference(averaged, reference) < 1e-4
    plain = extract_embeddings(backbone, photos[:2], 2, CPU, OnnxRuntimeEngine(graphs))
    assert relative_difference(averaged, plain) > 1e-3


def test_the_graph_is_exported_once_and_then_read_from_the_cache(backbone, photos, tmp_path,
                                                                 monkeypatch):
    engine = OnnxRuntimeEngine(tmp_path)
    first = compile_encoder(backbone, engine, CPU)
    [graph] = tmp_path.glob("*.onnx")
    assert graph.name.startswith("tf_efficientnet_lite0-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.name]  # no temporaries left

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    again = compile_encoder(backbone, engine, CPU)
    assert again.engine == "onnxruntime"
    batch = torch.from_numpy(np.stack([photos[0][:224, :224]]))
    assert again(batch).tobytes() == first(batch).tobytes()


def test_a_damaged_graph_is_rebuilt_never_used(backbone, photos, tmp_path, caplog):
    engine = OnnxRuntimeEngine(tmp_path)
    batch = torch.from_numpy(np.stack([photos[0][:224, :224]]))
    expected = compile_encoder(backbone, engine, CPU)(batch)
    [graph] = tmp_path.glob("*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, deep in the weights
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = compile_encoder(backbone, engine, CPU)
    assert [r.getMessage() for r in caplog.records] == [
        f"{graph} is damaged (its bytes do not match its name); building it again"]
    assert rebuilt(batch).tobytes() == expected.tobytes()
    assert graph.read_bytes() != bytes(data)  # sound again, under the same name


def test_a_truncated_graph_is_rebuilt(backbone, tmp_path):
    engine = OnnxRuntimeEngine(tmp_path)
    compile_encoder(backbone, engine, CPU)
    [graph] = tmp_path.glob("*.onnx")
    sound = graph.read_bytes()
    graph.write_bytes(sound[:1000])
    assert compile_encoder(backbone, engine, CPU).engine == "onnxruntime"
    assert graph.read_bytes() == sound


def test_the_graph_key_follows_the_weights_the_normalization_and_the_input(backbone):
    def key(network, shape=(224, 224, 3)):
        return graph_key(network, shape)

    preprocessing = backbone.preprocessing
    base = key(Normalized(backbone.encoder, preprocessing))
    assert key(Normalized(backbone.encoder, preprocessing)) == base
    assert key(Normalized(backbone.encoder, preprocessing), (192, 192, 3)) != base
    other_std = preprocessing.with_normalization(None, (0.25, 0.25, 0.25), allow_override=True)
    assert key(Normalized(backbone.encoder, other_std)) != base
    changed = Normalized(torch.nn.Sequential(torch.nn.Flatten()), preprocessing)
    assert key(changed) != base
    weight = next(backbone.encoder.parameters())
    first = (0,) * weight.dim()
    with torch.no_grad():
        weight[first] += 1e-3
        try:
            assert key(Normalized(backbone.encoder, preprocessing)) != base
        finally:
            weight[first] -= 1e-3


class Branchy(torch.nn.Module):
    """A network torch.export cannot capture: which way it goes depends on the pixels."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.float()
        if images.sum() > 0:
            return images.mean((1, 2))
        return images.amax((1, 2))


def test_a_network_that_does_not_export_runs_with_pytorch_under_auto_with_one_line(
        tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO):
        compiled = AutoEngine(tmp_path, "backbone.engine").compile(Branchy(), (8, 8, 3), CPU,
                                                                  "branchy")
    assert compiled.engine == "torch"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("branchy does not export to ONNX or load in ONNX "
                                          "Runtime (TorchExportError: ")
    assert record.getMessage().endswith("; running it with PyTorch instead")
    assert "\x1b" not in record.getMessage()
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""  # the exporter's printout went to the debug log
    pixels = torch.full((2, 8, 8, 3), 7, dtype=torch.uint8)
    np.testing.assert_array_equal(compiled(pixels), np.full((2, 3), 7, np.float32))
    assert not list(tmp_path.glob("*.onnx"))


def test_a_network_that_does_not_export_is_an_error_when_onnxruntime_is_asked_for(tmp_path):
    engine = engine_named("onnxruntime", tmp_path, "backbone.engine")
    with pytest.raises(PipelineError, match=r"^backbone.engine: branchy does not export to "
                                            r"ONNX or load in ONNX Runtime \(TorchExportError: "
                                            r".*\); use auto or torch$"):
        engine.compile(Branchy(), (8, 8, 3), CPU, "branchy")


def test_auto_runs_pytorch_with_one_line_where_onnxruntime_is_missing(backbone, photos, tmp_path,
                                                                     no_onnxruntime, caplog):
    with caplog.at_level(logging.INFO):
        encoder = compile_encoder(backbone, engine_named("auto", tmp_path, "backbone.engine"),
                                  CPU)
    assert encoder.engine == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "backbone.engine auto: torch (not onnxruntime: onnxruntime is not installed (import of "
        "onnxruntime halted; None in sys.modules); install the project again: python -m pip "
        "install -e .)"]
    assert not list(tmp_path.iterdir())


def test_onnxruntime_asked_for_where_it_is_missing_is_one_error(backbone, tmp_path,
                                                                no_onnxruntime):
    with pytest.raises(PipelineError, match=r"^--engine: onnxruntime cannot run here: "
                                            r"onnxruntime is not installed .*; use auto or "
                                            r"torch$"):
        compile_encoder(backbone, engine_named("onnxruntime", tmp_path, "--engine"), CPU)


def test_auto_is_onnx_runtime_on_cpu_in_float32_and_pytorch_on_a_gpu_or_in_bfloat16(tmp_path):
    auto = AutoEngine(tmp_path)
    assert isinstance(auto.choose(CPU), OnnxRuntimeEngine)
    assert isinstance(auto.choose(Runtime(torch.device("cpu"), "bfloat16")), TorchEngine)
    assert isinstance(auto.choose(Runtime(torch.device("cuda"), "float16")), TorchEngine)
    assert isinstance(auto.choose(Runtime(torch.device("cuda"), "float32")), TorchEngine)


def test_the_params_vocabulary_is_auto_and_the_registry():
    assert ("auto", *ENGINES) == params.ENGINES
    assert params.BackboneParams().engine == "auto"


def test_a_graph_onnx_runtime_cannot_load_runs_with_pytorch_under_auto(tmp_path, monkeypatch,
                                                                      caplog):
    monkeypatch.setattr(engines, "cached_graph", lambda *args: b"not an ONNX graph")
    with caplog.at_level(logging.WARNING):
        compiled = AutoEngine(tmp_path).compile(Branchy(), (8, 8, 3), CPU, "branchy")
    assert compiled.engine == "torch"
    [record] = caplog.records
    assert record.getMessage().startswith("branchy does not export to ONNX or load in ONNX "
                                          "Runtime (")
