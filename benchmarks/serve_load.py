"""Load test of ``python -m stages.serve``: requests/s and latency for single-image requests.

Starts one server per ``--server`` (serve's options, e.g. ``"--model head"`` or
``"--exported models/export/classifier.onnx"``) on free ports of 127.0.0.1 in ``--project``
(a folder where the pipeline has run), sends one-photo ``POST /predict`` requests for
``--seconds``, and stops them; nothing leaves this machine. With one client the requests
alternate between the servers, one at a time, so their figures are measured under the same
load (a busy machine's drift cancels in their ratio); with several clients each server is
loaded alone, in turn.

    python -m benchmarks.serve_load --project . --images ../shared/data/monkeys10/validation \\
        --server "--model head" --server "--exported models/export/classifier.onnx"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def start_server(project: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """The server in ``project`` on a free loopback port, and its address once it serves."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(repo), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", *extra],
                               cwd=project, env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stderr:
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1)
        print(line, end="", file=sys.stderr)
    raise SystemExit("the server stopped before it served")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field named ``file``, and its content type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return body + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def load(addresses: list[str], bodies: list[tuple[bytes, str]], clients: int,
         seconds: float) -> list[dict[str, float]]:
    """``clients`` threads posting the bodies round-robin, request ``k`` of each to server
    ``k % len(addresses)``, until ``seconds`` have passed; per server, its figures."""
    latencies: list[list[float]] = [[] for _ in addresses]
    errors = [0] * len(addresses)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            server = k % len(addresses)
            body, kind = bodies[(offset + k * clients) % len(bodies)]
            request = urllib.request.Request(addresses[server] + "predict", data=body,
                                             headers={"Content-Type": kind})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    json.load(response)
                ok = True
            except OSError:
                ok = False
            took = time.perf_counter() - started
            with lock:
                if ok:
                    latencies[server].append(took)
                else:
                    errors[server] += 1
            k += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = []
    for taken, failed in zip(latencies, errors, strict=True):
        ms = np.array(taken) * 1000
        rows.append({"clients": clients, "requests": len(taken), "errors": failed,
                     # Little's law: requests in flight over time per request
                     "requests_per_s": clients * len(taken) / max(sum(taken), 1e-9),
                     "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                     "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos")
    parser.add_argument("--server", action="append", metavar="OPTIONS",
                        help="serve's options for one server (repeat to compare; default: "
                             "the pipeline's model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-images", type=int, default=200)
    args = parser.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:args.max_images]
    if not files:
        raise SystemExit(f"no photos under {args.images}")
    bodies = [multipart(p.name, p.read_bytes()) for p in files]
    configs = args.server or [""]
    servers = [start_server(args.project, config.split()) for config in configs]
    addresses = [address for _, address in servers]
    results: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    try:
        load(addresses, bodies[:5], 1, 2.0)  # warm the caches and the thread pools
        for clients in args.concurrency:
            if clients == 1:
                for config, row in zip(configs, load(addresses, bodies, 1, args.seconds),
                                       strict=True):
                    results[config].append(row)
            else:
                for config, address in zip(configs, addresses, strict=True):
                    results[config] += load([address], bodies, clients, args.seconds)
    finally:
        for process, _ in servers:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
    sizes = [len(b) for b, _ in bodies]
    print(f"{len(files)} photos, median {np.median(sizes) / 1024:.0f} KiB")
    print("| server options | clients | requests | errors | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for config, rows in results.items():
        for row in rows:
            print(f"| {config or '(defaults)'} | {row['clients']} | {row['requests']} | "
                  f"{row['errors']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.0f} | "
                  f"{row['p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
