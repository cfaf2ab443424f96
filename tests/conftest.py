"""Shared fixtures. Every test runs with the network blocked (only loopback allowed) and with the
fdsbench cache in a per-session temporary folder (the synthetic dataset is generated once there)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = REPO.parent / "shared" / "data" / "magnetic-tile"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or
                                      self.family == socket.AF_UNIX):
            return real_connect(self, address)
        raise RuntimeError(f"test tried to reach the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every test runs torch on one CPU thread (tests that need another count set it and restore it):
    the tests' tiny ops run faster so on a shared 2-core machine, and the count does not depend on
    which tests ran before (it is part of a CPU run's identity)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    path = os.environ.get("FDSBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("fdsbench-cache"))
    os.environ["FDSBENCH_CACHE"] = path
    os.environ.setdefault("FDSBENCH_OFFLINE", "1")
    yield Path(path)


@pytest.fixture(scope="session")
def synthetic(_cache_dir):
    """The synthetic dataset adapter (generated once per session)."""
    from fdsbench.registry import get_dataset

    return get_dataset("synthetic")(None)


@pytest.fixture(scope="session")
def magnetic_tile_root():
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"real data not found at {MAGNETIC_TILE}")
    return MAGNETIC_TILE
