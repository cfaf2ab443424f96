"""A socket guard: makes any attempt to reach the network fail loudly.

fdsbench never downloads (weights and data come from local files). The guard proves it in tests
and enforces it in production runs:

* ``with block_network(): ...`` — inside, ``socket.connect``/``connect_ex``/``sendto`` to any
  internet address and every DNS lookup (``getaddrinfo``, ``gethostbyname``) raise
  :class:`NetworkBlockedError` (an :class:`FdsError`). Unix-domain sockets (used by
  ``torch.multiprocessing`` and friends) stay allowed; loopback only with ``allow_loopback=True``.
* ``offline_from_env()`` — the CLI runs every command inside it; with ``FDSBENCH_OFFLINE=1`` the
  guard is active for the command (and removed after, so in-process callers such as tests get their
  sockets back).
* ``no_network`` — a pytest fixture (import it into a test module, or list this module in
  ``pytest_plugins`` of a conftest to make it available everywhere; it can be made autouse there).
  ``calls`` on the returned guard lists the blocked attempts.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading

from .errors import FdsError


class NetworkBlockedError(FdsError, OSError):
    """Raised instead of opening a network connection while the guard is active."""


_LOCK = threading.RLock()
_DEPTH = 0
_SAVED: dict[str, object] = {}


class Guard:
    def __init__(self, allow_loopback: bool = False):
        self.allow_loopback = allow_loopback
        self.calls: list[str] = []

    def _is_allowed(self, family, address) -> bool:
        if family == getattr(socket, "AF_UNIX", object()):
            return True
        if not self.allow_loopback:
            return False
        host = address[0] if isinstance(address, tuple) else address
        if host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def _blocked(self, what: str):
        self.calls.append(what)
        raise NetworkBlockedError(f"network access blocked ({what}): fdsbench runs offline; "
                                  "give local files (weights, data) instead of URLs or hub names")


_ACTIVE: list[Guard] = []


def _current() -> Guard:
    return _ACTIVE[-1]


def _connect(self, address):
    g = _current()
    if not g._is_allowed(self.family, address):
        g._blocked(f"connect to {address!r}")
    return _SAVED["connect"](self, address)


def _connect_ex(self, address):
    g = _current()
    if not g._is_allowed(self.family, address):
        g._blocked(f"connect to {address!r}")
    return _SAVED["connect_ex"](self, address)


def _sendto(self, *args):
    g = _current()
    address = args[-1]
    if not g._is_allowed(self.family, address):
        g._blocked(f"sendto {address!r}")
    return _SAVED["sendto"](self, *args)


def _getaddrinfo(host, *args, **kw):
    g = _current()
    if not g._is_allowed(socket.AF_INET, (host, 0)) and host is not None:
        g._blocked(f"DNS lookup of {host!r}")
    return _SAVED["getaddrinfo"](host, *args, **kw)


def _gethostbyname(host):
    g = _current()
    if not g._is_allowed(socket.AF_INET, (host, 0)):
        g._blocked(f"DNS lookup of {host!r}")
    return _SAVED["gethostbyname"](host)


def _gethostbyname_ex(host):
    g = _current()
    if not g._is_allowed(socket.AF_INET, (host, 0)):
        g._blocked(f"DNS lookup of {host!r}")
    return _SAVED["gethostbyname_ex"](host)


def _install(guard: Guard):
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _SAVED.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                          sendto=socket.socket.sendto, getaddrinfo=socket.getaddrinfo,
                          gethostbyname=socket.gethostbyname, gethostbyname_ex=socket.gethostbyname_ex)
            socket.socket.connect = _connect
            socket.socket.connect_ex = _connect_ex
            socket.socket.sendto = _sendto
            socket.getaddrinfo = _getaddrinfo
            socket.gethostbyname = _gethostbyname
            socket.gethostbyname_ex = _gethostbyname_ex
        _DEPTH += 1
        _ACTIVE.append(guard)


def _uninstall(guard: Guard):
    global _DEPTH
    with _LOCK:
        _ACTIVE.remove(guard)
        _DEPTH -= 1
        if _DEPTH == 0:
            socket.socket.connect = _SAVED["connect"]
            socket.socket.connect_ex = _SAVED["connect_ex"]
            socket.socket.sendto = _SAVED["sendto"]
            socket.getaddrinfo = _SAVED["getaddrinfo"]
            socket.gethostbyname = _SAVED["gethostbyname"]
            socket.gethostbyname_ex = _SAVED["gethostbyname_ex"]
            _SAVED.clear()


@contextlib.contextmanager
def block_network(allow_loopback: bool = False):
    """Context manager: no internet (and, by default, no loopback) connections or DNS inside."""
    g = Guard(allow_loopback)
    _install(g)
    try:
        yield g
    finally:
        _uninstall(g)


def is_active() -> bool:
    return _DEPTH > 0


def offline_requested(env: str = "FDSBENCH_OFFLINE") -> bool:
    """True when ``$FDSBENCH_OFFLINE`` is 1/true/yes/on."""
    return os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")


def offline_from_env(env: str = "FDSBENCH_OFFLINE"):
    """``block_network()`` when ``$FDSBENCH_OFFLINE`` asks for it, else a no-op context."""
    return block_network() if offline_requested(env) else contextlib.nullcontext()


try:  # the fixture exists only where pytest is installed (tests, dev installs)
    import pytest

    @pytest.fixture
    def no_network():
        """pytest fixture: the test body runs with the network blocked; yields the Guard."""
        with block_network() as g:
            yield g
except ImportError:  # pragma: no cover
    pass
