"""``aotgrad explain``: compile one training step and show what aotgrad made of it.

The command answers the questions a user has about a compiled program before
trusting it: *is it right?* (outputs and every gradient against eager, on the
same inputs), *what did it trace?* (forward/backward graph sizes, optionally
their code), *what does it keep alive?* (each tensor the forward saves for the
backward, with its bytes — the activation memory the partitioner decided on)
and *where did the time go?* (``CompileReport.stage_seconds`` per pipeline
stage, the first call, warm steps against eager).  It also keeps the step's
memory timeline (Note [Peak of a step], ``aotgrad/partition/peak.py``), the
plan (what is saved, recomputed, offloaded) and, from ``pareto_sweep``, one
point per plan of a sweep of budgets: what ``aotgrad.report_html`` draws.

Computing and printing are separate: ``explain()`` returns an
``ExplainReport`` (plain numbers, JSON-ready via ``to_json()``), and
``render()`` turns one into text (``aotgrad.report_html.render_html`` into a page).  ``load_target()`` resolves what to explain:
the built-in transformer (``aotgrad.models``) or a user factory
``MODULE:FACTORY`` returning ``(model_or_fn, example_inputs)``.

A training step is: call the compiled program, reduce its output to a scalar
loss (the output itself when it is a scalar, else the sum of the sums of its
floating-point tensors that require grad), and run the backward.  Modules go
through ``aot_module`` (parameters and buffers lifted to graph inputs),
functions through ``aot_function``; both with the ``nop`` compiler, so the
graphs that run are exactly the graphs shown.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from . import config
from ._torch import StorageWeakRef, new_fake_mode, pytree, storage_of
from .api import AOTFunction, aot_function, aot_module
from .compile import nop
from .descriptors import DESC, Primal, Tangent
from .flatten import flatten_inputs
from .partition import MemoryPolicy
from .partition.copies import timeline as copies_timeline
from .partition.peak import Timeline
from .partition.problem import recompute_cost
from .pipeline import CompileReport
from .explain_target import BUILTIN, PARTITIONERS, ExplainError, Target, load_policy, \
    load_target, resolve_partitioner  # noqa: F401 (re-exported for the CLI)

STAGES = ("flatten", "analyze", "trace", "partition", "compile", "runtime")
# the Pareto sweep's default: activation_memory_budget with the min-cut partitioner
PARETO_BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.1, 0.0)


# ---------------------------------------------------------------- the report


@dataclass
class GraphNode:
    """One node of a graph, for drawing it (``aotgrad.report_html``)."""
    name: str
    op: str                       # placeholder, call_function, output, get_attr
    target: str                   # the op's name (``mm.default``), or the placeholder's
    inputs: list[str]             # names of the nodes it reads, in this graph
    kind: str                     # input, activation, output, saved, offloaded (forward);
                                  # saved, tangent, temporary, recomputed, reloaded, gradient
                                  # (backward); view (shares an earlier storage); return
                                  # (the output node); "" (not a tensor)
    bytes: int = 0                # numel * element_size of its value (0: not a tensor)
    shape: list | None = None


@dataclass
class GraphStats:
    call_function: int            # nodes that compute (ATen ops, getitem)
    total: int                    # all nodes, placeholders and output included
    code: str                     # the graph as readable Python
    nodes: list[GraphNode] = field(default_factory=list)


@dataclass
class SavedTensor:
    name: str                     # the node name in the forward graph
    shape: list[int] | None       # None for a saved symbolic int
    dtype: str
    bytes: int                    # numel * element_size (0 for a symbolic int)
    source: str                   # "activation", or "param NAME" / "buffer NAME" / "arg PATH"
    alias_of: str | None = None   # a graph input or an earlier saved tensor sharing its storage
    storage_bytes: int = 0        # bytes of the storage it keeps alive


@dataclass
class Check:
    checked: int                  # how many tensors were compared
    match: bool | None            # None: nothing to compare (e.g. no gradients)
    detail: str = ""              # the first mismatch, when there is one


@dataclass
class PlanRow:
    """One value of the plan: what the partitioner decided for it."""
    decision: str                 # "saved", "recomputed" or "offloaded"
    name: str                     # its node: in the forward (saved, offloaded) or backward
    op: str
    shape: list | None
    dtype: str
    bytes: int                    # numel * element_size of the node's value
    note: str = ""                # where a saved value comes from (SavedTensor.source)


@dataclass
class ParetoPoint:
    """One plan of the Pareto sweep (``pareto_sweep``)."""
    budget: float | None          # its activation_memory_budget (None: none set)
    partitioner: str
    peak_bytes: int               # Timeline.peak of its step
    warm_step_seconds: float | None
    saved_activation_bytes: int
    recomputed_ops: int           # forward ops its backward runs again
    ok: bool                      # outputs and gradients match eager
    chosen: bool = False          # the plan the report explains


@dataclass
class ExplainReport:
    target: str                   # what was compiled (``MODULE:FACTORY``)
    description: str
    api: str                      # "aot_module" or "aot_function"
    partitioner: str
    torch_version: str
    mode: str                     # "training" (forward + backward) or "inference"
    forward: GraphStats
    backward: GraphStats | None
    saved: list[SavedTensor]
    stage_seconds: dict[str, float]
    setup_seconds: float          # one-time torch setup paid before compiling (see explain())
    first_call_seconds: float     # the first compiled call: compile + forward
    first_backward_seconds: float | None
    warm_step_seconds: float | None    # median compiled step (forward + backward) after compiling
    eager_step_seconds: float | None   # median eager step, same inputs
    outputs: Check
    gradients: Check
    num_graph_inputs: int = 0
    budget: float | None = None   # activation_memory_budget, when one was set
    recomputed: dict[str, int] = field(default_factory=dict)  # forward op -> times the
                                                              # backward recomputes it
    tracing: str = ""             # CompileReport.tracing
    # estimated peaks (Note [Peak of a step]): the most bytes live over the
    # forward's steps, and over the backward's (parameters and inputs included);
    # None for inference
    forward_peak_bytes: int | None = None
    backward_peak_bytes: int | None = None
    timeline: Timeline | None = None     # the step's memory, node by node
    plan: list[PlanRow] = field(default_factory=list)
    budget_bytes: int | None = None      # a peak in bytes to show against (drawn only)
    pareto: list[ParetoPoint] = field(default_factory=list)   # pareto_sweep, when run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        return sum(s.bytes for s in self.saved)

    @property
    def saved_activation_bytes(self) -> int:
        """Memory the backward keeps alive beyond the graph inputs: the storages of
        saved activations, each counted once (views of inputs and of other saved
        tensors cost nothing more)."""
        return sum(s.storage_bytes for s in self.saved
                   if s.source == "activation" and s.alias_of is None)

    @property
    def compile_seconds(self) -> float:
        return sum(self.stage_seconds.values())

    @property
    def ok(self) -> bool:
        return self.outputs.match is not False and self.gradients.match is not False

    @property
    def peak_bytes(self) -> int | None:
        return self.timeline.peak if self.timeline is not None else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["timeline"] = timeline_json(self.timeline)
        data.update(peak_bytes=self.peak_bytes, saved_bytes=self.saved_bytes,
                    saved_activation_bytes=self.saved_activation_bytes,
                    compile_seconds=self.compile_seconds, ok=self.ok)
        return data


def timeline_json(tl: Timeline | None) -> dict[str, Any] | None:
    if tl is None:
        return None
    return {"steps": list(tl.steps), "live": tl.live, "peak": tl.peak,
            "peak_step": tl.peak_step, "num_forward_steps": tl.num_forward_steps,
            "buffers": [dataclasses.asdict(b) for b in tl.buffers]}


# ---------------------------------------------------------------- running it


def explain(target: Target, partitioner: str = "default", repeat: int = 3,
            budget: float | None = None, policy: MemoryPolicy | None = None,
            policy_name: str = "policy", budget_bytes: int | None = None) -> ExplainReport:
    """Compile ``target``'s training step, run it beside eager, and measure
    (under ``config.activation_memory_budget = budget`` when given; with
    ``policy`` as the partitioner when given).  ``budget_bytes`` is only
    recorded, to show the step's peak against."""
    partition_fn = policy if policy is not None else resolve_partitioner(partitioner)
    label = policy_name if policy is not None else partitioner
    if budget is None:
        report = _explain(target, partition_fn, label, repeat)
    else:
        with config.patch(activation_memory_budget=budget):
            report = _explain(target, partition_fn, label, repeat)
        report.budget = budget
    report.budget_bytes = budget_bytes
    return report


