"""Compilers for looking at graphs: ``print_compile``, ``draw_graph_compile``,
``debug_compile``, and ``draw_graph`` itself (the names PyTorch's compile helpers
users import).

Each takes ``(gm, example_inputs)`` like any compiler and returns something
that runs the graph; they only add a side effect: the graph's code printed,
drawn to a file (Graphviz through ``pydot``, optional), or written to a
folder with a script that runs it again.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import config
from .compile import get_aot_graph_name, make_boxed_compiler

__all__ = ["print_compile", "draw_graph", "draw_graph_compile", "debug_compile"]


@make_boxed_compiler
def print_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Print the graph's code, then run it as it is."""
    print(gm.code)
    return gm


def _graph_drawer() -> Any:
    try:
        import pydot  # noqa: F401
    except ImportError:
        raise ImportError(
            "aotgrad.draw_graph needs the pydot package (and Graphviz's `dot` program for "
            "image formats): pip install pydot, or draw to a .dot file with another tool "
            "from gm.graph.") from None
    from torch.fx.passes.graph_drawer import FxGraphDrawer
    return FxGraphDrawer


def draw_graph(traced: fx.GraphModule, fname: str, figname: str = "fx_graph",
               clear_meta: bool = True, prog: str | list[str] | None = None,
               parse_stack_trace: bool = False, dot_graph_shape: str | None = None) -> None:
    """Draw ``traced`` to ``fname``; without an extension, in
    ``config.torch_compile_graph_format`` (``svg``).  ``.dot`` (or ``.raw``)
    writes the DOT source itself, no Graphviz needed.  ``clear_meta`` drops
    the nodes' metadata (fake values, stack traces) from the labels."""
    drawer = _graph_drawer()
    if clear_meta:
        traced = fx.GraphModule(traced, copy.deepcopy(traced.graph))
        for node in traced.graph.nodes:
            node.meta = {}
    base, ext = os.path.splitext(fname)
    if not ext:
        ext = "." + getattr(config, "torch_compile_graph_format", "svg")
    dot = drawer(traced, figname, parse_stack_trace=parse_stack_trace,
                 dot_graph_shape=dot_graph_shape).get_main_dot_graph()
    path, fmt = f"{base}{ext}", ext.lstrip(".")
    if fmt in ("dot", "raw"):
        dot.write(path)
        return
    write = getattr(dot, "write_" + fmt, None)
    if write is None:
        raise ValueError(f"aotgrad.draw_graph: pydot cannot write {fmt!r} files; use .svg, "
                         ".png, .pdf or .dot")
    if prog is None:
        write(path)
    else:
        write(path, prog=prog)


def _draw_graph_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], name: str,
                        clear_meta: bool = True) -> fx.GraphModule:
    print(gm.code)
    draw_graph(gm, name, clear_meta=clear_meta)
    return gm


def draw_graph_compile(name: str) -> Callable:
    """A compiler that prints each graph and draws it to the file ``name``."""
    return make_boxed_compiler(functools.partial(_draw_graph_compile, name=name))


def debug_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Write the graph to a folder as a module (``GraphModule.to_folder``),
    print a script that runs it on random inputs of the example inputs'
    shapes, dtypes and devices (to bisect a failure outside the model), and
    compile it with ``ts_compile``."""
    from .compilers import ts_compile

    folder = tempfile.mkdtemp(prefix=get_aot_graph_name().replace("/", "_") + "_")
    gm.to_folder(folder, "FxModule")
    args = ", ".join(_example_source(x) for x in example_inputs)
    print(f"""
# aotgrad.debug_compile: the graph is in {folder}; this runs it again
import sys, torch
sys.path.insert(0, {os.path.dirname(folder)!r})
from {os.path.basename(folder)} import FxModule
print(FxModule()({args}))
""")
    return ts_compile(gm, example_inputs)


def _example_source(x: Any) -> str:
    """Source making a random tensor like example input ``x``."""
    if not isinstance(x, torch.Tensor):
        return repr(int(x) if isinstance(x, torch.SymInt) else x)
    shape = tuple(int(d) for d in x.shape)
    make = "torch.randn" if x.dtype.is_floating_point or x.dtype.is_complex else "torch.zeros"
    return f"{make}({shape!r}, dtype={x.dtype}, device={str(x.device)!r})"
