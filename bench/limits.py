"""What one request costs at each limit: peak memory of the serving worker, and time held.

For each limit it starts a fresh backend (``abn serve``, real gunicorn, one worker, an
untrained ABN-ResNet18 at 224 px) against a local HTTP server playing Label Studio, sends one
request, and samples the worker's resident memory every few milliseconds while the request
runs. A fresh process per row keeps one row's freed-but-kept heap out of the next row's
figure. Each row prints the peak growth over the worker's memory just before the request, and
its ratio to the baseline row of its group (an ordinary request of the same kind, measured in
the same run):

- brush: a webhook with a 256x256 brush (baseline), one at ``ABN_BRUSH_MAX_PIXELS`` (8000x8000)
  and one over it (16384x16384, refused with a 413 before decoding);
- image: a /predict of one 224x224 PNG (baseline), of one 8000x8000 PNG (at
  ``ABN_IMAGE_MAX_PIXELS``), and of eight of them;
- tasks: a /predict of one task without an image (baseline), of ``ABN_MAX_TASKS_PER_REQUEST``
  such tasks, and of one more (refused with a 413);
- trickle: a /predict whose image host sends one byte a second, with ``ABN_IMAGE_TIMEOUT=3``:
  how long the request is held beyond that deadline (target: under 1 s).

Run: ``.venv/bin/python bench/limits.py`` (about 3 minutes on two cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
from harness import free_port, wait_healthy  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from backend.brush import encode_rle  # noqa: E402
from backend.label_config import label_config_for  # noqa: E402
from backend.settings import Settings  # noqa: E402
from model import build_abn, save_checkpoint  # noqa: E402
from model.checkpoint import make_meta  # noqa: E402

TOKEN = "bench-token"
CLASSES = [f"class_{i}" for i in range(10)]
CONFIG = label_config_for(CLASSES)
MB = 1024 * 1024


def png(width: int, height: int) -> bytes:
    """A mostly flat PNG (small file, full pixel count), as a scanned page would be."""
    img = Image.new("L", (width, height), 200)
    draw = ImageDraw.Draw(img)
    for x in range(0, width, max(1, width // 16)):
        draw.line([(x, 0), (x, height - 1)], fill=20, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@contextmanager
def fake_label_studio(files: dict[str, bytes]) -> Iterator[str]:
    """Label Studio's file endpoint (token checked) plus ``/data/upload/1/trickle.png``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.endswith("/trickle.png"):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(60):  # bounded: a minute at most
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        time.sleep(1.0)
                except OSError:
                    pass
                self.close_connection = True
                return
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            with suppress(OSError):
                self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def backend(checkpoint: Path, ls_url: str, work: Path, **env: str) -> Iterator[tuple[str, int]]:
    """A fresh ``abn serve`` with one worker: its URL and the worker's pid."""
    port = free_port()
    model_dir = Path(tempfile.mkdtemp(dir=work, prefix="model_dir-"))
    environment = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "ABN_IMAGE_CACHE": "0",
        **env,
    }
    for name in ("REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PROMETHEUS_MULTIPROC_DIR"):
        environment.pop(name, None)
    log = (work / "serve.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backend",
            "serve",
            "--port",
            str(port),
            "--checkpoint",
            str(checkpoint),
        ],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 300, work / "serve.log")
        [worker] = psutil.Process(proc.pid).children()
        yield base, worker.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Measured:
    status: int
    peak_mb: float  # growth of the worker's RSS over its level before the request
    seconds: float


def measure(pid: int, send: Any) -> Measured:
    """Run `send()` while sampling process `pid`'s RSS; the peak growth and the time."""
    process = psutil.Process(pid)
    time.sleep(0.5)
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        status = send()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    return Measured(status, (peak - before) / MB, seconds)


def webhook(alpha_size: tuple[int, int]) -> dict[str, Any]:
    width, height = alpha_size
    if width * height <= Settings().brush_max_pixels:
        alpha = np.zeros((height, width), dtype=np.uint8)
        alpha[height // 4 : height // 2, width // 4 : width // 2] = 255
        rle = encode_rle(alpha)
    else:  # over the limit: a valid-looking RLE header is enough, it is refused before decoding
        rle = encode_rle(np.zeros((256, 256), dtype=np.uint8))
    result = {
        "id": "att",
        "from_name": "attention",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "prediction-changed",
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": rle, "brushlabels": ["Attention"]},
    }
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "result": [result], "updated_at": "2026-12-01T00:00:00Z"},
        "task": {"id": 1, "data": {"image": "/data/upload/1/small.png"}},
        "project": {"id": 1, "label_config": CONFIG},
    }