def pareto_sweep(target: Target, report: ExplainReport | None = None,
                 budgets: Iterable[float] = PARETO_BUDGETS, repeat: int = 3) -> list[ParetoPoint]:
    """One point per plan: ``target`` compiled with the min-cut partitioner under
    each ``activation_memory_budget`` of ``budgets``, each checked against eager
    and timed (``repeat`` warm steps).  ``report``, the plan being explained,
    is one of the points (marked ``chosen``), reused when it is one of the sweep's."""
    points = []
    for b in budgets:
        if report is not None and report.partitioner == "mincut" and report.budget == b:
            r = report
        else:
            obj = target.obj
            if isinstance(obj, nn.Module):  # a fresh copy: no gradients, no state of earlier runs
                obj = _copy_module(obj)
                for p in obj.parameters():
                    p.grad = None
            r = explain(Target(obj, target.inputs, target.name, target.description),
                        partitioner="mincut", repeat=repeat, budget=b)
        points.append(_pareto_point(r, chosen=r is report))
    if report is not None and not any(p.chosen for p in points):
        points.append(_pareto_point(report, chosen=True))
    return points


def _pareto_point(r: ExplainReport, chosen: bool) -> ParetoPoint:
    return ParetoPoint(r.budget, r.partitioner, r.peak_bytes or 0, r.warm_step_seconds,
                       r.saved_activation_bytes, sum(r.recomputed.values()), r.ok, chosen)


