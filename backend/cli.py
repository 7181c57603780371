"""`abn`: the model library's commands plus the backend's (run, serve, worker, rollback, ...).

`abn run` is the main job on one machine: an embedded Redis when REDIS_URL is unset, one
training worker, and the backend; it stops all of them when it ends. It serves no model until a
project trains its own, unless given a shared one (``--checkpoint``, or ``--demo`` for the
decoy-digits demo).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend.redis_connection import EmbeddedRedis, die_with_parent
from backend.registry import ModelRegistry, all_versions
from backend.settings import Settings
from model import cli as model_cli
from model.checkpoint import read_checkpoint, save_checkpoint
from model.paper.decoy_digits import NAME as DECOY_DIGITS
from model.selection import STRATEGIES
from model.train import TrainConfig, train

log = logging.getLogger("abn")

# The demo model `abn run --demo` trains: small enough for a few minutes on a CPU.
DEMO_MODEL = {"epochs": 5, "image_size": 112, "batch_size": 32}


def demo_checkpoint(settings: Settings) -> Path:
    """Train the demo model on decoy-digits once; later starts reuse the file."""
    path = settings.layout.demo_checkpoint
    if path.is_file():
        return path
    data = model_cli.resolve_data(DECOY_DIGITS)
    log.info(
        "--demo: training an ABN-ResNet18 on %s (%s), a few minutes on a CPU",
        DECOY_DIGITS,
        ", ".join(f"{k}={v}" for k, v in DEMO_MODEL.items()),
    )
    model, meta = train(data, "resnet18", "abn", TrainConfig(**DEMO_MODEL))
    return save_checkpoint(path, model, meta)


def ensure_shared(settings: Settings, checkpoint: Path | None, demo: bool) -> dict | None:
    """The shared model's current version; a first start publishes `checkpoint` (or, with
    `demo`, the demo model). None: no shared model, every project trains its own."""
    registry = ModelRegistry(settings.model_dir)
    current = registry.current()
    if current is not None:
        if checkpoint is not None or demo:
            log.info("MODEL_DIR already serves %s; --checkpoint/--demo ignored", current["version"])
        return current
    source = checkpoint or (demo_checkpoint(settings) if demo else None)
    if source is None:
        return None
    record, _ = registry.publish_initial(source)
    log.info("published %s as %s", record.get("source", source), record["version"])
    return record


def cmd_run(args: argparse.Namespace) -> None:
    settings = serving_settings(args)
    current = ensure_shared(settings, args.checkpoint or settings.checkpoint, args.demo)
    env = {**os.environ, "MODEL_DIR": str(settings.model_dir.resolve())}
    embedded = EmbeddedRedis(die_with_parent=True) if not settings.redis_url else None
    # If `abn run` is killed (SIGKILL: no chance to stop them), its children get SIGTERM.
    tied = die_with_parent()
    with embedded or contextlib.nullcontext() as redis:
        if redis is not None:
            env["REDIS_URL"] = redis.url
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "backend", "worker"],
                env=env,
                preexec_fn=tied,
            ),
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "backend",
                    "serve",
                    "--host",
                    args.host,
                    "--port",
                    str(args.port),
                    "--workers",
                    str(args.workers),
                ],
                env=env,
                preexec_fn=tied,
            ),
        ]
        ready = ReadyBanner(args.host, args.port, current and current["version"], settings)
        try:
            _wait(children, ready, redis)
        finally:
            _stop(children)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class ReadyBanner:
    """How to connect Label Studio, then one ``READY <url>`` line, once the backend answers
    ``/health`` (gunicorn listens before its workers have loaded their models)."""

    def __init__(self, host: str, port: int, version: str | None, settings: Settings) -> None:
        shown = "localhost" if host in ("0.0.0.0", "::") else host
        self.url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
        self.version, self.settings = version, settings
        self.done = False

    def check(self) -> None:
        if self.done:
            return
        import requests

        auth = None
        if self.settings.auth_enabled:
            auth = (self.settings.basic_auth_user or "", self.settings.basic_auth_pass or "")
        try:
            answered = requests.get(f"{self.url}/health", auth=auth, timeout=5).status_code == 200
        except requests.RequestException:
            return  # not listening yet, or still loading
        if answered:
            self.done = True
            print_connection_help(self.url, self.version, self.settings)
            model = f"shared model {self.version}" if self.version else "no shared model"
            print(f"READY {self.url} ({model})", flush=True)


def _wait(
    children: list[subprocess.Popen], ready: ReadyBanner, redis: EmbeddedRedis | None = None
) -> None:
    """Until Ctrl-C, SIGTERM, or a child dies (then the others are stopped too); says READY
    once the backend answers, and restarts the embedded Redis whenever it exits (the backend
    reports it under ``degraded`` in /health and /status while it is down)."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, _interrupt)
    try:
        while all(c.poll() is None for c in children):
            ready.check()
            if redis is not None:
                redis.supervise()
            time.sleep(0.5)
        dead = [c for c in children if c.poll() is not None]
        log.error("%s exited with %s; stopping", dead[0].args[-1], dead[0].returncode)
    except KeyboardInterrupt:
        log.info("stopping")


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def print_connection_help(url: str, version: str | None, settings: Settings) -> None:
    auth = "on (BASIC_AUTH_USER)" if settings.auth_enabled else "off"
    model = f"shared model {version}" if version else "no shared model"
    config = (
        ".venv/bin/abn label-config   (the shared model's classes)"
        if version
        else ".venv/bin/abn label-config --classes cat,dog,...   (your classes)"
    )
    print(
        f"\nABN backend on {url}  ({model}, basic auth {auth})\n"
        "Connect a Label Studio project:\n"
        f"  1. Settings > Labeling Interface: paste the output of\n       {config}\n"
        f"  2. Settings > Model > Connect Model: URL {url}\n"
        "     (Label Studio must be started with ML_BLOCK_LOCAL_IP=false and\n"
        "      SSRF_PROTECTION_ENABLED=false to reach a backend on this machine)\n"
        "  3. A new project: pick the class of some tasks of each class, Submit, then\n"
        "     Settings > Model > Start Training: its first model trains in a few minutes.\n"
        "  4. Data Manager > Retrieve Predictions; edit the Attention brush where the model\n"
        "     looks at the wrong thing; Submit. Start Training again, or let corrections do it.\n"
        "See README.md, 'Quick start'. Ctrl-C stops everything.\n",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from backend.server import serve

    settings = serving_settings(args)
    serve(args.host, args.port, checkpoint=args.checkpoint, workers=args.workers, settings=settings)


def cmd_worker(args: argparse.Namespace) -> None:
    from redis.exceptions import RedisError

    from backend.jobs import QUEUE_NAME, TrainingWorker
    from backend.redis_connection import connect

    settings = Settings.from_env()
    # RQ logs "could not connect to Redis" every 2 s while Redis is away; once a minute is enough.
    logging.getLogger("rq.worker").addFilter(RateLimit("could not connect to Redis", 60.0))
    worker = TrainingWorker([QUEUE_NAME], connection=connect(settings.redis_url))
    log.info("training worker listening on %s (queue %s)", settings.redis_url, QUEUE_NAME)
    try:
        worker.work(burst=args.burst, with_scheduler=False)
    except RedisError as exc:  # RQ retries while it works; this is Redis gone at start or stop
        raise SystemExit(f"error: the training worker lost Redis ({exc})") from None


class RateLimit(logging.Filter):
    """Lets a log record whose message contains `text` through at most once per `every`
    seconds; the next one that passes says how many were left out."""

    def __init__(self, text: str, every: float) -> None:
        super().__init__()
        self.text, self.every = text, every
        self.last = float("-inf")
        self.left_out = 0
        self.clock = time.monotonic  # tests move one by hand

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        now = self.clock()
        if now - self.last < self.every:
            self.left_out += 1
            return False
        if self.left_out:
            record.msg = f"{record.msg} ({self.left_out} such lines left out)"
            self.left_out = 0
        self.last = now
        return True


def cmd_label_config(args: argparse.Namespace) -> None:
    from backend.label_config import label_config_for

    check = None if args.no_check else "check"
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes) or len(set(classes)) != len(classes):
            raise SystemExit(
                f"error: --classes must be distinct, non-empty names separated by commas, "
                f"got {args.classes!r}"
            )
        print(label_config_for(classes, check=check), end="")
        return
    checkpoint = args.checkpoint
    if checkpoint is None:
        registry = ModelRegistry(Settings.from_env().model_dir, args.project)
        checkpoint = registry.current_checkpoint()
    if checkpoint is None:
        whose = f"project {args.project}" if args.project else "the shared model"
        raise SystemExit(
            f"error: {whose} has no published version; give --checkpoint CKPT, or --classes "
            "a,b,c for a new project"
        )
    meta, _ = read_checkpoint(checkpoint)
    print(label_config_for(list(meta["classes"]), check=check), end="")


