"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace)."""
import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(synthetic, capsys):
    nb = json.loads(NOTEBOOK.read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "IoU" in out and "quickstart_color" in out
    assert namespace["records"][0]["episodes"] > 0
