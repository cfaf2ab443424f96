"""The results notebook runs top to bottom on the committed CPU leaderboard records (its code cells,
in order, in one namespace), like the quickstart."""
import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"


def test_results_notebook_runs(capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(NOTEBOOK.parent)
    monkeypatch.delenv("FDSBENCH_RUNS", raising=False)
    nb = json.loads(NOTEBOOK.read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), NOTEBOOK.name, "exec"), namespace)
    out = capsys.readouterr().out
    assert "runs," in out and "sign-flip" in out and "SOFS Table 1" in out
    assert namespace["frame"]["run_id"].nunique() >= 6
    for fig in ("fig_fps", "fig_size", "fig_class", "fig_diff"):
        assert namespace[fig].axes
    matplotlib.pyplot.close("all")