def cmd_rollback(args: argparse.Namespace) -> None:
    registry = ModelRegistry.of_version(Settings.from_env().model_dir, args.version)
    record = registry.rollback(args.version)
    print(f"now serving {record['version']} (serving processes switch within seconds)")


def cmd_reset(args: argparse.Namespace) -> None:
    registry = ModelRegistry(Settings.from_env().model_dir, args.project)
    old = registry.reset(args.reason)
    was = f"was {old['version']}" if old else "it served nothing"
    print(
        f"project {args.project}: its lineage serves nothing now ({was}); its next training "
        "trains a first model on the label config's classes (old versions stay listed for "
        "rollback)"
    )


def cmd_dataset(args: argparse.Namespace) -> None:
    from backend.dataset_export import export_project

    settings = Settings.from_env()
    token = args.token or settings.label_studio_api_key
    summary = export_project(
        args.from_label_studio, args.project, args.out, token, settings, args.test_fraction
    )
    print(f"{args.out}: classes {', '.join(summary.classes)}")
    for line in summary.lines():
        print(f"  {line}")


def round_api(args: argparse.Namespace, settings: Settings):  # -> LabelStudioAPI
    """Label Studio for `abn round`: --label-studio, LABEL_STUDIO_URL, or the project's /setup."""
    from backend.label_studio import LabelStudioAPI, ProjectConnections

    url, token = args.label_studio or settings.label_studio_url, args.token
    if url is None:  # the host and token the project's /setup gave the backend
        known = ProjectConnections(settings.projects_dir).get(args.project)
        if known is None:
            raise SystemExit(
                f"error: no Label Studio URL: pass --label-studio URL, set LABEL_STUDIO_URL, or "
                f"connect project {args.project} to the backend first"
            )
        url, token = known.url, token or known.token
    return LabelStudioAPI(url, token or settings.label_studio_api_key)


