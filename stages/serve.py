"""Serve the trained model over HTTP: ``python -m stages.serve [--port 8000] [options]``.

``POST /predict`` takes one or several images as multipart form fields named ``file`` and
answers JSON, one entry per file: ``file``, ``prediction``, the top-k ``predictions`` with
calibrated probabilities, and the ``uncertain``/``unfamiliar`` flags. ``GET /health`` describes
the model; ``/`` is a page to drop images on. Serves the pipeline's model (``--model``), or an
exported file (``--exported models/export/classifier.onnx``) that needs nothing else. Bound to
127.0.0.1 unless ``--host`` says otherwise; request sizes are bounded.

    curl -F file=@photo.jpg http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import ipaddress
import logging

from stages.predict import add_model_arguments, open_model
from transfer.errors import ArgumentParser, PipelineError, run_stage

log = logging.getLogger(__name__)

MAX_THREADS = 64


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--threads", type=int, default=4,
                        help="requests read and decoded at once (default 4)")
    parser.add_argument("--max-request-mb", type=float, default=20.0,
                        help="largest request body in MiB (default 20)")
    parser.add_argument("--max-files", type=int, default=16,
                        help="most images in one request (default 16)")
    parser.add_argument("--max-megapixels", type=float, default=50.0,
                        help="largest image, width x height in millions (default 50)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be from 1 to {MAX_THREADS}")
    if not 0 < args.max_request_mb <= 1024 or not 1 <= args.max_files <= 1000 or \
            not 0 < args.max_megapixels <= 1000:
        parser.error("limits: --max-request-mb from 0 to 1024, --max-files from 1 to 1000, "
                     "--max-megapixels from 0 to 1000")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    from waitress import create_server

    from transfer.serving import Limits, create_app, warm_up

    predictor, familiarity = open_model(parser, args)
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20),
                    max_files=args.max_files, max_pixels=int(args.max_megapixels * 1e6))
    app = create_app(predictor, familiarity, top_k=args.top_k,
                     min_confidence=args.min_confidence, batch_size=args.batch_size,
                     limits=limits)
    try:
        # Twice the app's limit: the app refuses what is over its own with a JSON message;
        # waitress refuses (in plain text) what is far over, before buffering it.
        server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                               max_request_body_size=2 * limits.max_request_bytes,
                               ident="transfer-pipeline")
    except OSError as err:
        raise PipelineError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); "
                            "choose another --port") from err
    warm_up(predictor)
    if not loopback:
        log.warning("listening on %s: reachable from other machines, with no authentication",
                    args.host)
    log.info("serving the %s model (%d classes) on http://%s:%s/ (Ctrl-C stops)",
             predictor.name, len(predictor.classes), args.host, server.effective_port)
    try:
        server.run()
    except KeyboardInterrupt:  # the way to stop a server: not a failure
        log.info("stopped")
    finally:
        server.close()


if __name__ == "__main__":
    run_stage(main)
