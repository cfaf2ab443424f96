"""``make report``: one self-contained HTML file (embedded plots, no external link) that opens in a
headless browser without console errors. The browser check runs when Chromium is installed
(Debian: ``apt-get install chromium``) and is skipped otherwise."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from synthetic_records import make_record

from fdsbench.report import build_report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def records():
    fad = {"image_auroc": (0.9, 0.8), "pixel_auroc": (0.95, 0.9), "pixel_f1_max": (0.5, 0.4), "aupro": (0.7, 0.6)}
    return [make_record("sofs", seed=s, per_class={"o/1": 0.2 + 0.01 * s, "o/2": 0.4}, fps=5.0) for s in range(2)] + \
        [make_record("proto", seed=s, per_class={"o/1": 0.1, "o/2": 0.3 - 0.02 * s}) for s in range(2)] + \
        [make_record("sofs", "mvtec_ad", "fad", per_class={"bottle/*": None}, fad=fad),
         make_record("sam2", per_class={"o/1": 0.9}, episodes=2)]


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = tmp_path_factory.mktemp("wd") / "runs"
    runs.mkdir()
    for r in records():
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r))
    out = runs.parent / "report.html"
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.fdsbench-installed", "report",
                        f"WORKDIR={runs.parent}", f"REPORT={out}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_report_is_self_contained(report):
    text = report.read_text()
    parser = Tags()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags
    srcs = [v for tag, k, v in parser.attrs if k in ("src", "href")]
    assert len(srcs) >= 4 and all(v.startswith("data:image/png;base64,") for v in srcs)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//)", text)
    for rid in (r["run_id"] for r in records()):
        assert rid in text  # provenance of every run
    assert "Provenance of every run" in text and "Incomplete runs" in text and "651463fa1333cbdb" in text
    assert "SOFS Table 3" in text and "paper Table 3" in text
    assert (report.parent / "report.csv").exists() and (report.parent / "report.jsonl").exists()


def test_empty_workdir_gives_a_page():
    assert "No run record" in build_report([])


def _console(html_file: Path) -> tuple[str, str]:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--dump-dom", html_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, "\n".join(line for line in r.stderr.splitlines() if "CONSOLE" in line)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_console_errors(report, tmp_path):
    bad = tmp_path / "bad.html"  # the check sees console errors when there are some
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('boom');</script></body></html>")
    assert "boom" in _console(bad)[1]
    dom, console = _console(report)
    assert "Provenance of every run" in dom and console == ""
