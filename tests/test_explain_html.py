"""``aotgrad explain --html`` (aotgrad/report_html.py): the page's parts, its
numbers against the graphs', and (with chromium) what a browser renders."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from aotgrad.cli import main
from aotgrad.explain import PARETO_BUDGETS, explain, load_target, pareto_sweep
from aotgrad.report_html import render_html

REPO = Path(__file__).resolve().parent.parent
IDS = ("timeline", "pareto", "plan-table", "forward-graph", "backward-graph")


class Elements(HTMLParser):
    """Every start tag as (tag, attrs)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def by_class(self, cls: str) -> list[dict]:
        return [a for _, a in self.tags if cls in (a.get("class") or "").split()]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """``aotgrad explain tests._factories:make --html PATH --budget-bytes N``: (rc, path, text)."""
    path = tmp_path_factory.mktemp("html") / "report.html"
    rc, out, err = run_main(["explain", "tests._factories:make", "--repeat", "1",
                             "--html", str(path), "--budget-bytes", "4000"])
    assert rc == 0, err
    assert f"HTML report written to {path}" in out and "Pareto sweep" in out
    return rc, path, path.read_text()


def test_page_has_its_parts(page):
    _, _, text = page
    els = Elements(text)
    assert set(IDS) <= els.ids()
    assert len(els.by_class("budget-line")) >= 1
    for kind in ("saved", "recomputed", "offloaded"):   # in the legend even when nothing is
        assert els.by_class(f"legend-{kind}")


def test_self_contained(page):
    _, _, text = page
    assert "http" not in text
    els = Elements(text)
    assert not [a for t, a in els.tags if t in ("script", "link", "img", "iframe")
                and (a.get("src") or a.get("href"))]


def test_timeline_has_a_point_per_step():
    target = load_target("tests._factories:make")
    report = explain(target, repeat=0, budget_bytes=1000)
    els = Elements(render_html(report))
    (total,) = els.by_class("live-total")
    points = total["points"].split()
    assert len(points) == len(report.timeline.steps) > 0
    ys = [float(p.split(",")[1]) for p in points]
    live = report.timeline.live   # the highest step is drawn highest (smallest y)
    assert ys.index(min(ys)) == live.index(max(live))
    (line,) = [a for t, a in els.tags if t == "line" and "budget-line" in a.get("class", "")]
    assert line["y1"] == line["y2"]


def test_table_lists_saved_values_with_their_bytes():
    import aotgrad

    target = load_target("tests._factories:make")
    report = explain(target, repeat=0)
    rows = Elements(render_html(report)).by_class("plan-row")
    saved = {r["data-name"]: int(r["data-bytes"]) for r in rows if "saved" in r["class"].split()}
    # the forward graph's own meta: each value it returns for the backward
    assert list(saved) == [s.name for s in report.saved] and saved
    fw_nodes = {n.name: n for n in report.forward.nodes}
    for name, nbytes in saved.items():
        assert nbytes == fw_nodes[name].bytes
    # and those are the fake values' own bytes (numel * element_size) in the graph's meta
    model, (x,) = target.obj, target.inputs
    compiled = aotgrad.aot_module(model, aotgrad.nop, aotgrad.nop)
    compiled(x).sum().backward()
    fw = compiled._compiled.last_report.forward_graph
    part = compiled._compiled.last_report.partitioned
    for node in fw.graph.output_node().args[0][part.num_fwd_outputs:]:
        val = node.meta["val"]
        assert saved[node.name] == val.numel() * val.element_size()


def test_recomputed_rows_and_pareto_points():
    target = load_target("tests._factories:make")
    report = explain(target, partitioner="mincut", budget=0.0, repeat=0)
    report.pareto = pareto_sweep(target, report, budgets=(1.0, 0.0), repeat=1)
    assert [p.budget for p in report.pareto] == [1.0, 0.0]
    assert [p.chosen for p in report.pareto] == [False, True]   # reused, not recompiled
    els = Elements(render_html(report))
    recomputed = [r for r in els.by_class("plan-row") if "recomputed" in r["class"].split()]
    assert len(recomputed) == sum(report.recomputed.values()) > 0
    assert len(els.by_class("pareto-point")) == 2
    assert len(PARETO_BUDGETS) == 6


def test_inference_page():
    report = explain(load_target("tests._factories:make_inference"), repeat=0)
    assert {"timeline", "forward-graph", "backward-graph"} <= Elements(render_html(report)).ids()


def test_bad_html_arguments(tmp_path):
    rc, out, err = run_main(["explain", "tests._factories:make", "--html",
                             str(tmp_path / "no" / "such" / "dir.html")])
    assert rc == 2 and "cannot write the HTML report" in err and "no such directory" in err
    rc, _, err = run_main(["explain", "tests._factories:make", "--html", str(tmp_path)])
    assert rc == 2 and "it is a directory" in err
    rc, _, err = run_main(["explain", "tests._factories:make", "--pareto", "0.5,2"])
    assert rc == 2 and "--pareto budgets must be in [0, 1]" in err
    rc, _, err = run_main(["explain", "tests._factories:make", "--budget-bytes", "0"])
    assert rc == 2 and "--budget-bytes must be a positive" in err


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium not installed: apt-get install chromium (make test installs it)")


def test_browser_renders_it(page, tmp_path):
    browser = _chromium()
    _, path, _ = page
    png = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    env = dict(os.environ, HOME=str(tmp_path))
    subprocess.run([browser, *flags, f"--screenshot={png}", "--window-size=1400,2400",
                    path.as_uri()], capture_output=True, timeout=120, env=env)
    assert png.exists() and png.stat().st_size > 10_000
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # not blank: a blank page compresses to almost nothing; count distinct IDAT bytes too
    assert len(set(data[100:20_000])) > 200
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120, env=env).stdout
    els = Elements(dom)
    assert set(IDS) <= els.ids()
    assert els.by_class("budget-line") and els.by_class("live-total")
    assert els.by_class("gnode") and els.by_class("pareto-point")
