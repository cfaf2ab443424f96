"""A run sharded over processes with torch.distributed gives the numbers of a single-process run."""
import json
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LEAVES = ("import sys; import torch.distributed as d; from fdsbench.cli import main; code = main(sys.argv[1:]); "
          "print('process group left:', not d.is_initialized(), file=sys.stderr); sys.exit(code)")


def test_two_process_gloo_run_matches_single_process(synthetic, tmp_path):
    args = ["-m", "fdsbench.cli", "bench", "--method", "proto", "--preset", "test", "--fold", "1",
            "--max-episodes", "9", "--no-progress"]
    single = subprocess.run([sys.executable, *args, "--workdir", str(tmp_path / "one")], capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", LEAVES, *args[2:], "--workdir", str(tmp_path / "two")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("process group left: True" in err for _, err in outs)  # destroyed on every rank before exit
    assert "mIoU" in outs[0][0] and outs[1][0] == ""  # only rank 0 prints the table
    one = json.loads(next((tmp_path / "one" / "runs").glob("*.json")).read_text())
    two = json.loads(next((tmp_path / "two" / "runs").glob("*.json")).read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == one["metrics"]
    seen = lambda r: r["timing"]["predict"]["n"] + r["timing"]["warmup_calls"]["predict"]  # noqa: E731
    assert seen(two) == seen(one)  # every query timed once; each rank sets its own warm-up call apart
    assert not list((tmp_path / "two" / "runs").glob("*.partial*"))
