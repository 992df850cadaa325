"""Higher-order backward: the gradients of a compiled function, differentiable.

Note [Higher-order backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``create_graph=True`` (grad mode on inside the backward) the gradients a
compiled function returns must themselves be differentiable: a gradient
penalty, MAML's inner step, forces from an energy, Hessian-vector products.
The compiled backward cannot give them: it is a graph over the forward's saved
values, which autograd does not connect to the inputs, and it was traced with
``create_graph=False`` -- the values of its ops are right, but not their
autograd structure (a saved output reaches a backward formula through a
``detach``; a ``detach`` the program itself made is an identity to the
first-order trace and dropped, ``trace.drop_detaches``), so differentiating that
graph again would silently drop or add terms.

So the differentiable backward is another program, compiled by aotgrad
itself, lazily at the first ``create_graph`` backward and kept on the
compiled program (``DifferentiableBackward``):

    vjp(*graph_inputs, *tangents) = autograd.grad(program(*graph_inputs),
                                                  inputs that require grad,
                                                  tangents, create_graph=True)

It runs the traced program again (``VJPProgram``: the same flat function,
hence the same user code, custom autograd.Functions' own backwards and
detaches included) and differentiates it as eager does; its own forward and
backward graphs come out of the usual pipeline -- the user's compilers and
``partition_fn`` (so saved values, recomputation and the activation memory
budget follow the partitioner at this level too), guards, a fast path.  Its
backward with ``create_graph=True`` is the same construction one level up:
gradients of gradients of gradients, to any order.

What the backward needs for it are the graph inputs, as they were at the
forward.  An input the compiled forward saves as it is (a ``Saved`` output
that is the placeholder itself) comes back from ``ctx.saved_tensors`` with its
autograd history (inputs saved with ``save_for_backward`` keep it; checked:
a compiler returning a copy there is an error at that backward).  The others
(``extras``: biases, ...) are kept on ``ctx.aotgrad_inputs`` by the forward,
one tuple, and dropped by a first-order backward that does not keep the
graph, as autograd drops its saved values; the version counters of those the
gradients read (``versioned``: the placeholders the saved values depend on)
are recorded too, and a create_graph backward after one of them changed in
place raises autograd's error instead of differentiating the new value.  The
first-order path is otherwise unchanged: the compiled backward under no_grad.

Note [Wanted gradients]: the second program computes only the gradients the
running backward uses -- ``grad(y, x, create_graph=True)`` wants x's, not the
weights' -- asked of autograd's engine for the node at each input's edge
(``_torch.engine_uses``), one compiled second program per set of gradients
wanted.  The others are None, as autograd would drop them; computing them
would cost their ops twice over: here, and again in the final backward, which
would push zeros through them.  The engine answers for a leaf that
``autograd.grad`` captures only by raising (~10 us a leaf, ``engine_uses``),
so a leaf wanted at its last ask is taken as wanted without asking (asked
again every ``_REASK`` calls); the others are asked, which costs ~0.1 us
when the answer is no.  Computing a gradient nobody reads costs only time,
leaving out one that is read would be a wrong value: the guess only ever
adds leaves.

Refused -- the gradients are still computed (the compiled backward, exact
values), but tied to a node that raises, naming the reason, when autograd
differentiates them; the forward then keeps the inputs that require grad it
does not save, so that the node is reached from each of them (``refused``:
never a gradient detached from an input it depends on).  Refused are: random
ops the saved values depend on (a second run draws other numbers: dropout),
in-place changes of an input that requires grad, or of one whose old value
the gradients read (BatchNorm's running statistics are fine: the gradients do
not read them, ``_UNREAD_ARGUMENTS``, and the second run changes a copy), a
backward that writes to tensors (Note [Mutations in the backward]),
gradients autograd refuses in part (Note [Poisoned gradients]), tensor
subclass inputs or outputs, programs traced under autocast, and programs
compiled without a way to compile the second program
(``CompileOptions.compile_function``: export).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from . import _torch
from .analyze import Signature
from .descriptors import DESC, Primal
from .missing import DYNAMO_FUNCTION_META
from .partition import Partitioned, reachable
from .reuse import ReusingPartition
from .trace import graph_values


@dataclass(frozen=True)
class HigherOrderPlan:
    """Where a create_graph backward finds each graph input, decided at compile time."""
    refusal: str | None                 # why the gradients are not differentiable (None: they are)
    saved_slot: tuple[int | None, ...]  # per graph input: its saved-tensor index, if saved as is
    extras: tuple[int, ...] = ()        # graph inputs kept on ctx.aotgrad_inputs by the forward
    versioned: tuple[int, ...] = ()     # of those, the tensors whose version is recorded
    cloned: frozenset[int] = frozenset()  # inputs the program mutates (copied for the second run)
    tensors: tuple[int, ...] = ()       # the graph inputs that are tensors (autograd's edges)


#: Note [Higher-order backward]: arguments an op's results (all: None) do not
#: read: op -> (results, arguments, condition on the node).  Training batch
#: norm's output and batch statistics do not read the running statistics (only
#: their new values do), nor does its backward, which is passed them; so a
#: program may update them in place and still be differentiated twice.
_UNREAD_ARGUMENTS: dict = {
    _torch.aten._native_batch_norm_legit_functional.default:
        ((0, 1, 2), (3, 4), lambda n: len(n.args) > 5 and n.args[5] is True),
    _torch.aten.native_batch_norm_backward.default:
        (None, (3, 4), lambda n: len(n.args) > 7 and n.args[7] is True),
}


def _reads(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user``'s results read ``value`` (one of its arguments)."""
    rule = _UNREAD_ARGUMENTS.get(user.target)
    if rule is None or rule[0] is not None or not rule[2](user) or \
            any(a is value for a in user.kwargs.values()):
        return True
    return any(a is value for k, a in enumerate(user.args) if k not in rule[1])


