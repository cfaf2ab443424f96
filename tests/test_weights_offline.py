"""The socket guard, and the whole backbone + weights code path under it (nothing reaches the network)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from fdsbench.netguard import NetworkBlockedError, block_network, is_active, no_network  # noqa: F401


def test_guard_blocks_connections_and_dns():
    orig = socket.socket.connect
    with block_network() as g:
        assert is_active()
        with pytest.raises(NetworkBlockedError, match="network access blocked"):
            socket.create_connection(("93.184.216.34", 80), timeout=1)
        with pytest.raises(NetworkBlockedError):
            socket.getaddrinfo("download.pytorch.org", 443)
        with pytest.raises(NetworkBlockedError):
            socket.gethostbyname("dl.fbaipublicfiles.com")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(NetworkBlockedError):
            s.sendto(b"x", ("8.8.8.8", 53))
        s.close()
        with pytest.raises(NetworkBlockedError):  # loopback too, unless allowed
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        a, b = socket.socketpair()  # unix-domain sockets stay usable (torch.multiprocessing)
        a.sendall(b"ok")
        assert b.recv(2) == b"ok"
        a.close(), b.close()
        assert len(g.calls) >= 5
    assert not is_active() and socket.socket.connect is orig


def test_guard_allow_loopback_and_nesting():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with block_network(allow_loopback=True):
        with block_network(allow_loopback=True):
            c = socket.create_connection(srv.getsockname(), timeout=2)
            c.close()
        with pytest.raises(NetworkBlockedError):
            socket.create_connection(("10.1.2.3", 80), timeout=1)
    srv.close()
    assert not is_active()


def test_build_and_load_weights_offline(tmp_path, monkeypatch, no_network):
    """Build, save, resolve, verify and load with the guard on: the code path opens no socket."""
    from fdsbench import weights as W
    from fdsbench.blocks.backbones import build_backbone
    from fdsbench.blocks.features import CachedBackbone

    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path / "cache"))
    a = build_backbone("resnet18", weights="random", seed=0)
    torch.save({"state_dict": {"module." + k: v for k, v in a.state_dict().items()}}, tmp_path / "mine.pth")
    b = build_backbone("resnet18", weights=str(tmp_path / "mine.pth"))
    enc = CachedBackbone(b, disk_dir=tmp_path / "feat")
    enc.forward_features(torch.randn(1, 3, 64, 64), layers=("layer2",))
    W.weights_verify("all")
    W.weights_list()
    assert no_network.calls == []


def test_offline_env_guards_the_command_only():
    code = ("import socket, fdsbench.netguard as n\n"
            "with n.offline_from_env():\n"
            "    try:\n        socket.create_connection(('1.1.1.1', 443), timeout=1)\n"
            "    except n.NetworkBlockedError as e:\n        print('blocked:', e)\n"
            "assert not n.is_active()\n")
    env = {**os.environ, "FDSBENCH_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("blocked: network access blocked (") and "1.1.1.1" in out.stdout
    env["FDSBENCH_OFFLINE"] = "0"
    code0 = ("import fdsbench.netguard as n\n"
             "with n.offline_from_env():\n    print(n.offline_requested(), n.is_active())\n")
    out = subprocess.run([sys.executable, "-c", code0], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False"


def test_cli_in_process_leaves_no_guard_behind(monkeypatch, capsys):
    from fdsbench import cli

    monkeypatch.setenv("FDSBENCH_OFFLINE", "1")
    assert cli.main(["methods"]) == 0
    assert not is_active()
