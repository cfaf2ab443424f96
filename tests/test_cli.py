"""Bad input gives one clear line (exit 2), never a traceback."""
import pytest

from fdsbench.cli import main


@pytest.mark.parametrize("args, message", [
    (["bench", "--method", "nope"], "unknown method 'nope'; known:"),
    (["bench", "--dataset", "nope"], "unknown dataset 'nope'; known:"),
    (["bench", "--fold", "7"], "fold 7 does not exist for dataset 'synthetic'"),
    (["bench", "--shot", "0"], "shot must be >= 1"),
    (["bench", "--dataset", "folder", "--data-root", "/no/such/root"], "does not exist"),
    (["bench", "--plugin", "/no/such/plugin.py"], "plugin file not found"),
    (["bench", "--set", "nonsense"], "is not key=value"),
    (["bench", "--set", "bogus_key=1"], "unknown config key(s) bogus_key"),
    (["bench", "--preset", "nope"], "unknown config preset 'nope'"),
    (["bench", "--device", "cuda:0"], "CUDA is not available"),
    (["bench", "--protocol", "nope"], "unknown protocol 'nope'"),
])
def test_clear_errors(args, message, capsys, tmp_path, synthetic):
    code = main([*args, "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_broken_plugin_file(tmp_path, capsys):
    bad = tmp_path / "plug.py"
    bad.write_text("from fdsbench.registry import register_method\nimport not_a_module_xyz\n")
    assert main(["bench", "--plugin", str(bad), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "plug.py failed to import (line 2): ModuleNotFoundError" in err


def test_methods_and_episodes_commands(tmp_path, capsys, synthetic):
    assert main(["methods"]) == 0
    assert "proto" in capsys.readouterr().out
    assert main(["methods", "proto"]) == 0
    assert "requires" in capsys.readouterr().out
    assert main(["episodes", "make", "--fold", "1", "--workdir", str(tmp_path)]) == 0
    path = capsys.readouterr().out.split()[0]
    assert main(["episodes", "show", path]) == 0
    assert "episodes" in capsys.readouterr().out


def test_fps_writes_a_provenance_named_record(tmp_path, capsys, synthetic):
    assert main(["fps", "--method", "proto", "--preset", "test", "--episodes", "3", "--warmup", "1",
                 "--workdir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    files = list((tmp_path / "fps").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("proto_") and "fp32" in files[0].name
    assert "FPS" in out and "p50 ms" in out
    import json

    rec = json.loads(files[0].read_text())
    assert rec["episodes"] == 3 and rec["timing"]["predict"]["n"] == 2  # 3 queries, 1 warm-up discarded
    assert rec["environment"]["torch"]