def cmd_round(args: argparse.Namespace) -> None:
    from backend.rounds import make_round, read_rounds, refresh_rounds, write_round_report

    settings = Settings.from_env()
    if args.action == "report":
        if args.out is None:
            raise SystemExit("error: abn round report needs --out DIR")
        records = read_rounds(settings, str(args.project))
        if not args.no_refresh and records:
            records = refresh_rounds(round_api(args, settings), args.project, settings)
        print(f"wrote {write_round_report(records, args.out, args.project)}")
        return
    if args.action == "status":
        records = refresh_rounds(round_api(args, settings), args.project, settings)
        if not records:
            print(f"project {args.project}: no rounds yet")
        for r in records:
            after = r.version_after or {"rejected": "refused by the gate"}.get(
                r.training or "", "not trained yet"
            )
            scores = " ".join(
                f"{name} acc {s.accuracy if s.accuracy is None else round(s.accuracy, 4)} "
                f"map {s.map_mse if s.map_mse is None else round(s.map_mse, 4)}"
                for name, s in (("before", r.before), ("after", r.after))
                if s is not None
            )
            print(
                f"round {r.number} ({r.strategy}, {len(r.tasks)} tasks, {r.version} -> {after}): "
                f"{r.annotated} submitted, {r.corrected} corrected, {r.lead_time_s:.1f} s"
                + (f"; {scores}" if scores else "")
            )
        return
    record = make_round(round_api(args, settings), args.project, args.strategy, args.size, settings)
    print(f"{record.title}: tab {record.view_id}, {len(record.tasks)} tasks")
    print(f"  {record.url}")
    for reason, count in record.left_out.items():
        print(f"  left out: {count} {reason}")


