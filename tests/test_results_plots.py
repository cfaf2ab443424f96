"""Plots: one panel per dataset identity and shot (1-shot and 5-shot never in one point), complete runs
only, and the records they were drawn from written on the figure."""
import matplotlib
import pytest
from synthetic_records import make_record

from fdsbench.compare import compare
from fdsbench.papers import gfds_speed_references
from fdsbench.plots import fps_scatter, paired_difference, per_class_bars, size_buckets
from fdsbench.results import results_frame

matplotlib.use("Agg")


def texts(fig):
    return " ".join(t.get_text() for t in fig.texts)


@pytest.fixture(scope="module")
def frame():
    recs = [make_record("a", shot=s, seed=k, per_class={"o/1": 0.1 * s, "o/2": 0.2}) for s in (1, 5) for k in (0, 1)]
    recs.append(make_record("a", shot=1, seed=7, per_class={"o/1": 0.9}, episodes=1))  # incomplete
    recs.append(make_record("a", "folder", per_class={"o/1": 0.1}, dataset_hash="f" * 16))
    return results_frame(recs)


def test_fps_scatter_panels_and_records(frame):
    fig = fps_scatter(frame, metric="miou")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3 and sum("1-shot" in t for t in titles) == 2 and sum("5-shot" in t for t in titles) == 1
    foot = texts(fig)
    assert "Drawn from 5 run records" in foot and "seed7" not in foot  # the incomplete run is not drawn
    synth_1shot = next(ax for ax in fig.axes if ax.get_title().startswith("synthetic") and "1-shot" in ax.get_title())
    y = [line.get_ydata()[0] for line in synth_1shot.get_lines() if len(line.get_ydata())]
    assert y and abs(y[0] - 15.0) < 1e-9  # (10 + 20) / 2 %: the 1-shot runs alone
    matplotlib.pyplot.close("all")


def test_gfds_references_on_gfds_panels_only(frame):
    gfds = results_frame([make_record("sam2", "gfds", fold=2, per_class={"tile/a": 0.4})])
    fig = fps_scatter(gfds, references=gfds_speed_references())
    assert "GFDS Table 4" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    fig2 = fps_scatter(frame, references=gfds_speed_references())
    assert all(ax.get_legend() is None or "GFDS" not in str([t.get_text() for t in ax.get_legend().get_texts()])
               for ax in fig2.axes)
    matplotlib.pyplot.close("all")


def test_size_class_and_paired_plots(frame, tmp_path):
    path = size_buckets(frame, tmp_path / "s.png")
    assert path.stat().st_size > 5000
    fig = per_class_bars(frame)
    assert "mean\n(95 % CI)" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    recs = [make_record(m, per_class={"o/1": v, "o/2": v / 2}) for m, v in (("a", 0.4), ("b", 0.2))]
    (c,), _ = compare(recs, "a", "b", n_boot=200)
    fig = paired_difference(c.result, c.run_ids, c.title)
    assert "sign-flip p" in fig.axes[0].get_title() and "Drawn from 2 run records" in texts(fig)
    matplotlib.pyplot.close("all")
