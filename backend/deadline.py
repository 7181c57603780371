"""Downloads with a deadline that holds, whatever the other side does.

A socket timeout bounds one ``recv``, not a download: a host that sends a byte a second never
trips it, and held a request for minutes. Here a download arms an :class:`Alarm` with its
deadline; one watchdog thread per process shuts down the connection's sockets when it passes
(through duplicate descriptors, so the connection's own socket objects are never touched from
another thread), which ends a blocked read at once: TLS handshake, headers or body.
:func:`deadline_session` gives a requests session whose connections register their sockets
with the alarm of the download running in their thread (``CURRENT.alarm``).
"""

from __future__ import annotations

import heapq
import http.cookiejar
import itertools
import os
import socket
import threading
import time
from contextlib import suppress
from typing import Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool


class Alarm:
    """One download's deadline and the sockets (duplicates) to shut down when it passes."""

    __slots__ = ("deadline", "done", "fired", "socks")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.socks: list[socket.socket] = []
        self.fired = False
        self.done = False


class _Watchdog:
    """One thread per process that shuts down the connections of downloads past their deadline.

    A socket timeout bounds one ``recv``, not a download: a host sending a byte a second never
    trips it. Shutting the socket down (through a duplicate descriptor, so that the connection's
    own socket object is never touched from this thread) ends a blocked read in the download's
    thread at once, in any phase: TLS handshake, headers or body.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float) -> Alarm:
        alarm = Alarm(deadline)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="abn-image-deadline", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), alarm))
            self._cond.notify()
        return alarm

    def watch(self, alarm: Alarm, sock: socket.socket) -> None:
        """Shut `sock` down too when `alarm` fires."""
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return
        with self._cond:
            if not alarm.done:
                alarm.socks.append(dup)
                if alarm.fired:
                    _shutdown(dup)
                return
        dup.close()

    def disarm(self, alarm: Alarm) -> None:
        with self._cond:
            alarm.done = True
            socks, alarm.socks = alarm.socks, []
        for dup in socks:
            dup.close()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                alarm = heapq.heappop(self._heap)[2]
                alarm.fired = True
                for dup in alarm.socks:
                    _shutdown(dup)


def _shutdown(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = _Watchdog()
CURRENT = threading.local()  # .alarm: the download this thread is doing, if any


# A thread and its lock do not survive a fork: the child starts with a watchdog of its own.
os.register_at_fork(after_in_child=WATCHDOG._reset)


class _DeadlineMixin:
    """Puts every socket of a connection under the current download's alarm."""

    sock: Any
    timeout: Any

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        alarm = getattr(CURRENT, "alarm", None)
        if alarm is not None:
            WATCHDOG.watch(alarm, sock)  # before the TLS handshake
        return sock

    def getresponse(self) -> Any:
        alarm = getattr(CURRENT, "alarm", None)
        if alarm is not None and self.sock is not None:
            WATCHDOG.watch(alarm, self.sock)  # a kept-alive connection, reused
            left = max(alarm.deadline - time.monotonic(), 0.001)
            if isinstance(self.timeout, int | float):
                self.timeout = min(self.timeout, left)
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_DeadlineMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def deadline_session() -> requests.Session:
    """One session for all request threads: kept-alive connections to Label Studio are reused.

    Sharing is safe here because nothing per-request lives in the session: no cookies are
    kept (a cookie from one host must never ride along to another), no environment proxies or
    .netrc credentials are read, and headers are passed per call. urllib3's pool is
    thread-safe.
    """
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = _DeadlineAdapter(pool_connections=8, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