def cmd_versions(args: argparse.Namespace) -> None:
    from backend.registry import lineage_of

    for record in all_versions(Settings.from_env().model_dir):
        if args.project is not None and lineage_of(record["version"]) != args.project:
            continue
        mark = "*" if record["current"] else " "
        ids = record.get("annotation_ids") or []
        print(
            f"{mark} {record['version']:>8}  parent {record.get('parent_version') or '-':>8}  "
            f"{len(ids):>4} annotations  {record.get('reason', '')}"
        )


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything beyond loopback needs BASIC_AUTH_USER/PASS "
        "(or --no-auth)",
    )
    parser.add_argument("--port", type=int, default=9090, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a shared model: published as v1 while MODEL_DIR holds none, and served to every "
        "project of its classes that has no model of its own",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="listen beyond loopback without basic auth (ABN_ALLOW_UNAUTHENTICATED=1): only "
        "behind something else that authenticates",
    )


def serving_settings(args: argparse.Namespace) -> Settings:
    """The environment's settings with --no-auth applied, refused early if exposed unsafely."""
    settings = Settings.from_env()
    if args.no_auth:
        os.environ["ABN_ALLOW_UNAUTHENTICATED"] = "1"  # for the processes started from here
        settings = settings.replace(allow_unauthenticated=True)
    settings.check_exposure(args.host)
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abn", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    model_cli.add_commands(sub)

    p = sub.add_parser(
        "run",
        help="backend + worker + embedded Redis: the main job",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serving_options(p)
    p.add_argument(
        "--demo",
        action="store_true",
        help="with nothing published, train and share the decoy-digits demo model (minutes)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "serve",
        help="the backend alone (gunicorn)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serving_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="the training worker alone (RQ)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("label-config", help="the Label Studio config for a model's classes")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="default: the version MODEL_DIR serves")
    which.add_argument("--classes", help="class names separated by commas, for a new project")
    which.add_argument("--project", help="the version that project's own lineage serves")
    p.add_argument(
        "--no-check",
        action="store_true",
        help='without the "Check my map" key point (it needs the backend connected as interactive)',
    )
    p.set_defaults(func=cmd_label_config)

    p = sub.add_parser(
        "rollback", help="serve an earlier published version again (its name says whose)"
    )
    p.add_argument("version", help="v3 (the shared model) or p12-v3 (project 12's)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "reset", help="a project's lineage serves nothing: its next training starts a new one"
    )
    p.add_argument("--project", required=True, help="the Label Studio project id")
    p.add_argument("--reason", default="reset by abn reset", help="recorded in its registry")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser(
        "dataset", help="a Label Studio project's images by class and brushes as maps, on disk"
    )
    p.add_argument("--from-label-studio", required=True, metavar="URL", help="Label Studio URL")
    p.add_argument("--project", required=True, type=int, help="the project id")
    p.add_argument("--out", required=True, type=Path, help="the dataset folder to write")
    p.add_argument("--token", help="API token (default: LABEL_STUDIO_API_KEY)")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of tasks in the test split"
    )
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser(
        "round",
        help="an active-learning round: a Label Studio tab of the tasks to correct "
        "(round status: what came of each round; round report: markdown and plots)",
    )
    p.add_argument("action", nargs="?", default="make", choices=["make", "status", "report"])
    p.add_argument("--project", required=True, type=int, help="the project id")
    p.add_argument("--out", type=Path, help="round report: the folder to write")
    p.add_argument(
        "--no-refresh", action="store_true", help="round report: the records as last refreshed"
    )
    p.add_argument("--strategy", default="least-confident", choices=STRATEGIES)
    p.add_argument("--size", type=int, default=20, help="tasks in the round")
    p.add_argument("--label-studio", metavar="URL", help="default: LABEL_STUDIO_URL, or /setup's")
    p.add_argument("--token", help="API token (default: LABEL_STUDIO_API_KEY, or /setup's)")
    p.set_defaults(func=cmd_round)

    p = sub.add_parser("versions", help="list published versions and their lineage")
    p.add_argument("--project", help="only that project's own versions")
    p.set_defaults(func=cmd_versions)
    return parser


def main(argv: list[str] | None = None) -> None:
    model_cli.run_command(build_parser().parse_args(argv))
