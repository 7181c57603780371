"""Fixtures for the end-to-end tests: one real Label Studio server per test session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from .label_studio import LabelStudioError, LabelStudioServer

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is an e2e test, so `pytest -m e2e` / `-m "not e2e"` select it."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def label_studio() -> Iterator[LabelStudioServer]:
    """A started Label Studio 1.23.2, shared by the session (first start takes ~30-50 s).

    A missing binary is a failure, not a skip: a skipped e2e suite looks green while testing
    nothing."""
    server = LabelStudioServer()
    if not server.binary.is_file():
        pytest.fail(
            f"Label Studio is not installed at {server.binary}: run `make test` (it installs "
            "label-studio into .venv-ls and sets LABEL_STUDIO_BIN)",
            pytrace=False,
        )
    try:
        server.start()
    except LabelStudioError as e:
        server.stop()
        pytest.fail(str(e), pytrace=False)
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()
