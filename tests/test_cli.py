"""Tests of ``aotgrad explain`` (aotgrad/cli.py, aotgrad/explain.py, aotgrad/models.py).

The built-in transformer is compiled once per module (a few seconds on CPU);
the other tests use the small factories of ``tests/_factories.py``, loaded the
way a user would: ``aotgrad explain tests._factories:NAME`` from the repo root.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aotgrad.cli import main
from aotgrad.explain import STAGES, explain, load_target, render

REPO = Path(__file__).resolve().parent.parent


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """``aotgrad explain --json PATH`` on the built-in transformer: (rc, stdout, json)."""
    path = tmp_path_factory.mktemp("explain") / "report.json"
    rc, out, _ = run_main(["explain", "--json", str(path)])
    return rc, out, json.loads(path.read_text())


def section(text: str, title: str) -> list[str]:
    """The lines of one report section (from its title to the next blank line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def table_rows(lines: list[str]) -> list[list[str]]:
    """Rows after the ``----`` rule of the table within ``lines``, split on 2+ spaces."""
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "})
    return [re.split(r"\s{2,}", line.strip()) for line in lines[rule + 1:]
            if line.startswith("  ")]


def test_builtin_matches_eager(builtin):
    rc, out, _ = builtin
    assert rc == 0
    assert "outputs match eager: yes" in out
    assert "gradients match eager: yes" in out
    assert "built-in transformer" in out


def test_builtin_node_counts(builtin):
    _, out, data = builtin
    counts = {row[0]: (int(row[1]), int(row[2])) for row in table_rows(section(out, "Graphs"))}
    assert set(counts) == {"forward", "backward"}
    for calls, total in counts.values():
        assert 0 < calls < total
    assert counts["forward"] == (data["forward"]["call_function"], data["forward"]["total"])
    assert counts["backward"] == (data["backward"]["call_function"], data["backward"]["total"])


def test_builtin_saved_total_is_sum_of_rows(builtin):
    _, out, data = builtin
    lines = section(out, "Saved for backward")
    rows = [r for r in table_rows(lines) if not r[0].startswith("memory")]
    *tensors, total = rows
    assert total[0] == "total"
    assert len(tensors) == len(data["saved"]) > 0
    assert int(total[-1]) == sum(int(r[4]) for r in tensors) == data["saved_bytes"] > 0
    assert f"{len(tensors)} tensors" in lines[0]
    for row, saved in zip(tensors, data["saved"]):
        assert row[1] == saved["name"]
        numel = math.prod(saved["shape"])
        assert saved["bytes"] == numel * torch.empty((), dtype=getattr(torch, saved["dtype"])).element_size()
    sources = {s["source"].split()[0] for s in data["saved"]}
    assert "activation" in sources and "param" in sources
    assert 0 < data["saved_activation_bytes"] <= data["saved_bytes"]


def test_builtin_stage_times(builtin):
    _, out, data = builtin
    assert list(data["stage_seconds"]) == list(STAGES)
    stages = [row[0] for row in table_rows(section(out, "Time"))]
    assert stages == [*STAGES, "total compile"]
    assert data["compile_seconds"] == pytest.approx(sum(data["stage_seconds"].values()))
    assert data["first_call_seconds"] > 0 and "first call" in out
    assert data["ok"] is True and data["mode"] == "training"


def test_user_module_factory():
    rc, out, err = run_main(["explain", "tests._factories:make", "--repeat", "0"])
    assert rc == 0, err
    assert "aot_module(" in out
    assert "outputs match eager: yes" in out
    assert "gradients match eager: yes (5 tensors compared)" in out  # 4 params + the input
    assert "param fc1.weight" in out or "view of param fc1.weight" in out


def test_user_function_factory_with_graphs():
    rc, out, err = run_main(["explain", "tests._factories:make_fn", "--graphs", "--repeat", "0"])
    assert rc == 0, err
    assert "aot_function(" in out
    assert "gradients match eager: yes (2 tensors compared)" in out
    assert "Forward graph" in out and "Backward graph" in out
    assert "def forward(self, primals_1" in out and "tangents_1" in out


def test_factory_from_file_path():
    rc, out, err = run_main(["explain", "tests/_factories.py:make_fn", "--repeat", "0"])
    assert rc == 0, err
    assert "outputs match eager: yes" in out


def test_inference_only():
    rc, out, err = run_main(["explain", "tests._factories:make_inference", "--repeat", "0"])
    assert rc == 0, err
    assert "mode         inference" in out
    assert "gradients match eager: n/a" in out
    assert "Saved for backward" not in out


def test_mismatch_exits_1():
    rc, out, _ = run_main(["explain", "tests._factories:make_mismatch", "--repeat", "0"])
    assert rc == 1
    assert "outputs match eager: NO" in out


@pytest.mark.parametrize("target, message", [
    ("tests._factories:nope", "has no attribute 'nope'"),
    ("tests._factories:not_callable", "not a callable factory"),
    ("tests._factories:make_bad_return", "must return (model_or_fn, example_inputs)"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("just_a_module", "not of the form MODULE:FACTORY"),
])
def test_bad_target(target, message):
    rc, out, err = run_main(["explain", target])
    assert rc == 2
    assert out == ""
    assert message in err and err.startswith("aotgrad explain: error:")


def test_mincut_partitioner():
    rc, out, err = run_main(["explain", "tests._factories:make", "--partitioner", "mincut",
                             "--repeat", "0"])
    assert rc == 0, err
    assert "partition_fn=mincut" in out and "gradients match eager: yes" in out


def test_report_api_separate_from_rendering():
    report = explain(load_target("tests._factories:make_fn"), repeat=0)
    assert report.ok and report.api == "aot_function"
    assert report.saved_bytes == sum(s.bytes for s in report.saved)
    assert json.loads(json.dumps(report.to_json()))["saved_bytes"] == report.saved_bytes
    text = render(report)
    assert text.startswith("aotgrad explain:") and "Backward graph" not in text


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "aotgrad", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_help():
    proc = _subprocess("explain", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "MODULE:FACTORY" in proc.stdout and "--partitioner" in proc.stdout


def test_python_m_missing_factory():
    proc = _subprocess("explain", "tests._factories:does_not_exist")
    assert proc.returncode == 2
    assert "has no attribute 'does_not_exist'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_budget_option_reports_recomputation():
    rc, out, err = run_main(["explain", "tests._factories:make", "--budget", "0", "--repeat", "0"])
    assert rc == 0, err
    assert "activation_memory_budget=0.0" in out and "partition_fn=mincut" in out
    assert "Recomputed in backward:" in out and "gradients match eager: yes" in out
    rc, out, _ = run_main(["explain", "tests._factories:make", "--repeat", "0"])
    assert "Recomputed in backward: nothing" in out   # default partition recomputes nothing
    rc, out, err = run_main(["explain", "tests._factories:make", "--budget", "1.5"])
    assert rc == 2 and "--budget must be in [0, 1]" in err


def test_policy_option():
    rc, out, err = run_main(["explain", "tests._factories:make", "--repeat", "0",
                             "--policy", "tests._factories:recompute_mm_policy"])
    assert rc == 0, err
    assert "partition_fn=policy tests._factories:recompute_mm_policy" in out
    assert "addmm.default x" in out and "gradients match eager: yes" in out
    rc, _, err = run_main(["explain", "tests._factories:make", "--policy", "tests._factories:make"])
    assert rc == 2 and "not an aotgrad.MemoryPolicy" in err


def test_builtin_peak_estimates(builtin):
    _, out, data = builtin
    lines = section(out, "Peak memory")
    assert lines[1].split()[0] == "forward" and lines[2].split()[0] == "backward"
    # the forward's values include everything it saves, alive at its end
    assert data["forward_peak_bytes"] >= data["saved_activation_bytes"] > 0
    assert data["backward_peak_bytes"] >= data["saved_activation_bytes"]


def test_step_timeline_by_hand():
    """Note [Peak of a step], by hand: each storage counted once, from the
    step that makes it to its last use (the input from the start)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from aotgrad.partition.peak import step_timeline

    x = torch.randn(8, 16)          # 512 bytes per value of its size
    gm = make_fx(lambda x: (((x * 2) + 1).sum(),), tracing_mode="fake")(x)
    assert step_timeline(gm, None).live == [1024, 1536, 1028]   # x, mul, add; then add, sum
    gm = make_fx(lambda x: ((x * 2).view(-1).t().sum(),), tracing_mode="fake")(x)
    assert step_timeline(gm, None).peak == 1028    # the views share mul's storage