def _explain(target: Target, partition_fn: Callable, partitioner: str,
             repeat: int) -> ExplainReport:
    obj, is_module = target.obj, isinstance(target.obj, nn.Module)
    eager_obj = _copy_module(obj) if is_module else obj
    if is_module:
        compiled = aot_module(obj, nop, nop, partition_fn=partition_fn)
        aot_fn: AOTFunction = compiled._compiled
    else:
        compiled = aot_fn = aot_function(obj, nop, nop, partition_fn=partition_fn)

    # The first fake-tensor mode of a process costs ~1 s of one-time imports and
    # setup (ShapeEnv, sympy); pay it here so that stage times are per compile.
    t0 = time.perf_counter()
    new_fake_mode(False)
    setup = time.perf_counter() - t0

    eager_in = _fresh(target.inputs)
    eager_out = eager_obj(*eager_in)
    eager_loss = _loss(eager_out)
    if eager_loss is not None:
        eager_loss.backward()

    comp_in = _fresh(target.inputs)
    t0 = time.perf_counter()
    comp_out = compiled(*comp_in)
    first_call = time.perf_counter() - t0
    comp_loss = _loss(comp_out)
    first_bw = None
    if comp_loss is not None:
        t0 = time.perf_counter()
        comp_loss.backward()
        first_bw = time.perf_counter() - t0

    report = aot_fn.last_report
    if report is None or report.forward_graph is None:
        raise RuntimeError("aotgrad explain: the compiled call left no CompileReport")
    outputs = _compare_outputs(eager_out, comp_out)
    grads = _compare_grads(_grads(eager_obj, eager_in, is_module), _grads(obj, comp_in, is_module))
    labels = _input_labels(obj, target.inputs, is_module)

    warm = eager = None
    if repeat > 0:
        warm = _median_step(compiled, target.inputs, repeat)
        eager = _median_step(eager_obj, target.inputs, repeat)

    part = report.partitioned
    fw_gm, bw_gm = report.forward_graph, report.backward_graph if part is not None else None
    recomputed = recomputed_names(fw_gm, bw_gm)
    timeline, _ = copies_timeline(fw_gm, bw_gm, recomputed, recompute_cost)
    live, nf = timeline.live, timeline.num_forward_steps
    saved = saved_tensors(report, labels)
    return ExplainReport(
        target=target.name, description=target.description,
        api="aot_module" if is_module else "aot_function", partitioner=partitioner,
        torch_version=torch.__version__,
        mode="training" if part is not None else "inference",
        forward=graph_stats(fw_gm, forward_kinds(fw_gm, part.num_fwd_outputs if part else None)),
        backward=graph_stats(bw_gm, backward_kinds(bw_gm, recomputed)) if bw_gm else None,
        saved=saved,
        recomputed=recomputed_ops(report.forward_graph, report.backward_graph)
        if part is not None else {},
        stage_seconds={s: report.stage_seconds[s] for s in STAGES if s in report.stage_seconds},
        setup_seconds=setup, first_call_seconds=first_call, first_backward_seconds=first_bw,
        warm_step_seconds=warm, eager_step_seconds=eager,
        outputs=outputs, gradients=grads, num_graph_inputs=len(labels),
        tracing=report.tracing,
        forward_peak_bytes=max(live[:nf], default=0) if bw_gm else None,
        backward_peak_bytes=max(live[nf:], default=0) if bw_gm else None,
        timeline=timeline,
        plan=plan_rows(fw_gm, bw_gm, saved, recomputed) if bw_gm else [])


