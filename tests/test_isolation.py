"""backend/isolation.py: work done in a fresh interpreter, results and errors brought back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.isolation import run_in_fresh_process
from backend.settings import SettingsError


def _pid_and_sum(a: int, b: int) -> tuple[int, int]:
    print("this goes to stderr, not into the result")
    return os.getpid(), a + b


def _refuse(message: str) -> None:
    raise SettingsError(message)


def _die() -> None:
    os._exit(3)


def test_the_result_comes_back_from_another_process() -> None:
    pid, total = run_in_fresh_process(_pid_and_sum, 2, 3)
    assert total == 5 and pid != os.getpid()


def test_the_childs_exception_is_raised_here() -> None:
    with pytest.raises(SettingsError, match="no model to serve"):
        run_in_fresh_process(_refuse, "no model to serve")


def test_a_child_that_dies_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="died"):
        run_in_fresh_process(_die)