def predict_body(images: list[str | None]) -> dict[str, Any]:
    tasks = [
        {"id": i + 1, "data": {} if name is None else {"image": f"/data/upload/1/{name}"}}
        for i, name in enumerate(images)
    ]
    return {"tasks": tasks, "label_config": CONFIG, "project": "1"}


def run(args: argparse.Namespace) -> None:
    limits = Settings()
    side = int(limits.image_max_pixels**0.5)  # 8000 at the default
    files = {"/data/upload/1/small.png": png(224, 224), "/data/upload/1/big.png": png(side, side)}
    for i in range(8):
        files[f"/data/upload/1/big{i}.png"] = files["/data/upload/1/big.png"]
    with tempfile.TemporaryDirectory(prefix="abn-bench-limits-") as tmp:
        work = Path(tmp)
        checkpoint = save_checkpoint(
            work / "abn.pt",
            build_abn("resnet18", len(CLASSES)),
            make_meta("abn", "resnet18", CLASSES, image_size=224),
        )
        brush_side = int(limits.brush_max_pixels**0.5)
        groups: dict[str, list[tuple[str, dict[str, Any], str]]] = {
            "brush": [
                ("256x256 brush (baseline)", webhook((256, 256)), "/webhook"),
                (
                    f"{brush_side}x{brush_side} brush (at the limit)",
                    webhook((brush_side,) * 2),
                    "/webhook",
                ),
                ("16384x16384 brush (over: 413)", webhook((16384, 16384)), "/webhook"),
            ],
            "image": [
                ("one 224x224 PNG (baseline)", predict_body(["small.png"]), "/predict"),
                (f"one {side}x{side} PNG (at the limit)", predict_body(["big.png"]), "/predict"),
                (
                    f"eight {side}x{side} PNGs",
                    predict_body([f"big{i}.png" for i in range(8)]),
                    "/predict",
                ),
            ],
            "tasks": [
                ("1 task (baseline)", predict_body([None]), "/predict"),
                (
                    f"{limits.max_tasks_per_request} tasks (at the limit)",
                    predict_body([None] * limits.max_tasks_per_request),
                    "/predict",
                ),
                (
                    f"{limits.max_tasks_per_request + 1} tasks (over: 413)",
                    predict_body([None] * (limits.max_tasks_per_request + 1)),
                    "/predict",
                ),
            ],
        }
        with fake_label_studio(files) as ls_url:
            print(f"{'request':<40} {'status':>6} {'peak MB':>9} {'x base':>7} {'seconds':>8}")
            for group, rows in groups.items():
                print(f"-- {group}")
                baseline: float | None = None
                for label, body, path in rows:
                    data = json.dumps(body).encode()
                    with backend(checkpoint, ls_url, work) as (base, pid):
                        result = measure(
                            pid,
                            lambda base=base, path=path, data=data: (
                                requests.post(
                                    base + path,
                                    data=data,
                                    headers={"Content-Type": "application/json"},
                                    timeout=600,
                                ).status_code
                            ),
                        )
                    baseline = baseline if baseline is not None else max(result.peak_mb, 1.0)
                    ratio = result.peak_mb / baseline
                    print(
                        f"{label:<40} {result.status:>6} {result.peak_mb:>9.1f} "
                        f"{ratio:>6.1f}x {result.seconds:>8.2f}",
                        flush=True,
                    )
            timeout = args.trickle_timeout
            with backend(checkpoint, ls_url, work, ABN_IMAGE_TIMEOUT=str(timeout)) as (base, pid):
                body = json.dumps(predict_body(["trickle.png"])).encode()
                result = measure(
                    pid,
                    lambda: (
                        requests.post(
                            base + "/predict",
                            data=body,
                            headers={"Content-Type": "application/json"},
                            timeout=600,
                        ).status_code
                    ),
                )
            print(
                f"\ntrickling host (1 byte/s), ABN_IMAGE_TIMEOUT={timeout}: request held "
                f"{result.seconds:.2f} s, {result.seconds - timeout:+.2f} s past the deadline "
                f"(target: under +1 s; before the fix it was held until the image ended)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trickle-timeout", type=float, default=3.0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