def _read_by(values: list) -> set[fx.Node]:
    """The nodes ``values`` depend on (inclusive), through ``_UNREAD_ARGUMENTS``."""
    return reachable(values, _read_inputs)


def _read_inputs(n: fx.Node) -> list[fx.Node]:
    """The inputs of ``n`` whose values it reads (``_UNREAD_ARGUMENTS``)."""
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        source = n.args[0]
        rule = _UNREAD_ARGUMENTS.get(source.target)
        if rule is not None and rule[0] is not None and n.args[1] in rule[0] and \
                rule[2](source):
            unread = {source.args[k] for k in rule[1] if k < len(source.args)}
            return [a for a in source.all_input_nodes if a not in unread]
    return n.all_input_nodes


def _is_random(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if isinstance(n.target, _torch.OpOverload):
        return torch.Tag.nondeterministic_seeded in n.target.tags
    return isinstance(n.target, _torch.HigherOrderOperator) and \
        n.target.name() == "run_and_save_rng_state"


def _placeholder_index(k: int, p: fx.Node) -> int:
    desc = p.meta.get(DESC)
    return desc.index if isinstance(desc, Primal) else k


_INVOKE_SUBGRAPH = getattr(torch.ops.higher_order, "invoke_subgraph", None)


def plan_higher_order(parts: Partitioned, sig: Signature, *, program: Callable | None,
                      can_compile: bool, subclasses: bool, poisoned: bool,
                      backward_writes: bool) -> HigherOrderPlan:
    """Note [Higher-order backward]: what the forward keeps, or why it keeps nothing."""
    fw = parts.fw_gm.graph
    placeholders = fw.find_nodes(op="placeholder")
    start = parts.num_fwd_outputs
    saved = list(fw.output_node().args[0][start:start + parts.num_saved_tensors +
                                           parts.num_saved_symints])
    bw_inputs = parts.bw_gm.graph.find_nodes(op="placeholder")
    ns = parts.num_saved_symints
    # saved values the backward reads (a backward taking one it ignores does not)
    used = [s for j, s in enumerate(saved) if j >= parts.num_saved_tensors or
            ns + j >= len(bw_inputs) or
            any(_reads(u, bw_inputs[ns + j]) for u in bw_inputs[ns + j].users)]
    needed = _read_by(used)
    index = {p: _placeholder_index(k, p) for k, p in enumerate(placeholders)}
    read = {index[p] for p in placeholders if p in needed}   # the gradients read these
    n = len(sig.inputs)
    slot: list[int | None] = [None] * n
    for j, s in enumerate(saved[:parts.num_saved_tensors]):
        if isinstance(s, fx.Node) and s in index and index[s] < n and slot[index[s]] is None:
            slot[index[s]] = j
    refusal = _refusal(sig, needed, read, program=program, can_compile=can_compile,
                       subclasses=subclasses, poisoned=poisoned, backward_writes=backward_writes)
    if refusal is None and parts.bw_gm.meta.get(DYNAMO_FUNCTION_META):
        refusal = ("it calls a custom autograd.Function that dynamo traced (torch.compile's "
                   "autograd_function_apply), whose backward graph runs with grad mode off; "
                   "call the Function outside the compiled region, or compile with "
                   "aotgrad.aot_function / aot_module, which differentiate it twice")
    if refusal is None and _INVOKE_SUBGRAPH is not None and any(
            g.find_nodes(op="call_function", target=_INVOKE_SUBGRAPH)
            for g in (fw, parts.bw_gm.graph)):
        refusal = ("it calls a nested_compile_region (torch.compile's invoke_subgraph), whose "
                   "backward torch cannot differentiate again; compile with "
                   "aotgrad.aot_function / aot_module, where the region is plain code")
    if refusal is not None or len(placeholders) != n:
        if subclasses or len(placeholders) != n:  # placeholders are plain tensors
            slot = [None] * n
        return refused(sig, refusal or "its forward graph does not take one input per graph "
                       "input", tuple(slot))
    extras = tuple(i for i in range(n) if slot[i] is None)
    tensors = {index[p] for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)}
    return HigherOrderPlan(None, tuple(slot), extras,
                           tuple(i for i in extras if i in read and i in tensors),
                           frozenset(i for i, x in enumerate(sig.inputs) if x.mutated),
                           tuple(sorted(tensors)))


