"""The debugging compilers and names functorch.compile users import (issue 17,
point 7), each against eager."""

import logging
import re
import sys

import pytest
import torch

import aotgrad
from aotgrad import aot_function, debug_compile, draw_graph, draw_graph_compile, print_compile


def f(x, y):
    return (x * y).sin().sum()


def _args():
    return torch.randn(3, requires_grad=True), torch.randn(3)


def _check_against_eager(compiled):
    x, y = _args()
    out = compiled(x, y)
    out.backward()
    torch.testing.assert_close(out, f(x, y))
    torch.testing.assert_close(x.grad, (y * (x * y).cos()).detach())


def test_print_compile_prints_each_graph(capsys):
    _check_against_eager(aot_function(f, print_compile))
    printed = capsys.readouterr().out
    assert "def forward(self, primals_1, primals_2)" in printed
    assert "torch.ops.aten.sin.default" in printed and "torch.ops.aten.cos.default" in printed


def test_draw_graph_without_pydot_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)  # import pydot raises ImportError
    gm = torch.fx.symbolic_trace(lambda x: x.relu() + 1)
    with pytest.raises(ImportError, match="needs the pydot package"):
        draw_graph(gm, str(tmp_path / "g.dot"))
    with pytest.raises(ImportError, match="needs the pydot package"):
        _check_against_eager(aot_function(f, draw_graph_compile(str(tmp_path / "g"))))


def test_draw_graph(tmp_path, capsys):
    pytest.importorskip("pydot", reason="pydot is in the test extras (pyproject.toml)")
    gm = torch.fx.symbolic_trace(lambda x: x.relu() + 1)
    draw_graph(gm, str(tmp_path / "g.dot"))
    assert "relu" in (tmp_path / "g.dot").read_text()
    _check_against_eager(aot_function(f, draw_graph_compile(str(tmp_path / "h.dot"))))
    assert "mul" in (tmp_path / "h.dot").read_text()  # the backward, drawn last


def test_debug_compile_writes_a_graph_that_runs_again(capsys):
    _check_against_eager(aot_function(f, debug_compile))
    script = capsys.readouterr().out.split("# aotgrad.debug_compile")[1]
    folder = re.search(r"the graph is in (\S+);", script).group(1)
    namespace: dict = {}
    exec(compile("#" + script, "<debug_compile script>", "exec"), namespace)  # noqa: S102
    assert folder


def test_enable_log(caplog):
    with caplog.at_level(logging.DEBUG, logger="aotgrad.graphs"):
        _check_against_eager(aot_function(f, aotgrad.nop))
        logged = [r.getMessage() for r in caplog.records if r.name == "aotgrad.graphs"]
        assert len(logged) == 2 and re.match(r"model__\d+_forward_\d+\n", logged[0])
        assert "torch.ops.aten.cos.default" in logged[1]
        caplog.clear()
        _check_against_eager(aot_function(f, aotgrad.nop, enable_log=False))
        assert not [r for r in caplog.records if r.name == "aotgrad.graphs"]


def test_graph_name_while_compiling():
    names = []

    def compiler(gm, _):
        names.append(aotgrad.get_aot_graph_name())
        assert aotgrad.get_graph_being_compiled() == names[-1]
        return gm

    _check_against_eager(aot_function(f, compiler))
    assert re.fullmatch(r"model__(\d+)_forward_\d+", names[0])
    program = names[0].split("__")[1].split("_")[0]
    assert re.fullmatch(rf"model__{program}_backward_\d+", names[1])
