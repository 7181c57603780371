"""Benchmark /predict over real HTTP against the bare model, plus batching and the brush codec.

What it measures, on CPU, with an untrained ABN-ResNet18 (10 classes, 224 px; weights do not
change the cost):

1. latency of ``POST /predict`` for one 224x224 task over a real socket (p50, p95), as a ratio
   to the bare forward pass of the same, already preprocessed image in the same process. Each
   task names a new URL, so every request downloads its image from a local HTTP server acting
   as Label Studio (token checked): the cost Label Studio really causes, cache not involved.
   The two are measured alternately, so load from other processes hits both alike.
   Target: ratio at most 1.3x.
2. throughput of one /predict with 32 tasks against 32 single-task calls;
3. the brush codec rows of ``bench/codec.py`` (ours vs the SDK vs label-studio-brush-rle-rs).

Run: ``.venv/bin/python bench/predict.py [--requests 30] [--server thread|gunicorn]``
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Before torch loads OpenMP: with the default (active) policy, idle OpenMP workers spin, and on
# a shared or oversubscribed CPU a forward pass measured 25x slower (1.2 s instead of 49 ms).
# Deployments should set it too (README); set OMP_WAIT_POLICY=ACTIVE to measure without it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from harness import free_port, wait_healthy  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.label_config import label_config_for  # noqa: E402
from backend.serving import ServedModel  # noqa: E402
from backend.settings import Settings  # noqa: E402
from model import build_abn, save_checkpoint  # noqa: E402
from model.checkpoint import make_meta  # noqa: E402

TOKEN = "bench-token"
CLASSES = [f"class_{i}" for i in range(10)]


def test_image(size: int) -> bytes:
    """A photo-like JPEG (gradients, a disc, sensor noise; quality 90), `size` x `size`.

    JPEG because that is what most uploads are; the noise keeps it from compressing to
    nothing, so download and decode cost what they cost for a photo (~20 KB at 224 px).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([xx, yy, 0.5 * disc + 0.3 * (1 - xx)], axis=-1) * 255
    rgb += np.random.default_rng(0).normal(0, 8, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def fake_label_studio(image: bytes) -> Iterator[str]:
    """Serves `image` at any /data/upload/... path, to requests carrying the token."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == f"Token {TOKEN}"
            ok = ok and self.path.startswith("/data/upload/")
            body = image if ok else b"no"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    nodelay(server.socket)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def nodelay(sock: socket.socket) -> None:
    """Turn Nagle off on a listening socket (accepted ones inherit it), as gunicorn does.

    Python's http.server writes headers and body separately; with Nagle on, the body of the
    second response on a kept-alive connection waits for the client's delayed ACK (~40 ms),
    which would measure the test server, not the backend.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def backend(kind: str, settings: Settings, served: ServedModel) -> Iterator[str]:
    """The backend on a real socket: a thread of this process, or gunicorn in a subprocess."""
    if kind == "thread":
        server = make_server("127.0.0.1", 0, create_app(settings, served=served), threaded=True)
        nodelay(server.socket)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
        return
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(settings.model_dir),
        "LABEL_STUDIO_URL": settings.label_studio_url or "",
        "LABEL_STUDIO_API_KEY": settings.label_studio_api_key or "",
        "ABN_BATCH_SIZE": str(settings.batch_size),
        "ABN_IMAGE_CACHE": "0",
    }
    ckpt = str(settings.checkpoint)
    code = f"from backend.server import serve; serve('127.0.0.1', {port}, {ckpt!r}, 1)"
    log_path = Path(settings.model_dir) / "gunicorn.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log_file, stderr=log_file
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 120, log_path)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()