def refused(sig: Signature, reason: str, saved_slot: tuple | None = None) -> HigherOrderPlan:
    """A plan whose create_graph backward ties its gradients to an error: the
    forward keeps the inputs that require grad it does not save, so that the
    error is reached from each of them (never a gradient detached from one)."""
    slot = saved_slot or (None,) * len(sig.inputs)
    return HigherOrderPlan(reason, slot, tuple(i for i, x in enumerate(sig.inputs)
                                               if x.requires_grad and slot[i] is None))


def _refusal(sig: Signature, needed: set, read: set[int], *, program: Callable | None,
             can_compile: bool, subclasses: bool, poisoned: bool,
             backward_writes: bool) -> str | None:
    if program is None or not can_compile:
        return "it was compiled by an entry point that makes no second program (export, " \
            "or a program loaded from the disk cache without its function)"
    if subclasses:
        return "it has tensor subclass inputs or outputs"
    if poisoned:
        return "autograd refuses part of its backward (Note [Poisoned gradients])"
    if backward_writes:
        return "its backward writes in place to an input or to the gradient it is given"
    if any(_torch.autocast_state()):
        return "it was compiled under autocast"
    random = next((m for m in needed if _is_random(m)), None)
    if random is not None:
        return (f"its saved values depend on a random op ({random.format_node()}); the "
                "differentiable backward runs the program again, which would draw other "
                "random numbers")
    for i, x in enumerate(sig.inputs):
        if x.changed and (x.requires_grad or x.requires_grad_after):
            return f"it changes input {i}, which requires grad, in place"
        if x.mutated and i in read:
            return (f"its gradients read the value input {i} had before the program "
                    "mutated it in place")
    return None


class VJPProgram:
    """Note [Higher-order backward]: ``(*graph_inputs, *tangents) -> one
    gradient (or None) per graph input``, made differentiable by running
    ``program`` (the traced flat function) again under autograd."""

    def __init__(self, program: Callable, sig: Signature, cloned: frozenset[int],
                 wrt: tuple[int, ...], missing: tuple[int, ...] = (), num_reused: int = 0):
        self.program = program
        self.sig = sig
        self.cloned = cloned
        self.num_inputs = len(sig.inputs)
        # the first program's saved values after the graph inputs, not read here:
        # the joint graph's pass uses them (Note [Saved values in the second program])
        self.num_reused = num_reused
        self.diff = [k for k, m in enumerate(sig.tangent_mask) if m]
        self.wrt = wrt     # the inputs whose gradients are computed (Note [Wanted gradients])
        # the tangents autograd did not give (their zeros are passed, not read:
        # Note [Missing tangents], missing.py)
        self.given = [j for j in range(len(self.diff)) if j not in missing]
        self.__name__ = f"{getattr(program, '__name__', type(program).__name__)}_backward"

    def __call__(self, *args: Any) -> tuple:
        n = self.num_inputs
        # inputs the program mutates (whose old values the gradients do not read):
        # the second run changes copies, not the caller's tensors
        primals = [a.clone() if k in self.cloned else a for k, a in enumerate(args[:n])]
        values = graph_values(self.program(*primals), primals, self.sig)
        if not self.given:
            return (None,) * n
        tangents = args[n + self.num_reused:]
        grads = torch.autograd.grad([values[self.diff[j]] for j in self.given],
                                    [primals[i] for i in self.wrt],
                                    [tangents[j] for j in self.given],
                                    allow_unused=True, create_graph=True)
        out: list = [None] * n
        for i, g in zip(self.wrt, grads):
            out[i] = g
        return tuple(out)


