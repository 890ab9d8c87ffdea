"""A small HTTP service over a trained or exported model: ``POST /predict`` with images as
multipart fields named ``file``, ``GET /health``, and a page at ``/`` to try it in a browser.

Built on Flask (served by waitress, see ``stages.serve``). Every request is bounded: its size,
the files in it, and the pixels of each image; a bad request gets a 4xx with a JSON
``{"error": ...}`` naming the file and what would be accepted, never a 500.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np
from flask import Flask, Response, jsonify, request
from PIL import Image
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from transfer.data import open_image
from transfer.prediction import Prediction, classify, decode_for
from transfer.predictor import FamiliarityCheck, Predictor

log = logging.getLogger(__name__)

FIELD = "file"  # the multipart field name of each image


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_request_bytes: int = 20 * 2**20
    max_files: int = 16
    max_pixels: int = 50_000_000  # per image: width x height


class BadImage(Exception):
    """An uploaded file that is not served, with the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def read_upload(predictor: Predictor, name: str, data: bytes, max_pixels: int) -> np.ndarray:
    """The pixels of one uploaded file, ready for ``predictor``; ``BadImage`` (400 for what
    is not an image, 413 for one with too many pixels) otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata
            with open_image(data) as image:  # reads the header only
                width, height = image.size
    except Image.DecompressionBombError:  # over twice Pillow's own limit: it will not say
        raise BadImage(f"{name}: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.3g} megapixels, more "
                       f"than this server's limit of {max_pixels / 1e6:g} megapixels",
                       413) from None
    except Exception:  # what is not an image is refused below, with the decoder's reason
        width = height = 0
    if width * height > max_pixels:
        raise BadImage(f"{name}: {width} x {height} pixels, more than this server's limit of "
                       f"{max_pixels / 1e6:g} megapixels", 413)
    try:
        return decode_for(predictor, data)
    except ValueError as err:
        raise BadImage(f"{name}: {err}") from err


def create_app(predictor: Predictor, familiarity: FamiliarityCheck | None = None, *,
               top_k: int = 3, min_confidence: float = 0.0, batch_size: int = 8,
               limits: Limits = Limits()) -> Flask:
    """The service over ``predictor``: its routes, limits and error pages."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=limits.max_request_bytes,
                      MAX_FORM_PARTS=limits.max_files + 8)
    page = resources.files("transfer").joinpath("serve_page.html").read_text(encoding="utf-8")
    # One prediction at a time: the model is compiled on first use and its runtime uses every
    # core for one batch already; uploads are read and decoded in parallel, outside the lock.
    model_lock = threading.Lock()

    @app.get("/")
    def index() -> Response:
        return Response(page, mimetype="text/html")

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", "model": predictor.name, "classes": predictor.classes,
                        "top_k": min(top_k, len(predictor.classes)),
                        "min_confidence": min_confidence,
                        "checks_unfamiliar": familiarity is not None,
                        "limits": {"max_request_bytes": limits.max_request_bytes,
                                   "max_files": limits.max_files,
                                   "max_pixels": limits.max_pixels}})

    @app.post("/predict")
    def predict() -> tuple[Response, int] | Response:
        if FIELD in request.form:
            return _error(f"field '{FIELD}' holds text, not a file: send each image as a "
                          "file upload (curl -F file=@photo.jpg)", 400)
        unexpected = sorted(set(request.files) - {FIELD}) + sorted(request.form)
        if unexpected:
            return _error(f"unexpected field '{unexpected[0]}': send each image as a "
                          f"multipart/form-data file field named '{FIELD}'", 400)
        uploads = request.files.getlist(FIELD)
        if not uploads:
            return _error(f"no image: send one or more multipart/form-data file fields "
                          f"named '{FIELD}'", 400)
        if len(uploads) > limits.max_files:
            return _error(f"{len(uploads)} files in one request; at most {limits.max_files}",
                          413)
        results = [Prediction(upload.filename or f"{FIELD}{i + 1}")
                   for i, upload in enumerate(uploads)]
        read, images, refused = [], [], []
        for result, upload in zip(results, uploads, strict=True):
            try:
                images.append(read_upload(predictor, result.path, upload.read(),
                                          limits.max_pixels))
                read.append(result)
            except BadImage as err:  # the other files are still classified
                result.error = str(err)
                refused.append(err)
        if not read:  # nothing to classify: the first file's reason, with its status
            return _error(str(refused[0]), refused[0].status)
        with model_lock:
            classify(predictor, read, images, top_k, batch_size, min_confidence, familiarity)
        # As predict --format json gives them, ``file`` for ``path``.
        return jsonify([{"file": result.path, **result.answer(),
                         "error": result.error or None} for result in results])

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> tuple[Response, int]:
        if isinstance(err, RequestEntityTooLarge):
            return _error(f"request larger than this server's limit of "
                          f"{limits.max_request_bytes / 2**20:g} MiB (or more than "
                          f"{limits.max_files} files)", 413)
        return _error(f"{err.name}: {err.description}", err.code or 500)

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception) -> tuple[Response, int]:
        log.exception("request failed")
        return _error(f"the server failed on this request ({type(err).__name__}); see its log",
                      500)

    return app


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def warm_up(predictor: Predictor) -> None:
    """Run the model once, so that the first request does not pay for compiling it."""
    size = max(predictor.short_side, 1)
    blank = np.full((size, size, 3), 127, dtype=np.uint8)
    for _ in predictor.predict_proba([blank], 1):
        pass
