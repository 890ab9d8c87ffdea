import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import one_error_line, run_stage_cli, stage_environment, write_image
from transfer.exported import load_exported
from transfer.inference import familiarity_check, load_classifier
from transfer.layout import EMBEDDINGS_DIR, FAMILIARITY, HEAD_PATH
from transfer.serving import Limits, create_app


@pytest.fixture
def client(trained):
    classifier = load_classifier(EMBEDDINGS_DIR, HEAD_PATH)
    app = create_app(classifier, familiarity_check(classifier, FAMILIARITY, EMBEDDINGS_DIR,
                                                   HEAD_PATH),
                     top_k=2, limits=Limits(max_request_bytes=2**20, max_files=3,
                                            max_pixels=1_000_000))
    return app.test_client()


def _upload(*paths: Path, field: str = "file") -> dict:
    return {field: [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}


def test_health_describes_the_model(client):
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["model"] == "head"
    assert health["classes"] == ["blue", "green", "red"] and health["top_k"] == 2
    assert health["checks_unfamiliar"] is False  # the audit has not run in this project


def test_several_images_get_one_entry_each_in_order(client, trained):
    response = client.post("/predict", data=_upload(trained / "inputs" / "a-red.png",
                                                    trained / "inputs" / "more" / "c-blue"))
    assert response.status_code == 200
    entries = response.get_json()
    assert [e["file"] for e in entries] == ["a-red.png", "c-blue"]
    assert [e["prediction"] for e in entries] == ["red", "blue"]
    assert all(len(e["predictions"]) == 2 and e["uncertain"] is False for e in entries)
    probabilities = [p["probability"] for p in entries[0]["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 0.5


def test_a_bad_file_among_good_ones_gets_its_error_and_the_others_their_classes(client,
                                                                               trained):
    response = client.post("/predict", data={"file": [
        (io.BytesIO((trained / "inputs" / "a-red.png").read_bytes()), "a-red.png"),
        (io.BytesIO(b"plain text"), "notes.txt"),
        (io.BytesIO((trained / "inputs" / "more" / "c-blue").read_bytes()), "c-blue")]})
    assert response.status_code == 200
    red, notes, blue = response.get_json()
    assert (red["prediction"], red["error"]) == ("red", None)
    assert (blue["prediction"], blue["error"]) == ("blue", None)
    assert notes["file"] == "notes.txt" and notes["prediction"] is None
    assert notes["predictions"] == []
    assert notes["error"].startswith("notes.txt: not an image (content not recognised as")


def test_the_answers_are_the_predict_commands(client, trained, capsys):
    from stages import predict

    # The same engine as the served classifier (PyTorch), so the same numbers.
    predict.main(["inputs/more/b-green.jpg", "--format", "json", "--top-k", "2", "--engine",
                  "torch"])
    [expected] = json.loads(capsys.readouterr().out)
    [served] = client.post("/predict", data=_upload(trained / "inputs" / "more" / "b-green.jpg"),
                           ).get_json()
    assert served["predictions"] == expected["predictions"]
    assert served["prediction"] == expected["prediction"] == "green"


@pytest.mark.parametrize(("data", "status", "message"), [
    ({"file": [(io.BytesIO(b"plain text"), "notes.txt")]}, 400,
     "notes.txt: not an image (content not recognised as JPEG, PNG, WebP, GIF, BMP, TIFF, "
     "PNM or AVIF)"),
    ({"file": [(io.BytesIO(b""), "empty.png")]}, 400, "empty.png: empty file"),
    ({"photo": [(io.BytesIO(b"x"), "a.png")]}, 400,
     "unexpected field 'photo': send each image as a multipart/form-data file field named "
     "'file'"),
    ({"comment": "hello"}, 400, "unexpected field 'comment'"),
    ({}, 400, "no image: send one or more multipart/form-data file fields named 'file'"),
    ({"file": [(io.BytesIO(b"x"), f"{i}.png") for i in range(4)]}, 413,
     "4 files in one request; at most 3"),
    ({"file": [(io.BytesIO(bytes(2**20 + 1)), "big.png")]}, 413,
     "request larger than this server's limit of 1 MiB"),
])
def test_bad_requests_get_a_4xx_with_a_clear_message(client, data, status, message):
    # Where no file can be classified; a bad file among good ones is an entry of its own.
    response = client.post("/predict", data=data)
    assert response.status_code == status
    assert response.get_json()["error"].startswith(message)


def test_a_truncated_photo_and_a_text_field_named_file_are_400(client, trained):
    cut = (trained / "inputs" / "more" / "b-green.jpg").read_bytes()[:300]
    response = client.post("/predict", data={"file": [(io.BytesIO(cut), "cut.jpg")]})
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("cut.jpg: truncated or corrupt image")
    response = client.post("/predict", data={"file": "photo.jpg"})
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("field 'file' holds text, not a file")


def test_an_image_with_too_many_pixels_is_refused_before_it_is_decoded(client, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (2000, 600)).save(path)  # a small file, 1.2 megapixels
    response = client.post("/predict", data=_upload(path))
    assert response.status_code == 413
    assert response.get_json()["error"] == ("wide.png: 2000 x 600 pixels, more than this "
                                            "server's limit of 1 megapixels")


def test_an_image_pillow_calls_a_decompression_bomb_is_too_large_too(client, tmp_path,
                                                                     monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (2000, 600)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 2000 x 600 is over twice that
    response = client.post("/predict", data=_upload(path))
    assert response.status_code == 413
    assert response.get_json()["error"] == ("bomb.png: over 0.4 megapixels, more than this "
                                            "server's limit of 1 megapixels")


def test_unknown_routes_and_methods_are_json_errors(client):
    assert client.get("/nothing").status_code == 404
    response = client.get("/predict")
    assert response.status_code == 405 and "error" in response.get_json()


def test_the_page_posts_file_fields_to_predict(client):
    page = client.get("/").get_data(as_text=True)
    assert '<input id="files" type="file" name="file"' in page
    assert 'form.append("file", file, file.name)' in page
    assert 'fetch("predict", { method: "POST", body: form })' in page


def test_an_exported_file_is_served_alike(trained, client):
    from stages import export

    export.main(["--output", "model.onnx"])
    exported = create_app(load_exported(trained / "model.onnx"), top_k=2).test_client()
    assert exported.get("/health").get_json()["model"] == "exported"
    upload = trained / "inputs" / "a-red.png"
    [served] = exported.post("/predict", data=_upload(upload)).get_json()
    [reference] = client.post("/predict", data=_upload(upload)).get_json()
    assert served["prediction"] == reference["prediction"] == "red"
    assert served["unfamiliar"] is None
    assert np.allclose([p["probability"] for p in served["predictions"]],
                       [p["probability"] for p in reference["predictions"]], atol=1e-4)


def _start(cwd: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``python -m stages.serve --port 0 ARGS`` in ``cwd``, and its address once it serves."""
    process = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", *args],
                               cwd=cwd, env=stage_environment(), stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining
            return process, found.group(1)
    process.kill()
    raise AssertionError("the server never said where it listens:\n" + "".join(lines))


def test_the_command_serves_on_loopback_and_stops_on_ctrl_c(trained):
    process, address = _start(trained)
    try:
        with urllib.request.urlopen(address + "health", timeout=30) as response:
            assert json.load(response)["classes"] == ["blue", "green", "red"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0


def test_bad_serve_options_are_one_error_line(trained):
    line = one_error_line(run_stage_cli("serve", trained, "--port", "70000"), code=2)
    assert "--port must be from 0 to 65535" in line
    line = one_error_line(run_stage_cli("serve", trained, "--exported", "missing.onnx"))
    assert "missing.onnx: no such file" in line


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no headless browser: install Debian's chromium and chromium-driver "
                           "(apt-get install chromium chromium-driver), as .ci/run does")
def test_a_browser_uploads_a_photo_on_the_page_and_sees_its_class(trained, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = write_image(tmp_path / "upload" / "strawberry.jpg", (215, 30, 35), (320, 240),
                        fmt="JPEG", seed=7)
    process, address = _start(trained)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options,
                               service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.get(address)
        WebDriverWait(browser, 30).until(
            lambda b: "3 classes" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(str(photo))
        answer = WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".result .answer"))[0]
        assert answer.get_attribute("data-prediction") == "red"
        assert answer.text.startswith("strawberry.jpg: red")
        rows = browser.find_elements(By.CSS_SELECTOR, ".result .row")
        assert rows[0].text.startswith("red") and rows[0].text.endswith("%")
    finally:
        browser.quit()
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
