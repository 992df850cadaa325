"""The joint graph of a module with descriptors, and its compilation.

``aot_export_joint_with_descriptors(stack, mod, args, kwargs)`` traces the
training step of ``mod`` (the forward, the backward, every input mutation
and aliasing case ``aot_module`` handles) into one joint graph, as torch's
function of that name does, for graph-based trainers and parallelism
planners that rewrite the joint before compiling it::

    class inner_f(torch.nn.Module):
        def forward(self, primals, tangents):
            primals_1, primals_2, primals_3, tangents_1, = fx_pytree.tree_flatten_spec(...)
            ...
            return pytree.tree_unflatten([add, mm, t_1, None], self._out_spec)

The placeholders' positions are no contract: each placeholder carries its
meaning in ``node.meta["desc"]`` (``ParamAOTInput('lin.weight')``,
``BufferAOTInput``, ``PlainAOTInput(i)`` for the i-th user leaf,
``TangentAOTInput(output)``), and the output node a list of output
descriptors (``InputMutationAOTOutput``, ``PlainAOTOutput(i)``,
``IntermediateBaseAOTOutput``, ``GradAOTOutput(input)``; ``None`` for a
gradient that does not exist).  The classes have torch's names, fields and
``expr()``; they are aotgrad's own (``isinstance`` against torch's classes is
False).

``aot_compile_joint_with_descriptors(jd)`` partitions and compiles
``jd.graph_module`` (as the user left it) and returns
``f(*parameters, *buffers, *args, **kwargs)`` with the module's outputs,
which trains like the module (gradients reach the parameters, buffers are
updated).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import _torch
from ._torch import pytree
from .analyze import OutputKind
from .compile import nop
from .descriptors import DESC, Grad, IntermediateBase, MutatedInput, Primal, Tangent, UserOutput
from .export import Exported, _module_call, _pytree_joint, _flat_graph, graph_parts, \
    trace_for_export
from .partition import default_partition
from .pipeline import CompileOptions, CompileReport, Traced, compile_traced


# ---------------------------------------------------------------- descriptors (torch's names)

@dataclass(frozen=True)
class AOTInput:
    """What a placeholder of an exported joint graph stands for."""

    def expr(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no expression")

    def is_param(self) -> bool:
        return False

    def is_buffer(self) -> bool:
        return False

    def is_tangent(self) -> bool:
        return False


@dataclass(frozen=True)
class DifferentiableAOTInput(AOTInput):
    """An input that may get a gradient."""


@dataclass(frozen=True)
class AOTOutput:
    """What an output of an exported joint graph stands for."""

    def expr(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no expression")

    def is_grad(self) -> bool:
        return False


@dataclass(frozen=True)
class DifferentiableAOTOutput(AOTOutput):
    """An output that may get a tangent."""


@dataclass(frozen=True)
class ParamAOTInput(DifferentiableAOTInput):
    target: str  # the parameter's FQN

    def expr(self) -> str:
        return f"self.get_parameter({self.target!r})"

    def is_param(self) -> bool:
        return True


@dataclass(frozen=True)
class BufferAOTInput(DifferentiableAOTInput):
    target: str  # the buffer's FQN

    def expr(self) -> str:
        return f"self.get_buffer({self.target!r})"

    def is_buffer(self) -> bool:
        return True


@dataclass(frozen=True)
class PlainAOTInput(DifferentiableAOTInput):
    idx: int  # position among the flat leaves of (args, kwargs)

    def expr(self) -> str:
        return f"args[{self.idx}]"


@dataclass(frozen=True)
class TangentAOTInput(DifferentiableAOTInput):
    output: DifferentiableAOTOutput  # the output whose tangent this is

    def expr(self) -> str:
        return f"__output_tangent({self.output.expr()})"

    def is_tangent(self) -> bool:
        return True


@dataclass(frozen=True)
class PlainAOTOutput(DifferentiableAOTOutput):
    idx: int  # position among the flat leaves of the module's output

    def expr(self) -> str:
        return f"output[{self.idx}]"


@dataclass(frozen=True)
class InputMutationAOTOutput(DifferentiableAOTOutput):
    mutated_input: AOTInput  # the input whose new value this is

    def expr(self) -> str:
        return f"__input_mutation({self.mutated_input.expr()})"


@dataclass(frozen=True)
class IntermediateBaseAOTOutput(DifferentiableAOTOutput):
    base_of: AOTOutput  # one output that is a view of this base

    def expr(self) -> str:
        return f"__intermediate_base({self.base_of.expr()})"


@dataclass(frozen=True)
class GradAOTOutput(DifferentiableAOTOutput):
    grad_of: DifferentiableAOTInput  # the input whose gradient this is

    def expr(self) -> str:
        return f"__grad({self.grad_of.expr()})"

    def is_grad(self) -> bool:
        return True


# ---------------------------------------------------------------- export

@dataclass
class JointWithDescriptors:
    """The result of ``aot_export_joint_with_descriptors``.  ``graph_module``
    may be replaced or rewritten before ``aot_compile_joint_with_descriptors``
    (keep the descriptors on the placeholders and the output node)."""
    _exported: Exported
    _roles: "_Roles"
    graph_module: fx.GraphModule
    params_spec: list[str]      # parameters, then buffers, are the compiled
    buffers_spec: list[str]     # function's first arguments, in this order
    in_spec: Any                # of (list of all arguments, kwargs)
    out_spec: Any               # of the module's output

    @property
    def fake_mode(self) -> Any:
        return self._exported.traced.fake_mode


@dataclass(frozen=True)
class _Roles:
    """Descriptor (torch's names) -> aotgrad's role, to read the graph back."""
    inputs: dict            # AOTInput -> call leaf position
    tangents: dict          # TangentAOTInput -> tangent index
    outputs: dict           # AOTOutput -> aotgrad descriptor (None: not a graph value)


def aot_export_joint_with_descriptors(
        stack: contextlib.ExitStack, mod: nn.Module, args: Sequence[Any],
        kwargs: Mapping[str, Any] | None = None, *, decompositions: Mapping | None = None,
        keep_inference_input_mutations: bool = False, ignore_shape_env: bool = False,
        disable_functionalization: bool = False, _record_nn_module_stack: bool = False,
        _disable_torch_fn_metadata_mode: bool = False) -> JointWithDescriptors:
    """The joint graph of ``mod(*args, **kwargs)`` with descriptors (module docstring).

    ``stack`` is the caller's ExitStack, as with torch; aotgrad needs nothing
    kept open in it (compiling after it closed is fine).  Traced in the
    caller's grad mode: with grad mode off, or nothing requiring grad, the
    graph is the inference graph ``(*leaves) -> (*mutated, *outs)``."""
    if not isinstance(stack, contextlib.ExitStack):
        raise TypeError("aot_export_joint_with_descriptors: the first argument must be a "
                        f"contextlib.ExitStack (got {type(stack).__name__}); create one with "
                        "`with contextlib.ExitStack() as stack:`")
    if disable_functionalization:
        raise NotImplementedError(
            "aot_export_joint_with_descriptors(disable_functionalization=True): aotgrad "
            "always functionalizes the joint graph; leave it False.")
    if _record_nn_module_stack:
        raise NotImplementedError(
            "aot_export_joint_with_descriptors(_record_nn_module_stack=True): aotgrad's "
            "graphs carry no nn_module_stack meta; leave it False.")
    # _disable_torch_fn_metadata_mode: aotgrad records no torch_fn meta either way
    params = dict(mod.named_parameters(remove_duplicate=False))
    buffers = dict(mod.named_buffers(remove_duplicate=False))
    state = [*params.values(), *buffers.values()]
    if ignore_shape_env:
        mode = _torch.detect_fake_mode(pytree.tree_leaves((list(args), kwargs or {})))
        if mode is not None and mode.shape_env is not None:
            raise NotImplementedError(
                "aot_export_joint_with_descriptors(ignore_shape_env=True) with inputs of a "
                "symbolic fake mode: aotgrad traces in the inputs' mode; pass real tensors "
                "or fake tensors of a static mode instead.")
    call = _module_call(mod, params, buffers, strict_out_tuple=False)
    e = trace_for_export(call, [*state, *args], kwargs, num_params_buffers=len(state),
                         decompositions=decompositions, dynamic=False if ignore_shape_env
                         else None, keep_input_mutations=keep_inference_input_mutations,
                         args_container=list)
    roles, gm = _described_graph(e, list(params), list(buffers))
    return JointWithDescriptors(e, roles, gm, list(params), list(buffers), e.in_spec,
                                e.traced.signature.out_spec)


def _described_graph(e: Exported, params: list[str], buffers: list[str]
                     ) -> tuple[_Roles, fx.GraphModule]:
    """The export graph (Note [Export calling convention], export.py) with
    torch's descriptors in place of aotgrad's."""
    t = e.traced
    sig = t.signature
    parts = graph_parts(e)
    n_p, n_b = len(params), len(buffers)

    def input_desc(k: int) -> AOTInput:
        if k < n_p:
            return ParamAOTInput(params[k])
        if k < n_p + n_b:
            return BufferAOTInput(buffers[k - n_p])
        return PlainAOTInput(k - n_p - n_b)

    in_descs = [input_desc(k) for k in range(len(e.leaves))]
    # the graph outputs in aotgrad's order (Note [What the graph returns], analyze.py)
    graph_out_descs: list[AOTOutput] = [InputMutationAOTOutput(in_descs[k])
                                        for k, _ in parts.mutated]
    graph_out_descs += [PlainAOTOutput(i) for i in sig.user_graph_outputs]
    graph_out_descs += [IntermediateBaseAOTOutput(PlainAOTOutput(v))
                        for v in sig.intermediate_base_views]
    tangent_descs = [TangentAOTInput(d) for d, needs in zip(graph_out_descs, sig.tangent_mask)
                     if needs]
    outputs: dict = {d: MutatedInput(t.flat.leaf_slot[k])
                     for d, (k, _) in zip(graph_out_descs, parts.mutated)}
    for i, o in enumerate(sig.outputs):
        outputs[PlainAOTOutput(i)] = None if o.kind in (OutputKind.CONSTANT,
                                                        OutputKind.SAME_AS_OUTPUT) \
            else UserOutput(i)
    for j, v in enumerate(sig.intermediate_base_views):
        outputs[IntermediateBaseAOTOutput(PlainAOTOutput(v))] = IntermediateBase(j)
    for k, s in enumerate(t.flat.leaf_slot):
        if s >= 0:
            outputs[GradAOTOutput(in_descs[k])] = Grad(s)
    roles = _Roles({d: k for k, d in enumerate(in_descs)},
                   {d: j for j, d in enumerate(tangent_descs)}, outputs)
    if t.graph.is_joint:
        gm = _pytree_joint(e, parts, "inner_f")
    else:
        gm = _flat_graph(e, parts, "<lambda>")
    for node in gm.graph.find_nodes(op="placeholder"):
        desc = node.meta[DESC]
        node.meta[DESC] = in_descs[desc.index] if isinstance(desc, Primal) else \
            tangent_descs[desc.index]
    out_node = gm.graph.output_node()
    base_descs = iter(graph_out_descs[len(parts.mutated) + len(sig.user_graph_outputs):])
    new_descs = []
    for value, desc in zip(out_node.args[0], out_node.meta[DESC]):
        if isinstance(desc, MutatedInput):
            new_descs.append(InputMutationAOTOutput(in_descs[desc.index]))
        elif isinstance(desc, UserOutput):
            new_descs.append(PlainAOTOutput(desc.index))
        elif isinstance(desc, Grad):
            new_descs.append(GradAOTOutput(in_descs[desc.index]) if value is not None else None)
        else:
            new_descs.append(next(base_descs))
    out_node.meta[DESC] = new_descs
    return roles, gm


# ---------------------------------------------------------------- compile

def aot_compile_joint_with_descriptors(
        jd: JointWithDescriptors, *, partition_fn: Callable = default_partition,
        fw_compiler: Callable = nop, bw_compiler: Callable | None = nop,
        serializable: bool = False) -> Callable[..., Any]:
    """Partition and compile ``jd.graph_module``; returns
    ``f(*parameters, *buffers, *args, **kwargs)`` (module docstring)."""
    if serializable:
        raise NotImplementedError(
            "aot_compile_joint_with_descriptors(serializable=True) is not supported by "
            "aotgrad; compile with serializable=False (aotgrad.AOTAutogradCache caches "
            "aot_module_simplified programs).")
    e = jd._exported
    t = e.traced
    graph = _internal_graph(jd)
    vals = tuple(n.meta.get("val") for n in graph.graph.find_nodes(op="placeholder"))
    num_primals = sum(1 for s in t.flat.leaf_slot if s >= 0)
    traced = dataclasses.replace(t.graph, gm=graph, example_inputs=vals)
    options = CompileOptions(fw_compiler, bw_compiler, partition_fn,
                             num_params_buffers=t.flat.num_params_buffers)
    run = compile_traced(Traced(t.flat, t.signature, traced, t.fake_mode,
                                list(vals[:num_primals])), options, CompileReport())
    return _CompiledJoint(run, jd, vals[:num_primals])


def _internal_graph(jd: JointWithDescriptors) -> fx.GraphModule:
    """``jd.graph_module`` back in aotgrad's calling convention (Note
    [Calling convention], __init__.py), read by its descriptors."""
    e, roles = jd._exported, jd._roles
    t = e.traced
    gm = jd.graph_module
    slot_of_leaf = t.flat.leaf_slot
    primals: dict[int, fx.Node] = {}
    tangents: dict[int, fx.Node] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        desc = node.meta.get(DESC)
        if desc in roles.tangents:
            tangents[roles.tangents[desc]] = node
        elif desc in roles.inputs:
            slot = slot_of_leaf[roles.inputs[desc]]
            if slot >= 0:
                primals[slot] = node
            elif node.users:
                raise RuntimeError(f"aot_compile_joint_with_descriptors: placeholder "
                                   f"{node.name} ({desc}) stands for a constant argument but "
                                   "the graph reads it; constants are baked into the graph")
        else:
            raise RuntimeError(
                f"aot_compile_joint_with_descriptors: placeholder {node.name} has descriptor "
                f"{desc!r}, which is not one of the exported graph's inputs; keep "
                "node.meta['desc'] on placeholders you replace")
    out_node = gm.graph.output_node()
    found: dict[Any, Any] = {}
    values = pytree.tree_leaves(out_node.args[0], is_leaf=lambda x: x is None)
    for value, desc in zip(values, out_node.meta.get(DESC, ())):
        if desc is None:
            continue
        if desc not in roles.outputs:
            raise RuntimeError(f"aot_compile_joint_with_descriptors: output descriptor "
                               f"{desc!r} is not one of the exported graph's outputs")
        role = roles.outputs[desc]
        if role is not None:
            found[role] = value
    expected = list(t.graph.gm.graph.output_node().meta[DESC])
    missing = [d for d in expected if not isinstance(d, Grad) and d not in found]
    if missing:
        raise RuntimeError(f"aot_compile_joint_with_descriptors: the graph no longer returns "
                           f"{missing}; keep the output node's meta['desc'] list in step with "
                           "its values")
    num_primals = sum(1 for s in slot_of_leaf if s >= 0)
    if sorted(primals) != list(range(num_primals)) or \
            sorted(tangents) != list(range(len(tangents))):
        raise RuntimeError("aot_compile_joint_with_descriptors: the graph lost placeholders "
                           f"(primals {sorted(primals)}, tangents {sorted(tangents)})")
    inputs = [(f"primals_{s + 1}" if t.graph.is_joint else f"arg{s}_1", primals[s], Primal(s))
              for s in range(num_primals)]
    inputs += [(f"tangents_{j + 1}", tangents[j], Tangent(j)) for j in range(len(tangents))]
    outs = [found.get(d) for d in expected]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name, old, desc in inputs:
        node = graph.placeholder(name)
        node.meta.update(old.meta)
        node.meta[DESC] = desc
        env[old] = node
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            env[node] = graph.node_copy(node, lambda n: env[n])
    out = graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outs))
    out.meta[DESC] = tuple(expected)
    return fx.GraphModule(gm, graph)


class _CompiledJoint:
    """``f(*parameters, *buffers, *args, **kwargs)`` over the compiled program.

    Note [Compiled joints check their calls]: the graph bakes in the
    export's constant arguments (and, traced statically, its sizes); a call
    with other constants, another argument structure or other static sizes
    would compute something else without an error, so it is refused."""

    def __init__(self, run: Callable[[list], Any], jd: JointWithDescriptors, primal_vals):
        self._run = run
        self._jd = jd
        flat = jd._exported.traced.flat
        self._slots = flat.leaf_slot
        self._constants = flat.constants
        self._metas = [None if _symbolic(v) else (tuple(v.shape), v.dtype)
                       for v in primal_vals]
        self.__name__ = "aot_compiled_joint"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        jd = self._jd
        keys = _torch.spec_children(jd.in_spec)[1].context
        if set(kwargs) != set(keys or ()):
            raise TypeError(f"the compiled joint takes keyword arguments {list(keys or ())}, "
                            f"got {sorted(kwargs)}")
        leaves, spec = pytree.tree_flatten((list(args), {k: kwargs[k] for k in keys or ()}))
        if spec != jd.in_spec:
            raise TypeError("the compiled joint takes (*parameters, *buffers, *args, **kwargs) "
                            f"structured as when exported: {jd.in_spec}; got {spec}")
        for k, (leaf, slot) in enumerate(zip(leaves, self._slots)):
            if slot < 0:
                if isinstance(leaf, torch.Tensor) or type(leaf) is not type(
                        self._constants[k]) or leaf != self._constants[k]:
                    raise ValueError(
                        f"argument leaf {k} is {leaf!r}, but the graph was exported with the "
                        f"constant {self._constants[k]!r} baked in; export again for another "
                        "value")
                continue
            meta = self._metas[slot]
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"argument leaf {k} must be a tensor, got {type(leaf).__name__}")
            if meta is not None and (tuple(leaf.shape), leaf.dtype) != meta:
                raise ValueError(
                    f"argument leaf {k} has shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                    f"the compiled graph takes {meta[0]} {meta[1]} (its placeholder's value); "
                    "export again with such inputs, or with symbolic sizes")
        return self._run(leaves)


def _symbolic(v: Any) -> bool:
    return not isinstance(v, torch.Tensor) or any(
        not isinstance(d, int) for d in v.shape)