def graph_stats(gm: fx.GraphModule, kinds: dict[str, str] | None = None) -> GraphStats:
    """Sizes and code of ``gm``, and its nodes to draw (coloured by ``kinds``,
    node name -> kind; a tensor sharing an earlier node's storage is a view)."""
    nodes = list(gm.graph.nodes)
    code = "\n".join(line for line in gm.print_readable(print_output=False).splitlines()
                     if line.strip() != "# No stacktrace found for following nodes")
    kinds = kinds or {}
    drawn, seen = [], set()
    for n in nodes:
        val, kind = n.meta.get("val"), kinds.get(n.name, "")
        if isinstance(val, torch.Tensor):
            key = storage_of(val)
            if key in seen and kind in ("", "activation", "temporary"):
                kind = "view"
            seen.add(key)
        elif n.op == "call_function" and kind in ("activation", "temporary"):
            kind = ""
        drawn.append(GraphNode(n.name, n.op, _op_name(n), [a.name for a in n.all_input_nodes],
                               "return" if n.op == "output" else kind, _nbytes(val),
                               _shape(val)))
    return GraphStats(sum(1 for n in nodes if n.op == "call_function"), len(nodes), code, drawn)


def _op_name(n: fx.Node) -> str:
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    return str(n.target)


def _is_op(n: fx.Node, qualified: str) -> bool:
    """``n`` calls the op ``namespace.name`` (any overload)."""
    return n.op == "call_function" and str(n.target).startswith(qualified + ".")


def _nbytes(val: Any) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    try:
        return int(val.numel()) * val.element_size()
    except (TypeError, RuntimeError):  # an unbacked size
        return 0


def _shape(val: Any) -> list | None:
    if not isinstance(val, torch.Tensor):
        return None
    return [int(s) if isinstance(s, int) else str(s) for s in val.shape]


def forward_kinds(fw_gm: fx.GraphModule, num_fwd_outputs: int | None) -> dict[str, str]:
    """Node name -> its kind in the forward (see ``GraphNode.kind``)."""
    outputs = list(fw_gm.graph.output_node().args[0])
    n_out = len(outputs) if num_fwd_outputs is None else num_fwd_outputs
    kinds = {}
    for n in fw_gm.graph.nodes:
        if n.op == "placeholder":
            kinds[n.name] = "input"
        elif n.op == "call_function":
            kinds[n.name] = "activation"
    for k, v in enumerate(outputs):
        if isinstance(v, fx.Node) and v.op == "call_function":
            kinds[v.name] = "output" if k < n_out else "saved"
    for n in fw_gm.graph.nodes:
        if _is_op(n, "aotgrad.offload"):
            kinds[n.name] = "offloaded"
            if isinstance(n.args[0], fx.Node) and n.args[0].op != "placeholder":
                kinds[n.args[0].name] = "offloaded"
    return kinds


def backward_kinds(bw_gm: fx.GraphModule, recomputed: frozenset[str]) -> dict[str, str]:
    """Node name -> its kind in the backward (see ``GraphNode.kind``)."""
    kinds = {}
    for n in bw_gm.graph.nodes:
        if n.op == "placeholder":
            kinds[n.name] = "tangent" if isinstance(n.meta.get(DESC), Tangent) else "saved"
        elif n.op == "call_function":
            kinds[n.name] = "reloaded" if _is_op(n, "aotgrad.reload") else \
                "recomputed" if n.name in recomputed else "temporary"
    for a in bw_gm.graph.output_node().args[0]:
        if isinstance(a, fx.Node) and a.op == "call_function":
            kinds[a.name] = "gradient"
    return kinds


