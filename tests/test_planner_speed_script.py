"""benchmarks/planner_speed.py runs and writes its figures (a small joint:
the benchmark's timings are claimed in RESULTS.md, not asserted here)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_planner_speed_script_writes_its_rows(tmp_path):
    out = tmp_path / "speed.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planner_speed.py"),
                          "--blocks", "4", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["nodes"] > 100 and data["blocks"] == 4
    names = [r["variant"] for r in data["rows"]]
    assert names[:4] == ["aotgrad no budget", "aotgrad memory_budget=0.9",
                         "aotgrad memory_budget=0.7", "aotgrad memory_budget=0.5"]
    assert all(r["seconds"] >= 0 for r in data["rows"])
    assert "| aotgrad no budget |" in run.stdout
