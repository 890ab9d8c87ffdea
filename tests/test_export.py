import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages import export
from stages.inference import load_classifier
from stages.predict import list_inputs


@pytest.fixture
def images_and_reference(trained):
    classifier = load_classifier(export.EMBEDDINGS_DIR, export.HEAD_PATH)
    files = [p for p in list_inputs(["inputs"]) if p.suffix != ".txt"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    reference = np.concatenate(list(classifier.predict_proba(images)))
    transform = classifier.backbone.preprocessing.eval_transform()
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    return batch, reference, classifier.classes


def test_torchscript_file_matches_the_pytorch_model(trained, images_and_reference):
    batch, reference, classes = images_and_reference
    export.main(["--format", "torchscript"])
    path = trained / "models" / "export" / "classifier.pt"
    extra = {"metadata.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    assert metadata["classes"] == classes
    assert metadata["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    with torch.inference_mode():
        probabilities = model(batch).numpy()
    assert np.abs(probabilities - reference).max() < 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["classifier.pt"]  # no temp left


def test_onnx_file_matches_the_pytorch_model(trained, images_and_reference):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    batch, reference, classes = images_and_reference
    export.main(["--format", "onnx", "--output", "exported/model.onnx"])
    path = trained / "exported" / "model.onnx"
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["metadata.json"])["classes"] == classes
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [probabilities] = session.run(None, {"images": batch.numpy()})
    assert np.abs(probabilities - reference).max() < 1e-4