def recomputed_names(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule | None) -> frozenset[str]:
    """Backward nodes that recompute forward values: both graphs come from one
    joint graph and keep its node names."""
    if bw_gm is None:
        return frozenset()
    in_forward = {n.name for n in fw_gm.graph.nodes if n.op == "call_function"}
    return frozenset(n.name for n in bw_gm.graph.nodes
                     if n.op == "call_function" and n.name in in_forward)


def plan_rows(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, saved: list[SavedTensor],
              recomputed: frozenset[str]) -> list[PlanRow]:
    """What is saved (``saved``, in order), offloaded (a saved value copied out
    by ``aotgrad::offload``: the value it copies) and recomputed (backward nodes)."""
    fw = {n.name: n for n in fw_gm.graph.nodes}
    rows = []
    for s in saved:
        n = fw.get(s.name)
        if n is not None and _is_op(n, "aotgrad.offload") and isinstance(n.args[0], fx.Node):
            v = n.args[0]
            rows.append(PlanRow("offloaded", v.name, _op_name(v), _shape(v.meta.get("val")),
                                s.dtype, _nbytes(v.meta.get("val")), f"CPU copy {s.name}"))
        else:
            rows.append(PlanRow("saved", s.name, _op_name(n) if n is not None else "", s.shape,
                                s.dtype, s.bytes, _source(s)))
    for n in bw_gm.graph.nodes:
        if n.name in recomputed and n.op == "call_function":
            val = n.meta.get("val")
            rows.append(PlanRow("recomputed", n.name, _op_name(n), _shape(val),
                                str(getattr(val, "dtype", "")).removeprefix("torch."),
                                _nbytes(val)))
    return rows