_REASK = 64  # Note [Wanted gradients]


class DifferentiableBackward:
    """The create_graph half of a compiled program's backward (Note
    [Higher-order backward]); the second program is compiled at its first call."""

    def __init__(self, plan: HigherOrderPlan, program: Callable | None, sig: Signature,
                 options: Any, num_saved_symints: int, num_saved_tensors: int,
                 num_params_buffers: int = 0, reuse: tuple | None = None):
        self.plan = plan
        # Note [Saved values in the second program] (reuse.py): the saved
        # tensors it reads, and the value numbers that find their nodes
        self.reused, self._numbers, self._position = reuse or ((), None, {})
        self.program = program
        self.sig = sig
        self.options = options
        self.num_saved_symints = num_saved_symints
        self.num_saved_tensors = num_saved_tensors
        self.num_params_buffers = num_params_buffers
        self._vjps: dict[tuple, Callable] = {}   # by the gradients wanted, tangents missing
        self._wanted_leaves: set[int] = set()    # Note [Wanted gradients]: at their last ask
        self._calls = 0
        # where ``_inputs`` finds each graph input: (kept on ctx.aotgrad_inputs?, index);
        # a refused plan keeps only the inputs its error is tied to (never gathered)
        position = {i: k for k, i in enumerate(plan.extras)}
        self._gather = () if plan.refusal is not None else tuple(
            (True, position[i]) if j is None else (False, j)
            for i, j in enumerate(plan.saved_slot))
        self._saved_needing_grad = tuple(
            (i, j) for i, j in enumerate(plan.saved_slot)
            if j is not None and sig.inputs[i].requires_grad)
        self._extra_position = position

    @property
    def extras(self) -> tuple[int, ...]:
        return self.plan.extras

    @property
    def versioned(self) -> tuple[int, ...]:
        return self.plan.versioned

    def function(self, wrt: tuple[int, ...], missing: tuple[int, ...] = ()) -> Callable:
        """The compiled second program computing the gradients of ``wrt`` from
        the tangents not ``missing``, made at its first use."""
        vjp = self._vjps.get((wrt, missing))
        if vjp is None:
            options = dataclasses.replace(self.options, keep_inference_input_mutations=False,
                                          num_params_buffers=self.num_params_buffers)
            if self.reused:
                options = dataclasses.replace(options, partition_fn=ReusingPartition(
                    options.partition_fn, self._numbers, self._position, len(self.sig.inputs)))
            vjp = self._vjps[wrt, missing] = self.options.compile_function(
                VJPProgram(self.program, self.sig, self.plan.cloned, wrt, missing,
                           len(self.reused)), options)
        return vjp

    def wanted(self, ctx: Any) -> tuple[int, ...]:
        """Note [Wanted gradients]: the inputs whose gradients this backward's
        graph task uses (maybe more leaves, never fewer)."""
        tensors, edges = self.plan.tensors, ctx.next_functions
        if len(edges) != len(tensors):   # not one edge per tensor input: all of them
            return tuple(i for i, x in enumerate(self.sig.inputs) if x.requires_grad)
        self._calls += 1
        reask = self._calls % _REASK == 0
        leaves = self._wanted_leaves
        out = []
        for j, (node, _) in enumerate(edges):
            if node is None:
                continue
            if not _torch.is_leaf_accumulator(node):
                if _torch.engine_uses(node):
                    out.append(tensors[j])
            elif j in leaves and not reask:
                out.append(tensors[j])
            elif _torch.engine_uses(node):
                leaves.add(j)
                out.append(tensors[j])
            else:
                leaves.discard(j)
        return tuple(out)

    def __call__(self, ctx: Any, backward: Callable, args: list,
                 missing: tuple[int, ...] = ()) -> tuple[list, list | None]:
        """The gradients, and (when they cannot be differentiable) the backward's
        inputs to tie them to with ``refuse``."""
        ns, nt = self.num_saved_symints, self.num_saved_tensors
        if self.plan.refusal is not None:
            kept = [*args[ns:], *(ctx.aotgrad_inputs or () if self.plan.extras else ())]
            ctx.maybe_clear_saved_tensors()
            if self.plan.extras and not _torch.keeps_graph():
                ctx.aotgrad_inputs = None
            with torch.no_grad(), _torch.autocast_disabled():
                grads = list(backward(args))
            return grads, kept
        saved, tangents = args[ns:ns + nt], args[ns + nt:]
        primals = self._inputs(ctx, saved)
        ctx.maybe_clear_saved_tensors()
        if self.plan.extras and not _torch.keeps_graph():
            ctx.aotgrad_inputs = None
        args.clear()
        wrt = self.wanted(ctx)
        if not wrt:
            return [None] * len(primals), None
        reused = [saved[j] for j in self.reused]
        vjp = self.function(wrt, missing)
        if _torch.any_autocast_enabled():
            with _torch.autocast_disabled():  # Note [Autocast is traced in] (runtime.py)
                return list(vjp(*primals, *reused, *tangents)), None
        return list(vjp(*primals, *reused, *tangents)), None

    def _inputs(self, ctx: Any, saved: list) -> list:
        plan = self.plan
        extras = ctx.aotgrad_inputs if plan.extras else ()
        if extras is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved "
                "tensors after they have already been freed). Saved intermediate values of the "
                "graph are freed when you call .backward() or autograd.grad(). Specify "
                "retain_graph=True if you need to backward through the graph a second time or "
                "if you need to access saved tensors after calling backward.")
        if plan.versioned:
            self._check_versions(ctx, extras)
        for i, j in self._saved_needing_grad:
            if not saved[j].requires_grad:
                raise RuntimeError(
                    f"aotgrad: the compiled forward returned a copy of input {i} where it saves "
                    "the input itself, so the gradient's own gradient cannot reach it. A "
                    "differentiable backward (create_graph=True) needs a forward compiler that "
                    "returns the graph's inputs as they are.")
        return [extras[k] if kept else saved[k] for kept, k in self._gather]

    def _check_versions(self, ctx: Any, extras: tuple) -> None:
        versions = ctx.aotgrad_versions
        position = self._extra_position
        for k, i in enumerate(self.plan.versioned):
            t = extras[position[i]]
            if versions is None or t._version != versions[k]:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: input {i} of the compiled function "
                    f"({type(t).__name__} of shape {list(t.shape)}) is at version {t._version}; "
                    f"expected version {versions[k] if versions else '(unknown)'} instead. "
                    "(aotgrad's differentiable backward, Note [Higher-order backward], runs the "
                    "program again on its inputs as they were at the forward.)")

    def refuse(self, grads: list, kept: list) -> tuple:
        """Gradients that raise a clear error if autograd differentiates them."""
        present = [k for k, g in enumerate(grads) if g is not None]
        if not present:
            return tuple(grads)
        # the gradients may depend on inputs the backward was not given: tied to a
        # leaf of their own when nothing it was given requires grad, never detached
        deps = [t for t in kept if isinstance(t, torch.Tensor) and t.requires_grad] or \
            [torch.zeros((), requires_grad=True)]
        wrapped = _RefuseDoubleBackward.apply(self.plan.refusal, len(present),
                                              *[grads[k] for k in present], *deps)
        out = list(grads)
        for k, g in zip(present, wrapped):
            out[k] = g
        return tuple(out)


class _RefuseDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, reason, num_grads, *tensors):
        ctx.reason = reason
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "aotgrad: differentiating the gradient of this compiled function (double backward, "
            f"e.g. a gradient penalty) is not supported: {ctx.reason} (Note [Higher-order "
            "backward]). Run that part of the model eagerly.")
