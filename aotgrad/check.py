"""The checker run after every stage that makes a graph.

Note [Graph invariants]: every graph aotgrad builds is in topological order,
its placeholders all carry a role descriptor, and its single output node
returns a flat tuple whose length matches the output descriptors.  The
first (FX's ``Graph.lint``: topological order, well-formed nodes) walks every
node's arguments, about 2 ms of a CNN's first call; it runs under
``config.debug_assert``.  A graph out of order also fails when its code is
made or run (a name read before it is bound).
"""

from __future__ import annotations

import torch.fx as fx

from . import config
from .descriptors import DESC


def check_graph(gm: fx.GraphModule) -> None:
    graph = gm.graph
    if config.debug_assert:
        graph.lint()  # topological order, well-formed nodes
    for node in graph.find_nodes(op="placeholder"):
        if DESC not in node.meta:
            raise AssertionError(f"aotgrad: placeholder {node.name} has no role descriptor")
    out = graph.output_node()
    values = out.args[0]
    if not isinstance(values, (tuple, list)):
        raise AssertionError(f"aotgrad: the graph returns {type(values).__name__}, not a tuple")
    descs = out.meta.get(DESC)
    if descs is not None and len(descs) != len(values):
        raise AssertionError(
            f"aotgrad: the graph returns {len(values)} values but has {len(descs)} output "
            "descriptors")
