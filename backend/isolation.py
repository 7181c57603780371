"""Torch work for a process that forks afterwards, done in a fresh interpreter instead.

Gunicorn's master forks its workers. If the master has run a parallel torch operation (a
``load_state_dict``, say), libgomp's thread pool exists in the master but not in the forked
child, and the child's first parallel operation waits forever on threads that are not there:
``abn serve --checkpoint`` on an empty MODEL_DIR hung 5 times out of 5 on two cores. So the
master never runs torch itself; what it needs done before forking (publish the first model,
check the one to serve) runs in a child interpreter started for it, which shares nothing.

The child is a plain ``python -c`` (not a multiprocessing pool, whose resource tracker would
stay behind as a child of the master): the function and its arguments go in as a pickle on
stdin, the result or the exception comes back as a pickle on stdout, and the child's logs go
to the same stderr as the master's.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_CHILD = """
import os, pickle, sys
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # anything the function prints goes to stderr, not into the result
fn, args = pickle.load(sys.stdin.buffer)
try:
    result = (True, fn(*args))
except BaseException as exc:
    result = (False, exc)
pickle.dump(result, out)
out.close()
"""


def run_in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a new interpreter; its result, or its exception re-raised here.

    `fn` must be a module-level function; it, its arguments and its result must pickle.
    """
    # The child imports what this process can import (the function's module included).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=pickle.dumps((fn, args)),
        stdout=subprocess.PIPE,
        env=env,
        check=False,
    )
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"the child process for {fn.__name__} died (exit {done.returncode})")
    ok, value = pickle.loads(done.stdout)
    if not ok:
        raise value
    return value
