"""docker-compose.yml, checked as compose reads it: services, the GPU profile and its device
reservation, the shared MODEL_DIR, a first start with no checkpoint, no secret in the file.

Compose itself cannot run on the test machines (no Docker engine); `${...}` is interpolated
here the way compose does it, so that "what does the backend get with this environment" is
asked of the file itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("backend", "worker", "gpu-worker")
SECRETS = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY")
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class Missing(Exception):
    """A required variable (``${NAME:?message}``) is unset: compose refuses to start."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's substitution of ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
    ``${NAME:?err}`` and ``${NAME?err}`` in every string of `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        unset = name not in env
        empty = unset or env[name] == ""
        if op in (":-", "-") and (empty if op == ":-" else unset):
            return arg
        if op in (":?", "?") and (empty if op == ":?" else unset):
            raise Missing(f"{name}: {arg}")
        return env.get(name, "")

    return VARIABLE.sub(one, value)


def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merges resolved


def config(env: dict[str, str], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """The services compose would start with `env` and `profiles`, interpolated."""
    document = interpolate(raw(), env)
    services = {
        name: service
        for name, service in document["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }
    return {**document, "services": services}


AUTH = {"BASIC_AUTH_USER": "abn", "BASIC_AUTH_PASS": "s3cret"}


def test_the_services_and_the_gpu_profile() -> None:
    assert set(raw()["services"]) == {"redis", *APP_SERVICES}
    assert set(config(AUTH)["services"]) == {"redis", "backend", "worker"}
    assert set(config(AUTH, ("gpu",))["services"]) == {"redis", *APP_SERVICES}
    gpu = raw()["services"]["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == 1
    assert gpu["command"] == ["abn", "worker"]
    assert gpu["environment"]["ABN_TRAIN_DEVICE"] == "cuda"
    assert config(AUTH)["services"]["worker"]["environment"]["ABN_TRAIN_DEVICE"] == "cpu"
    # The CPU worker can be left out, so that the GPU worker takes every job.
    assert config(AUTH)["services"]["worker"]["deploy"]["replicas"] == "1"
    assert config({**AUTH, "ABN_CPU_WORKERS": "0"})["services"]["worker"]["deploy"] == {
        "replicas": "0"
    }


def test_one_image_one_model_dir_one_redis() -> None:
    services = config(AUTH, ("gpu",))["services"]
    assert services["redis"]["command"][-2:] == ["--appendonly", "yes"]  # persistence
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert "healthcheck" in services["redis"]
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"] == "." and service["image"] == "abn-backend:latest"
        assert "model-dir:/data" in service["volumes"], name
        env = service["environment"]
        assert env["MODEL_DIR"] == "/data/model_dir" and env["REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["restart"] == "unless-stopped"
    # The image's HEALTHCHECK asks the backend's port: the workers must not inherit it.
    assert services["worker"]["healthcheck"] == services["gpu-worker"]["healthcheck"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert "healthcheck" not in services["backend"]  # the image's own, with basic auth
    assert set(raw()["volumes"]) == {"model-dir", "redis-data"}


def test_a_first_start_needs_no_checkpoint_and_can_take_one() -> None:
    backend = config(AUTH)["services"]["backend"]
    # Empty is unset for the backend (backend/settings.py): no shared model, per-project ones.
    assert backend["environment"]["ABN_CHECKPOINT"] == ""
    command = backend["command"]
    assert command[:2] == ["abn", "serve"] and "--checkpoint" not in command
    given = config({**AUTH, "ABN_CHECKPOINT": "/checkpoints/model.pt"})["services"]["backend"]
    assert given["environment"]["ABN_CHECKPOINT"] == "/checkpoints/model.pt"
    assert "./checkpoints:/checkpoints:ro" in given["volumes"]
    for name in ("worker", "gpu-worker"):
        assert "ABN_CHECKPOINT" not in raw()["services"][name]["environment"]


def test_secrets_come_from_the_environment_only() -> None:
    with pytest.raises(Missing, match="BASIC_AUTH_USER"):
        config({})
    with pytest.raises(Missing, match="BASIC_AUTH_PASS"):
        config({"BASIC_AUTH_USER": "abn"})
    services = config({**AUTH, "LABEL_STUDIO_API_KEY": "tok"}, ("gpu",))["services"]
    backend = services["backend"]["environment"]
    assert (backend["BASIC_AUTH_USER"], backend["BASIC_AUTH_PASS"]) == ("abn", "s3cret")
    assert all(services[n]["environment"]["LABEL_STUDIO_API_KEY"] == "tok" for n in APP_SERVICES)
    # No default value for a secret anywhere in the file: unset means empty or refused.
    for match in VARIABLE.finditer(COMPOSE.read_text()):
        if match["name"] in SECRETS and match["op"] in (":-", "-"):
            assert match["arg"] == "", match[0]
    no_key = config(AUTH)["services"]["backend"]["environment"]
    assert no_key["LABEL_STUDIO_API_KEY"] == ""
    # Nothing secret-looking written out as a literal value.
    for service in raw()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRETS:
                assert isinstance(value, str) and value.startswith("${"), key


def test_the_backend_listens_beyond_loopback_with_auth() -> None:
    backend = config(AUTH)["services"]["backend"]
    assert backend["command"][backend["command"].index("--host") + 1] == "0.0.0.0"
    assert backend["ports"] == ["9090:9090"]
    assert config({**AUTH, "ABN_PORT": "8080"})["services"]["backend"]["ports"] == ["8080:9090"]
