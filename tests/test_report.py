"""The HTML report from a synthetic store: one self-contained file with every section."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qsearch.leaderboard import leaderboard, load_experiments
from qsearch.report import _colors, _grid_html, _pareto, build_report
from tests.test_leaderboard import make_experiment, make_store


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    return build_report(make_store(root), root / "out" / "report.html")


def test_report_is_one_self_contained_file(report):
    text = report.read_text()
    assert report.is_file() and not any(p != report for p in report.parent.iterdir())
    images = re.findall(r"<img src=\"data:image/png;base64,", text)
    assert len(images) == 3  # Pareto, heatmap, progress
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    for strategy in ("uniform", "dualprecision", "random", "tpe"):
        assert strategy in text


def test_report_sections(report):
    text = report.read_text()
    assert "<h2>Leaderboard</h2>" in text and "<h2>DualPrecision grids</h2>" in text
    assert "depthwise \\ other bits" in text and "<td class=best>90.00%</td>" in text
    assert "class=flag" in text  # the off-size and the unretrained entries
    assert "<div class=cap>vs best: paired t-test on shared seeds" in text
    assert "<th>95% CI</th>" in text


def test_pareto_error_bars_are_the_95_percent_intervals(tmp_path):
    dirs = [make_experiment(tmp_path, "tpe", "32KB", None, 1.0, [0.90, 0.92, 0.91]),
            make_experiment(tmp_path, "random", "32KB", None, 1.0, [0.85])]  # n=1: no bar
    entries = leaderboard(load_experiments(dirs))
    fig, caption = _pareto(entries, _colors(["random", "tpe"]))
    assert "95% CI" in caption
    spans = sorted(tuple(sorted(seg[:, 1])) for c in fig.axes[0].containers
                   for coll in c.lines[2] for seg in coll.get_segments()
                   if len(seg) and np.isfinite(seg).all())
    e = next(e for e in entries if e["strategy"] == "tpe")
    assert spans == [pytest.approx((e["ci_low"], e["ci_high"]))]


def test_report_falls_back_to_search_accuracy(tmp_path):
    d = make_experiment(tmp_path, "tpe", "32KB", None)
    text = build_report([d], tmp_path / "r.html").read_text()
    assert "search validation accuracy (no final retrain)" in text


def test_grid_text_is_escaped():
    out = _grid_html({"table": [[0.5, "<script>x</script>"]], "row_bits": [2],
                      "col_bits": [1, 2]})
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "<td>50.00%</td>" in out


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}", f"--screenshot={shot}",
         "--window-size=1280,2400", report.as_uri()],
        check=True, capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few KB


def test_haq_reward_curve_is_drawn_from_its_summary(tmp_path):
    import json

    from qsearch.report import _rewards

    d = make_experiment(tmp_path, "haq", "32KB", None)
    means = [-0.02, 0.05, 0.11, 0.2]
    (d / "summary.json").write_text(json.dumps({"block": 10, "mean_reward_per_block": means}))
    fig, caption = _rewards(load_experiments([d]))
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [10, 20, 30, 40] and list(line.get_ydata()) == means
    assert "<h2>HAQ's reward curves</h2>" in build_report([d], tmp_path / "r.html").read_text()
    assert _rewards(load_experiments([make_experiment(tmp_path, "tpe", "32KB", None)])) is None