def recomputed_ops(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule) -> dict[str, int]:
    """Forward ops the backward runs again (``recomputed_names``), by op name."""
    names = recomputed_names(fw_gm, bw_gm)
    counts: dict[str, int] = {}
    for n in bw_gm.graph.nodes:
        if n.op == "call_function" and n.name in names:
            counts[_op_name(n)] = counts.get(_op_name(n), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def saved_tensors(report: CompileReport, labels: list[str]) -> list[SavedTensor]:
    """The values the forward graph returns for the backward, in order.

    A saved tensor whose storage is a graph input's (the input itself, or a
    view such as a transposed weight) is labelled with that input; one that
    shares storage with an earlier saved tensor names it in ``alias_of``.
    Storages are compared on the fake tensors in ``node.meta["val"]``.
    """
    part = report.partitioned
    if part is None:
        return []
    graph = report.forward_graph.graph
    owner: dict[StorageWeakRef, str] = {}
    for node in graph.find_nodes(op="placeholder"):
        desc, val = node.meta.get(DESC), node.meta.get("val")
        if isinstance(desc, Primal) and isinstance(val, torch.Tensor) and desc.index < len(labels):
            owner.setdefault(storage_of(val), labels[desc.index])
    inputs = set(owner.values())
    rows = []
    for node in graph.output_node().args[0][part.num_fwd_outputs:]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            rows.append(SavedTensor(node.name, None, type(val).__name__, 0, "activation"))
            continue
        storage = storage_of(val)
        first = owner.setdefault(storage, node.name)
        if first in inputs:
            source = first if node.op == "placeholder" else f"view of {first}"
            alias = None if node.op == "placeholder" else first
        else:
            source, alias = "activation", (None if first == node.name else first)
        rows.append(SavedTensor(node.name, [int(s) for s in val.shape],
                                str(val.dtype).removeprefix("torch."),
                                int(val.numel()) * val.element_size(), source, alias,
                                int(val.untyped_storage().nbytes())))
    return rows


def _input_labels(obj: Any, inputs: tuple, is_module: bool) -> list[str]:
    """A readable name per graph input, in graph-input order (as ``flatten`` decides)."""
    names: dict[int, str] = {}
    if is_module:
        params = dict(obj.named_parameters(remove_duplicate=False))
        buffers = dict(obj.named_buffers(remove_duplicate=False))
        for n, t in params.items():
            names.setdefault(id(t), f"param {n}")
        for n, t in buffers.items():
            names.setdefault(id(t), f"buffer {n}")
        args: tuple = (params, buffers, *inputs)
    else:
        args = inputs
    for path, leaf in pytree.tree_flatten_with_path(tuple(inputs))[0]:
        if isinstance(leaf, torch.Tensor):
            names.setdefault(id(leaf), f"arg{pytree.keystr(path)}")
    leaves, spec = pytree.tree_flatten((args, {}))
    flat = flatten_inputs(leaves, spec, 0)
    return [names.get(id(leaves[i]), f"graph input {k}") for k, i in enumerate(flat.graph_leaf)]


def _copy_module(mod: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(mod)
    except Exception as e:
        raise ExplainError(f"cannot deep-copy {type(mod).__name__} to run it eagerly beside "
                           f"the compiled one: {e}") from e


def _fresh(inputs: tuple) -> tuple:
    """Independent copies of the example inputs (same tensor passed twice stays one)."""
    memo: dict[int, torch.Tensor] = {}

    def fresh(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in memo:
            memo[id(x)] = x.detach().clone().requires_grad_(x.requires_grad)
        return memo[id(x)]

    return pytree.tree_map(fresh, inputs)


def _loss(out: Any) -> torch.Tensor | None:
    """The scalar to differentiate: the output if scalar, else the sum of sums."""
    if isinstance(out, torch.Tensor) and out.dim() == 0 and out.requires_grad:
        return out
    parts = [t.sum() for t in pytree.tree_leaves(out)
             if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
    return sum(parts[1:], parts[0]) if parts else None


def _compare_outputs(expected: Any, actual: Any) -> Check:
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    if exp_spec != act_spec:
        return Check(0, False, f"output structure differs: eager {exp_spec}, compiled {act_spec}")
    checked = 0
    for k, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        if isinstance(e, torch.Tensor):
            checked += 1
            detail = _close(a, e, f"output {k}")
            if detail:
                return Check(checked, False, detail)
        elif e != a:
            return Check(checked, False, f"output {k}: eager {e!r}, compiled {a!r}")
    return Check(checked, True)


def _grads(obj: Any, inputs: tuple, is_module: bool) -> dict[str, torch.Tensor | None]:
    grads: dict[str, torch.Tensor | None] = {}
    if is_module:
        grads.update((f"param {n}", p.grad) for n, p in obj.named_parameters()
                     if p.requires_grad)
    for path, leaf in pytree.tree_flatten_with_path(inputs)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            grads[f"arg{pytree.keystr(path)}"] = leaf.grad
    return grads


def _compare_grads(expected: dict, actual: dict) -> Check:
    if not expected:
        return Check(0, None, "nothing requires grad")
    checked = 0
    for name, e in expected.items():
        a = actual.get(name)
        checked += 1
        if (e is None) != (a is None):
            return Check(checked, False, f"grad of {name}: eager {'None' if e is None else 'a tensor'}"
                         f", compiled {'None' if a is None else 'a tensor'}")
        detail = _close(a, e, f"grad of {name}") if e is not None else ""
        if detail:
            return Check(checked, False, detail)
    return Check(checked, True)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError as e:
        return f"{what}: " + " ".join(str(e).split())
    return ""


def _median_step(fn: Callable, inputs: tuple, repeat: int) -> float:
    """Median wall time of forward + loss + backward, ``repeat`` times."""
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
    times = []
    for _ in range(repeat):
        for p in params:
            p.grad = None
        args = _fresh(inputs)
        t0 = time.perf_counter()
        loss = _loss(fn(*args))
        if loss is not None:
            loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- rendering


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:8.1f} ms" if s < 1 else f"{s:9.3f} s"


def _table(header: list[str], rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _check_line(label: str, check: Check) -> str:
    if check.match is None:
        return f"  {label}: n/a ({check.detail})"
    if check.match:
        return f"  {label}: yes ({_plural(check.checked, 'tensor')} compared)"
    return f"  {label}: NO ({check.detail})"


def _source(s: SavedTensor) -> str:
    if s.source == "activation" and s.alias_of is not None:
        return f"activation, storage of {s.alias_of}"
    return s.source


def render(report: ExplainReport, graphs: bool = False) -> str:
    """The report as text, for a terminal."""
    title = f"aotgrad explain: {report.description}"
    out = [title, "=" * len(title),
           f"  target       {report.target}",
           f"  compiled by  {report.api}(fw_compiler=nop, bw_compiler=nop, "
           f"partition_fn={report.partitioner}"
           f"{'' if report.budget is None else f', activation_memory_budget={report.budget}'})",
           f"  mode         {report.mode}, {_plural(report.num_graph_inputs, 'graph input')}",
           f"  torch        {report.torch_version}", ""]

    out += ["Correctness (compiled vs eager, same inputs)",
            _check_line("outputs match eager", report.outputs),
            _check_line("gradients match eager", report.gradients), ""]

    rows = [["forward" if report.backward else "inference", str(report.forward.call_function),
             str(report.forward.total)]]
    if report.backward:
        rows.append(["backward", str(report.backward.call_function), str(report.backward.total)])
    out += ["Graphs"] + _table(["graph", "call_function nodes", "total nodes"], rows, {1, 2}) + [""]

    if report.backward and not report.saved:
        out += ["Saved for backward: nothing", ""]
    elif report.backward:
        out.append(f"Saved for backward: {_plural(len(report.saved), 'tensor')}, "
                   f"{_fmt_bytes(report.saved_bytes)}")
        rows = [[str(k), s.name, "x".join(map(str, s.shape)) if s.shape else
                 ("scalar" if s.shape == [] else "-"), s.dtype, str(s.bytes), _source(s)]
                for k, s in enumerate(report.saved, 1)]
        rows.append(["", "total", "", "", str(report.saved_bytes), ""])
        out += _table(["#", "name", "shape", "dtype", "bytes", "source"], rows, {0, 4})
        out += ["  memory kept alive for the backward beyond the graph inputs (distinct "
                f"storages): {_fmt_bytes(report.saved_activation_bytes)}", ""]
    if report.forward_peak_bytes is not None:
        tl = report.timeline
        out += ["Peak memory (estimated, Note [Peak of a step]: graph order, each value freed "
                "after its last use; parameters and inputs included)",
                f"  forward   {_fmt_bytes(report.forward_peak_bytes)}",
                f"  backward  {_fmt_bytes(report.backward_peak_bytes)}",
                f"  step      {_fmt_bytes(tl.peak)} at {tl.steps[tl.peak_step]}"
                if tl.steps else "  step      0 B"]
        if report.budget_bytes is not None:
            over = tl.peak > report.budget_bytes
            out.append(f"  budget    {_fmt_bytes(report.budget_bytes)}: "
                       f"{'EXCEEDED' if over else 'met'} by the estimate")
        out.append("")
    if report.pareto:
        rows = [[("*" if p.chosen else "") + (p.partitioner if p.budget is None else
                                               f"{p.partitioner} {p.budget}"),
                 _fmt_bytes(p.peak_bytes), _fmt_time(p.warm_step_seconds).strip(),
                 _fmt_bytes(p.saved_activation_bytes), str(p.recomputed_ops),
                 "yes" if p.ok else "NO"] for p in report.pareto]
        out += ["Pareto sweep (activation_memory_budget; * the plan explained here)"] + \
            _table(["plan", "peak", "warm step", "saved", "recomputed", "matches eager"],
                   rows, {1, 2, 3, 4}) + [""]
    if report.backward:
        total = sum(report.recomputed.values())
        if not total:
            out += ["Recomputed in backward: nothing", ""]
        else:
            ops = ", ".join(f"{op} x{k}" for op, k in report.recomputed.items())
            out += [f"Recomputed in backward: {_plural(total, 'forward op')}: {ops}", ""]

    rows = [[s, _fmt_time(t)] for s, t in report.stage_seconds.items()]
    rows.append(["total compile", _fmt_time(report.compile_seconds)])
    out += ["Time (compile stages, CompileReport.stage_seconds)"] + \
        _table(["stage", "wall"], rows, {1})
    out += [""] + ([f"  traced in {report.tracing}"] if report.tracing else [])
    out += [f"  one-time torch setup, before    {_fmt_time(report.setup_seconds)}",
            f"  first call (compile + forward)  {_fmt_time(report.first_call_seconds)}"]
    if report.first_backward_seconds is not None:
        out.append(f"  first backward                  {_fmt_time(report.first_backward_seconds)}")
    if report.warm_step_seconds is not None:
        out.append(f"  warm step, compiled (median)    {_fmt_time(report.warm_step_seconds)}")
        out.append(f"  warm step, eager (median)       {_fmt_time(report.eager_step_seconds)}")

    if graphs:
        out += ["", "Forward graph" if report.backward else "Inference graph",
                report.forward.code.rstrip()]
        if report.backward:
            out += ["", "Backward graph", report.backward.code.rstrip()]
    return "\n".join(out) + "\n"
