"""The project's methods/ and datasets/ folders are importable only under the fdsbench namespace:
a bare `import datasets` elsewhere gets whatever else provides it (e.g. Hugging Face), never ours."""
import subprocess
import sys
import textwrap
from pathlib import Path


def _run(code: str, cwd: Path, env_path: str | None = None):
    import os

    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = env_path
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_namespaced_imports(tmp_path):
    r = _run("""
        import fdsbench.datasets, fdsbench.methods, fdsbench.datasets.synthetic, fdsbench.methods.proto
        print(fdsbench.datasets.__name__, fdsbench.methods.proto.__name__)
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fdsbench.datasets fdsbench.methods.proto" in r.stdout


def test_bare_datasets_is_not_ours(tmp_path):
    r = _run("""
        try:
            import datasets
        except ModuleNotFoundError:
            print("absent")
        else:
            print("other", datasets.__file__)
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("absent") or "fdsbench" not in r.stdout


def test_hugging_face_style_datasets_still_wins(tmp_path):
    """With another top-level `datasets` installed, importing fdsbench leaves it untouched."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IS_HF = True\n")
    r = _run("""
        import fdsbench.datasets, fdsbench.registry
        fdsbench.registry.list_datasets()
        import datasets
        print(getattr(datasets, "IS_HF", False), "synthetic" in fdsbench.registry.list_datasets())
        """, tmp_path, env_path=str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
