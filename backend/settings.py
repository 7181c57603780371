"""Every environment setting of the backend, read in one place.

The names the v2 Label Studio ML backends use (``REDIS_URL``, ``MODEL_DIR``,
``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``) keep
their meaning; everything specific to this backend starts with ``ABN_``. A value that cannot be
parsed is refused at start-up with the variable's name, rather than surfacing later as a
confusing failure inside a request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backend.layout import ModelDirLayout
from model.errors import UserError
from model.round import JUDGED_ON
from model.train import DEFAULT_GAMMA

DEFAULT_MODEL_DIR = Path("runs") / "model_dir"
BRUSH_PIXEL_CEILING = 2**28  # backend.brush.MAX_PIXELS: the codec's own limit


class SettingsError(UserError, ValueError):
    """An environment variable with a value the backend cannot use."""


@dataclass(frozen=True)
class Settings:
    """The backend's configuration: :meth:`from_env` builds it, :meth:`replace` changes it."""

    # Shared with the v2 ML backends.
    redis_url: str | None = None
    model_dir: Path = DEFAULT_MODEL_DIR
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    # ABN_ALLOW_UNAUTHENTICATED=1: serve beyond loopback with no basic auth (README, Security).
    allow_unauthenticated: bool = False

    # Serving.
    checkpoint: Path | None = None  # ABN_CHECKPOINT: served while MODEL_DIR holds no version
    device: str = "cpu"  # ABN_DEVICE
    batch_size: int = 8  # ABN_BATCH_SIZE: images per forward pass (8 is best on CPU)
    brush_levels: int = 8  # ABN_BRUSH_LEVELS: alpha levels of the attention brush (2..256)
    # ABN_BRUSH_FLOOR: attention below this (0..1) is drawn transparent; 0 draws every level.
    brush_floor: float = 0.0

    # Image fetching.
    image_max_bytes: int = 32 * 1024 * 1024  # ABN_IMAGE_MAX_BYTES
    # ABN_IMAGE_MAX_PIXELS (decompression bombs): 64 M admits 8000x8000 scans and 61 MP camera
    # photos. Sane now that a decode is bounded: Pillow holds ~4 bytes a pixel (256 MB at the
    # limit) only while decoding, under ABN_IMAGE_DECODE_PIXELS, and keeps a small copy after.
    image_max_pixels: int = 64_000_000
    # ABN_IMAGE_DECODE_PIXELS: pixels decoded at once per process, all requests together: one
    # image at the pixel limit at a time (~256 MB); smaller ones share it.
    image_decode_pixels: int = 64_000_000
    image_timeout: float = 15.0  # ABN_IMAGE_TIMEOUT: seconds for a whole download, redirects too
    image_allowed_hosts: tuple[str, ...] = ()  # ABN_IMAGE_ALLOWED_HOSTS: "host[:port],*.dom"
    image_cache_dir: Path | None = None  # ABN_IMAGE_CACHE_DIR; default MODEL_DIR/cache/images
    image_cache: bool = True  # ABN_IMAGE_CACHE=0 turns the on-disk cache off

    # Request limits (a refused request is a 413 that names the setting).
    # ABN_MAX_REQUEST_BYTES: largest body. Label Studio puts every task's earlier predictions and
    # annotations (a brush of ~250 KB of JSON per megapixel image) into /predict, so this stays
    # at 64 MiB; parsing costs up to ~20x the body in memory.
    max_request_bytes: int = 64 * 1024 * 1024
    # ABN_MAX_TASKS_PER_REQUEST: tasks in one /predict. "Retrieve predictions" sends all the
    # selected tasks at once and gives up after 100 s (ML_TIMEOUT_PREDICT); 1000 tasks take
    # ~35 s on two CPU cores at 224 px. Select fewer, or raise it on a GPU.
    max_tasks_per_request: int = 1000
    # ABN_BRUSH_MAX_PIXELS: largest brush (original_width * original_height) a webhook may
    # carry, checked before decoding (an annotation's brushes together: 8 times this, so that
    # decoding them stays under a second). A brush covers its image, so this equals the default
    # ABN_IMAGE_MAX_PIXELS: every image that gets a prediction can get a correction. Decoding
    # costs about one byte per pixel (64 MB at the limit).
    brush_max_pixels: int = 64_000_000
    # ABN_IMAGE_CACHE_MAX_BYTES: least recently used files are evicted past it (1 GiB: ~10k
    # photos of 100 KB, a few /predict rounds of a large project).
    image_cache_max_bytes: int = 1024**3

    # The training loop (docs/loop.md says how the defaults were chosen).
    train_after: int = 10  # ABN_TRAIN_AFTER: new edited corrections that start a job by themselves
    train_device: str = "auto"  # ABN_TRAIN_DEVICE: auto = CUDA when the worker has one
    gamma: float = DEFAULT_GAMMA  # ABN_GAMMA: weight of the map loss ||M' - M||_2
    finetune_epochs: int = 10  # ABN_FINETUNE_EPOCHS
    finetune_batch_size: int = 16  # ABN_FINETUNE_BATCH_SIZE
    finetune_lr: float | None = None  # ABN_FINETUNE_LR; default 0.1 per 256 images
    holdout_fraction: float = 0.2  # ABN_HOLDOUT_FRACTION: corrections kept out for the gate
    # The round's objective; the default is the paper's (docs/loop.md says why).
    # ABN_COUNTERFACTUALS: counterfactual copies a round adds of each training task with a human
    # map (of every task with ABN_GUIDED_COPIES)
    # (model/counterfactual.py); 0 is the paper's objective alone.
    counterfactuals: int = 0
    # ABN_LEARNING_STAGES: the trunk's last k stages learn in a round too (0: branches only,
    # the paper's; the trunk is then cached).
    learning_stages: int = 0
    # ABN_GUIDED_COPIES: with ABN_COUNTERFACTUALS, copy every training task, class-only ones
    # too, cut by the map a first fine-tune learnt where no human drew one (model/round.py).
    # ABN_COUNTERFACTUALS=2 ABN_LEARNING_STAGES=1 ABN_GUIDED_COPIES=1 is the objective the
    # shortcut studies chose on validation (`counterfactual-propagated`), for a project known
    # to have a shortcut.
    guided_copies: bool = False
    verdict_tab: bool = True  # ABN_VERDICT_TAB: each round's verdict as a Data Manager tab
    gate_accuracy_margin: float = 0.05  # ABN_GATE_ACCURACY_MARGIN: accuracy it may lose
    gate_map_margin: float = 0.01  # ABN_GATE_MAP_MARGIN: map MSE it may gain
    gate_alpha: float = 0.05  # ABN_GATE_ALPHA: significance of the gate's paired sign tests
    gate_min_evidence: int = 5  # ABN_GATE_MIN_EVIDENCE: held-out tasks needed to judge a round
    # ABN_GATE_ON: what the gate judges, "tasks" (the held-out tasks as labelled) or
    # "counterfactual" (their views with the outside of the human map swapped; for a project
    # whose held-out tasks share the shortcut its corrections remove: docs/loop.md).
    gate_on: str = "tasks"
    swap_interval: float = 0.5  # ABN_SWAP_INTERVAL: seconds between registry polls

    # Projects and their first models (docs/projects.md).
    max_project_models: int = 8  # ABN_MAX_PROJECT_MODELS: project models loaded per process
    other_choices: tuple[str, ...] = ("Other",)  # ABN_OTHER_CHOICES: choices that are no class
    # ABN_TRAIN_FIRST_AFTER: labelled tasks that start a project's first model by themselves
    # (0: only Start Training / POST /train does).
    train_first_after: int = 0
    pretrained: str | None = None  # ABN_PRETRAINED: torchvision weight name or local file
    first_arch: str = "resnet18"  # ABN_FIRST_ARCH
    first_image_size: int = 224  # ABN_FIRST_IMAGE_SIZE
    first_epochs: int = 30  # ABN_FIRST_EPOCHS: at most this many epochs...
    first_time_budget: float = 180.0  # ABN_FIRST_TIME_BUDGET: ...and about this many seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default: ``os.environ``); unset or empty means default."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        defaults = cls()
        model_dir = Path(get("MODEL_DIR") or defaults.model_dir)
        checkpoint = get("ABN_CHECKPOINT")
        cache_dir = get("ABN_IMAGE_CACHE_DIR")
        hosts = get("ABN_IMAGE_ALLOWED_HOSTS") or ""
        settings = cls(
            redis_url=get("REDIS_URL"),
            model_dir=model_dir,
            label_studio_url=_url(get("LABEL_STUDIO_URL"), "LABEL_STUDIO_URL"),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY"),
            basic_auth_user=get("BASIC_AUTH_USER"),
            basic_auth_pass=get("BASIC_AUTH_PASS"),
            allow_unauthenticated=_bool(
                env, "ABN_ALLOW_UNAUTHENTICATED", defaults.allow_unauthenticated
            ),
            checkpoint=Path(checkpoint) if checkpoint else None,
            device=get("ABN_DEVICE") or defaults.device,
            batch_size=_int(env, "ABN_BATCH_SIZE", defaults.batch_size, 1, 4096),
            brush_levels=_int(env, "ABN_BRUSH_LEVELS", defaults.brush_levels, 2, 256),
            brush_floor=_float(env, "ABN_BRUSH_FLOOR", defaults.brush_floor, positive=False),
            image_max_bytes=_int(env, "ABN_IMAGE_MAX_BYTES", defaults.image_max_bytes, 1, 2**40),
            image_max_pixels=_int(env, "ABN_IMAGE_MAX_PIXELS", defaults.image_max_pixels, 1, 2**28),
            image_decode_pixels=_int(
                env, "ABN_IMAGE_DECODE_PIXELS", defaults.image_decode_pixels, 1, 2**34
            ),
            image_timeout=_float(env, "ABN_IMAGE_TIMEOUT", defaults.image_timeout),
            image_allowed_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            image_cache_dir=Path(cache_dir) if cache_dir else None,
            image_cache=_bool(env, "ABN_IMAGE_CACHE", defaults.image_cache),
            max_request_bytes=_int(
                env, "ABN_MAX_REQUEST_BYTES", defaults.max_request_bytes, 1024, 2**40
            ),
            max_tasks_per_request=_int(
                env, "ABN_MAX_TASKS_PER_REQUEST", defaults.max_tasks_per_request, 1, 10**7
            ),
            brush_max_pixels=_int(
                env, "ABN_BRUSH_MAX_PIXELS", defaults.brush_max_pixels, 1, BRUSH_PIXEL_CEILING
            ),
            image_cache_max_bytes=_int(
                env, "ABN_IMAGE_CACHE_MAX_BYTES", defaults.image_cache_max_bytes, 1, 2**50
            ),
            train_after=_int(env, "ABN_TRAIN_AFTER", defaults.train_after, 1, 10**9),
            train_device=get("ABN_TRAIN_DEVICE") or defaults.train_device,
            gamma=_float(env, "ABN_GAMMA", defaults.gamma, positive=False),
            finetune_epochs=_int(env, "ABN_FINETUNE_EPOCHS", defaults.finetune_epochs, 1, 10**6),
            finetune_batch_size=_int(
                env, "ABN_FINETUNE_BATCH_SIZE", defaults.finetune_batch_size, 1, 4096
            ),
            finetune_lr=_float(env, "ABN_FINETUNE_LR", None),
            holdout_fraction=_float(env, "ABN_HOLDOUT_FRACTION", defaults.holdout_fraction),
            counterfactuals=_int(env, "ABN_COUNTERFACTUALS", defaults.counterfactuals, 0, 64),
            learning_stages=_int(env, "ABN_LEARNING_STAGES", defaults.learning_stages, 0, 3),
            guided_copies=_bool(env, "ABN_GUIDED_COPIES", defaults.guided_copies),
            verdict_tab=_bool(env, "ABN_VERDICT_TAB", defaults.verdict_tab),
            gate_accuracy_margin=_float(
                env, "ABN_GATE_ACCURACY_MARGIN", defaults.gate_accuracy_margin, positive=False
            ),
            gate_map_margin=_float(
                env, "ABN_GATE_MAP_MARGIN", defaults.gate_map_margin, positive=False
            ),
            gate_alpha=_float(env, "ABN_GATE_ALPHA", defaults.gate_alpha),
            gate_min_evidence=_int(
                env, "ABN_GATE_MIN_EVIDENCE", defaults.gate_min_evidence, 1, 10**6
            ),
            gate_on=(get("ABN_GATE_ON") or defaults.gate_on).strip().lower(),
            swap_interval=_float(env, "ABN_SWAP_INTERVAL", defaults.swap_interval),
            max_project_models=_int(
                env, "ABN_MAX_PROJECT_MODELS", defaults.max_project_models, 1, 10_000
            ),
            other_choices=tuple(
                c.strip()
                for c in (env.get("ABN_OTHER_CHOICES") or ",".join(defaults.other_choices)).split(
                    ","
                )
                if c.strip()
            ),
            train_first_after=_int(
                env, "ABN_TRAIN_FIRST_AFTER", defaults.train_first_after, 0, 10**9
            ),
            pretrained=get("ABN_PRETRAINED"),
            first_arch=get("ABN_FIRST_ARCH") or defaults.first_arch,
            first_image_size=_int(env, "ABN_FIRST_IMAGE_SIZE", defaults.first_image_size, 32, 4096),
            first_epochs=_int(env, "ABN_FIRST_EPOCHS", defaults.first_epochs, 1, 10**6),
            first_time_budget=_float(env, "ABN_FIRST_TIME_BUDGET", defaults.first_time_budget),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations that would fail later (one half of basic auth, bad levels)."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError(
                "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or both left unset)"
            )
        if not 2 <= self.brush_levels <= 256:
            raise SettingsError(f"ABN_BRUSH_LEVELS must be in 2..256, got {self.brush_levels}")
        if not 0 <= self.brush_floor < 1:
            raise SettingsError(f"ABN_BRUSH_FLOOR must be in [0, 1), got {self.brush_floor}")
        if self.batch_size < 1:
            raise SettingsError(f"ABN_BATCH_SIZE must be at least 1, got {self.batch_size}")
        if not 0 <= self.holdout_fraction < 1:
            raise SettingsError(
                f"ABN_HOLDOUT_FRACTION must be in [0, 1), got {self.holdout_fraction}"
            )
        if self.first_image_size % 16:
            raise SettingsError(
                "ABN_FIRST_IMAGE_SIZE must be a multiple of 16 (the trunk's stride), "
                f"got {self.first_image_size}"
            )
        if self.gate_on not in JUDGED_ON:
            raise SettingsError(
                f"ABN_GATE_ON must be one of {', '.join(JUDGED_ON)}, got {self.gate_on!r}"
            )
        if self.train_device not in ("auto", "cpu", "cuda"):
            raise SettingsError(
                f"ABN_TRAIN_DEVICE must be auto, cpu or cuda, got {self.train_device!r}"
            )

    def replace(self, **changes: object) -> Settings:
        """A copy with `changes` applied (command-line options override the environment)."""
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check_exposure(self, host: str) -> None:
        """Refuse to listen beyond loopback without authentication, unless told to.

        Without basic auth, anyone who reaches the port can reconnect a project to another
        Label Studio host, roll back versions, inject corrections and start training.
        """
        if self.auth_enabled or self.allow_unauthenticated or is_loopback(host):
            return
        raise SettingsError(
            f"refusing to listen on {host!r} without authentication: anyone who can reach it "
            "could rewire projects, inject corrections and roll back the model. Set "
            "BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same in Label Studio's model "
            "connection), or listen on 127.0.0.1, or set ABN_ALLOW_UNAUTHENTICATED=1 "
            "(--no-auth) if something in front of the backend authenticates"
        )

    @property
    def layout(self) -> ModelDirLayout:
        """Where everything lives under MODEL_DIR."""
        return ModelDirLayout(self.model_dir)

    @property
    def auth_enabled(self) -> bool:
        """Whether every route requires HTTP basic auth."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def resolved_image_cache_dir(self) -> Path | None:
        """Where fetched images are cached, or None when the cache is off."""
        if not self.image_cache:
            return None
        return self.image_cache_dir or self.layout.image_cache

    @property
    def projects_dir(self) -> Path:
        """Per-project connection records (host, token) that /setup received."""
        return self.layout.projects


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address to listen on) is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _url(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _float(
    env: Mapping[str, str], name: str, default: float | None, positive: bool = True
) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if positive and not value > 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")