def stage_sums(http: requests.Session, url: str) -> dict[str, float]:
    """Seconds spent so far per /predict stage, from the backend's own /metrics."""
    text = http.get(f"{url}/metrics", timeout=10).text
    sums = {}
    for family in text_string_to_metric_families(text):
        if family.name == "abn_predict_stage_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    sums[sample.labels["stage"]] = sample.value
    return sums


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank on the sorted sample, interpolated)."""
    return float(np.percentile(np.asarray(values), q))


def run(args: argparse.Namespace) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines
    torch.manual_seed(0)
    photo = test_image(args.image_size)
    config = label_config_for(CLASSES)
    with tempfile.TemporaryDirectory(prefix="abn-bench-") as tmp, fake_label_studio(photo) as ls:
        ckpt = Path(tmp) / "abn.pt"
        meta = make_meta("abn", "resnet18", CLASSES, image_size=args.image_size)
        save_checkpoint(ckpt, build_abn("resnet18", len(CLASSES)), meta)
        settings = Settings(
            model_dir=Path(tmp),
            label_studio_url=ls,
            label_studio_api_key=TOKEN,
            checkpoint=ckpt,
            batch_size=args.server_batch,
            image_cache=False,
        )
        served = ServedModel.from_checkpoint(ckpt, batch_size=args.server_batch)
        model = served.snapshot.model  # in thread mode, the very model the server runs
        x = served.snapshot.transform(Image.open(io.BytesIO(photo)).convert("RGB"))[None]

        def bare() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                model(x)
            return time.perf_counter() - started

        def forward() -> float:
            # On the thread the served model runs its passes on: torch's OpenMP thread team
            # belongs to the calling thread, and two teams taking turns on two cores slow
            # each other down (the idle one spins), which would measure that, not the backend.
            return served.run_inference(bare)

        with backend(args.server, settings, served) as url, requests.Session() as http:
            counter = iter(range(10**9))

            def predict(n: int) -> float:
                tasks = [
                    {"id": i, "data": {"image": f"/data/upload/1/img-{next(counter)}.jpg"}}
                    for i in range(n)
                ]
                body = {"tasks": tasks, "project": "1.1", "label_config": config}
                started = time.perf_counter()
                reply = http.post(f"{url}/predict", json=body, timeout=600)
                elapsed = time.perf_counter() - started
                reply.raise_for_status()
                results = reply.json()["results"]
                assert len(results) == n and all(r["result"] for r in results), "empty result"
                return elapsed

            for _ in range(args.warmup):
                forward()
                predict(1)
            bare_s, http_ms = [], []
            before = stage_sums(http, url)
            for _ in range(args.requests):
                bare_s.append(forward())
                http_ms.append(predict(1))
            after = stage_sums(http, url)

            print(
                f"/predict latency: one {args.image_size}x{args.image_size} task, ABN resnet18, "
                f"{len(CLASSES)} classes, CPU ({torch.get_num_threads()} torch threads, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
                f"{args.requests} requests after {args.warmup} warm-up, server: {args.server}"
            )
            print(f"{'':<28} {'p50 ms':>8} {'p95 ms':>8}")
            where = "same process" if args.server == "thread" else "bench process"
            rows = [(f"bare forward ({where})", bare_s), ("/predict over HTTP", http_ms)]
            for name, values in rows:
                print(f"{name:<28} {1000 * pct(values, 50):>8.1f} {1000 * pct(values, 95):>8.1f}")
            r50 = pct(http_ms, 50) / pct(bare_s, 50)
            r95 = pct(http_ms, 95) / pct(bare_s, 95)
            verdict = "meets" if r50 <= 1.3 else "MISSES"
            print(
                f"{'ratio /predict / forward':<28} {r50:>7.2f}x {r95:>7.2f}x   "
                f"({verdict} the 1.3x target at p50)"
            )
            overhead = [h - b for h, b in zip(http_ms, bare_s, strict=True)]
            print(
                f"backend overhead per task (paired difference): median "
                f"{1000 * statistics.median(overhead):.1f} ms"
            )
            stages = ", ".join(
                f"{stage} {1000 * (after[stage] - before.get(stage, 0.0)) / args.requests:.1f} ms"
                for stage in ("fetch", "model", "encode")
                if stage in after
            )
            print(f"server-side mean per request (from /metrics): {stages}")

            print()
            n = args.batch
            batched = [predict(n) for _ in range(args.throughput_repeats)]
            singles = [sum(predict(1) for _ in range(n)) for _ in range(args.throughput_repeats)]
            tb, ts = min(batched), min(singles)
            print(
                f"throughput: {n} tasks ({args.image_size}x{args.image_size}), "
                f"best of {args.throughput_repeats}; the backend runs them through the model "
                f"{args.server_batch} at a time (ABN_BATCH_SIZE)"
            )
            print(f"  one /predict with {n} tasks : {tb:7.2f} s  {n / tb:6.1f} tasks/s")
            print(f"  {n} single-task /predicts   : {ts:7.2f} s  {n / ts:6.1f} tasks/s")
            print(f"  batch speed-up             : {ts / tb:6.2f}x")

    if args.skip_codec:
        return
    print()
    try:
        from bench.codec import format_table, run_codec_benchmark
    except ImportError as exc:
        print(f"codec benchmark skipped: {exc}")
        return
    rows = run_codec_benchmark(args.codec_size, repeats=args.codec_repeats, sdk_repeats=2)
    print(f"brush RLE codec, {args.codec_size}x{args.codec_size} maps, median wall time in ms")
    print(format_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="timed single-task requests")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests first")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="tasks in the batched /predict")
    parser.add_argument(
        "--server-batch",
        type=int,
        default=Settings().batch_size,
        help="images per forward pass in the backend (ABN_BATCH_SIZE)",
    )
    parser.add_argument("--throughput-repeats", type=int, default=2)
    parser.add_argument("--server", choices=("thread", "gunicorn"), default="thread")
    parser.add_argument("--skip-codec", action="store_true")
    parser.add_argument("--codec-size", type=int, default=1024)
    parser.add_argument("--codec-repeats", type=int, default=5)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
