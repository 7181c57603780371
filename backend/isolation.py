"""Torch work for a process that forks afterwards, done in a fresh interpreter instead.

Gunicorn's master forks its workers. If the master has run a parallel torch operation (a
``load_state_dict``, say), libgomp's thread pool exists in the master but not in the forked
child, and the child's first parallel operation waits forever on threads that are not there:
``abn serve --checkpoint`` on an empty MODEL_DIR hung 5 times out of 5 on two cores. So the
master never runs torch itself; what it needs done before forking (publish the first model,
check the one to serve) runs in a spawned child, which shares no threads with anyone.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned interpreter; its result, or its exception re-raised here.

    `fn`, its arguments and its result must pickle (a module-level function, plain values).
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
