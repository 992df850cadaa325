"""Values the program reads from its tensors, specialised on and guarded.

Note [Values read while tracing]
================================
aotgrad traces on fake tensors, which have no values.  A program that reads
one (``if torch.equal(mask, causal)``, ``x.item()``, ``bool(t)``, a Python
``if`` on a tensor) stops the trace with a data-dependence error; PyTorch's
AOTAutograd stops there too.  When the call's inputs are real (``aot_function``,
``aot_module``, not dynamo's fake examples) aotgrad goes beyond it:

1. *Record.*  The program runs once on copies of the real inputs (so input
   mutations stay unseen, and with the RNG state forked, so random numbers
   the compiled call draws are eager's), functionalized, under ``make_fx`` in
   real mode and a mode that notes each read op and the value it gave
   (``READ_OPS``: every path to a Python value from a tensor ends in one of
   them).  The graph make_fx records holds, for every read, the ops that
   compute it from the inputs.
2. *Specialise.*  The trace runs again with a mode on top of aotgrad's own
   that answers the k-th read with the k-th recorded value (and refuses a
   read of another op at that position: the program took another path).  The
   compiled graphs hold the program as it runs for those values.
3. *Guard.*  The recorded graph, cut down to the ancestors of the reads, is
   the guard: each call runs it on its inputs (under no_grad) and compares
   what it reads with the recorded values; a difference (or other input sizes
   than the guard was made for: its ops hold the example's sizes) raises
   ``ValueGuardFailed``, and the call gets a compilation of its own for its
   values (api.py, as for Note [Shape guards]).

The guard computes only what the reads need, so its cost is that of the
checks the program makes (a mask comparison, a sum).  A read that depends on
random numbers, or that the guard could only compute by writing into an
input, cannot be guarded exactly: that raises, naming the read.  A read
inside a backward (a custom Function's) happens after the forward trace
returns and is not answered: it keeps the data-dependence error.  Exports
never specialise (they promise a graph for every input value).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _torch, hops, subclass
from .flatten import FlatFunction, FlatInputs
from .partition import ancestors

_aten = _torch.aten
# Where a tensor's value becomes a Python value: .item(), bool(t), int(t),
# .tolist() and `if t:` all end in _local_scalar_dense (item and is_nonzero
# when not decomposed first); torch.equal answers a bool directly.
READ_OPS = frozenset({_aten._local_scalar_dense.default, _aten.item.default,
                      _aten.equal.default, _aten.is_nonzero.default})


class RandomRead(ValueError):
    """A value read depends on random numbers: no specialisation can hold."""


class GuardFailed(Exception):
    """The call breaks an assumption its compiled program was made under; it
    gets a compilation of its own (api.py)."""


class ValueGuardFailed(GuardFailed):
    """The call's inputs read other values than the compiled program assumed."""


@dataclass(frozen=True)
class ValueReads:
    """What one eager run read (Note [Values read while tracing])."""
    ops: tuple               # per read: the op
    values: tuple            # per read: the Python value it gave
    guard: fx.GraphModule    # guard inputs -> the tuple of values read
    guard_inputs: tuple      # the graph inputs the guard takes (indices)
    sizes: tuple             # per guard input: the size the guard was made for


# Note [Offsets read in Python]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The fast path leaves out the storage offsets of inputs the graphs never
# address absolutely (Note [Offsets nobody reads], runtime.py).  A program
# that reads one in Python (``x + x.storage_offset()``) bakes the traced
# value into its graph, which then holds for that offset only.  While the
# program is traced, ``Tensor.storage_offset`` called from code outside torch
# and aotgrad is noted (``offsets_read``), and the graphs then count as
# reading offsets: the guard checks them, and another offset compiles again.
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


class offsets_read:
    """Note [Offsets read in Python]: ``with offsets_read() as reads:``, then
    ``reads.seen``."""

    def __enter__(self) -> "offsets_read":
        self.seen = False
        self._saved = torch.Tensor.__dict__.get("storage_offset")
        base = torch._C.TensorBase.storage_offset

        def storage_offset(t: torch.Tensor) -> Any:
            if not self.seen and \
                    not sys._getframe(1).f_code.co_filename.startswith(_LIBRARY_DIRS):
                self.seen = True
            return base(t)

        torch.Tensor.storage_offset = storage_offset  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is None:
            del torch.Tensor.storage_offset
        else:
            torch.Tensor.storage_offset = self._saved  # type: ignore[method-assign]


def copy_for_eager(x: Any) -> Any:
    """A copy with the same strides (whether a view is possible depends on them)."""
    if not isinstance(x, torch.Tensor):
        return x
    if subclass.is_subclass(x):
        return x.detach().clone().requires_grad_(x.requires_grad) if x.is_leaf else x.clone()
    if torch._debug_has_internal_overlap(x) == 1:  # an expand: copy the storage itself
        copy = x.new_empty(0).set_(x.untyped_storage().clone(), x.storage_offset(),
                                   x.size(), x.stride())
        return copy.requires_grad_(x.requires_grad) if x.is_leaf else copy
    copy = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    if x.is_leaf:
        with torch.no_grad():
            copy.copy_(x)
        return copy.requires_grad_(x.requires_grad)
    return copy.copy_(x)


def rng_kept(tensors: Sequence[Any]) -> Any:
    """A context after which the random state (CPU, and the CUDA devices of
    ``tensors``) is what it was before: an extra eager run draws no numbers
    the compiled call would then miss."""
    devices = sorted({x.device.index or 0 for x in tensors
                      if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


class _Noting(_torch.TorchDispatchMode):
    """Notes each read and its value (step 1)."""

    ignore_compile_internals = hops.transparent_to_hop_compiles  # Note [Dynamo under
    # aotgrad's modes] (hops.py); higher-order ops pass through (a read inside
    # one's body is not answered: it keeps the data-dependence error)
    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in READ_OPS:
            return func(*args, **(kwargs or {}))
        out = _torch.read_recorded(func, args, kwargs or {})
        self.reads.append((func, out))
        return out


def record_reads(flat_fn: FlatFunction, graph_inputs: Sequence[Any],
                 grad_enabled: bool) -> ValueReads:
    """Step 1: run the program on copies of ``graph_inputs`` and make the guard.
    Raises (any error) where that cannot be done; the caller then keeps the
    data-dependence error."""
    copies = [copy_for_eager(x) for x in graph_inputs]
    noting = _Noting()

    def noted(*xs: Any) -> Any:
        with noting:
            return flat_fn(*xs)

    try:
        with rng_kept(copies), torch.set_grad_enabled(grad_enabled):
            gm = _torch.make_fx(torch.func.functionalize(noted, remove="mutations_and_views"),
                                tracing_mode="real")(*copies)
    except RuntimeError:
        # functionalize's tensors do not require grad, and a program that
        # differentiates its inputs (the second program of a double backward:
        # higher_order.VJPProgram) needs them to; the guard refuses ops that
        # write in place (``_guard_graph``), so the recording need not be functional
        noting = _Noting()
        copies = [copy_for_eager(x) for x in graph_inputs]
        with rng_kept(copies), torch.set_grad_enabled(grad_enabled):
            gm = _torch.make_fx(noted, tracing_mode="real")(*copies)
    if not noting.reads:
        raise RuntimeError("no value was read")
    read_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in READ_OPS]
    if [n.target for n in read_nodes] != [op for op, _ in noting.reads]:
        raise RuntimeError("the recorded graph does not hold the reads")
    guard, used = _guard_graph(gm, read_nodes)
    return ValueReads(tuple(op for op, _ in noting.reads), tuple(v for _, v in noting.reads),
                      guard, used, tuple(tuple(graph_inputs[i].shape) for i in used))


def _guard_graph(gm: fx.GraphModule, reads: list[fx.Node]) -> tuple[fx.GraphModule, tuple]:
    """The ancestors of ``reads`` as a graph of the placeholders they use."""
    keep = ancestors(reads)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for n in keep:
        if n.op != "call_function":
            continue
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            raise RuntimeError(f"a value read depends on {n.target}, which writes in place")
        if isinstance(n.target, _torch.OpOverload) and \
                torch.Tag.nondeterministic_seeded in n.target.tags:
            raise RandomRead(
                f"aotgrad: the program reads a value (.item(), torch.equal, `if tensor`) that "
                f"depends on random numbers ({n.target}): it changes on every call, so no "
                "compiled graph can be specialised on it. Move the read out of the compiled "
                "function.")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    used = []
    for k, p in enumerate(placeholders):
        if p in keep:
            env[p] = graph.placeholder(p.name)
            used.append(k)
    for n in gm.graph.nodes:
        if n in keep and n.op != "placeholder":
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[n] for n in reads))
    _without_running_stats(graph)
    return fx.GraphModule(gm, graph), tuple(used)


#: ops that update their running statistics (args 3 and 4) in place when
#: training (arg 5) though their schemas do not say so
_UNDECLARED_WRITES = {_torch.aten.native_batch_norm.default, _torch.aten.cudnn_batch_norm.default,
                      _torch.aten.miopen_batch_norm.default}


def _without_running_stats(graph: fx.Graph) -> None:
    """A training batch norm in the guard graph is given no running
    statistics: its results do not read them, and the guard runs on the
    caller's tensors every call -- with them it would update them a second
    time (silently: the statistics moved twice per call)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _UNDECLARED_WRITES and len(n.args) > 5:
            if n.args[5] is not True:
                continue   # eval mode reads the statistics and writes nothing
            n.args = (*n.args[:3], None, None, *n.args[5:])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, complex) and isinstance(b, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        # -0.0 == 0.0, but 1 / x and copysign tell them apart
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


def reads_hold(reads: ValueReads, graph_inputs: Sequence[Any]) -> bool:
    """Step 3: whether this call's inputs read what ``reads`` recorded."""
    xs = [graph_inputs[i] for i in reads.guard_inputs]
    if any(tuple(x.shape) != s for x, s in zip(xs, reads.sizes)):
        return False
    with torch.no_grad():
        got = reads.guard(*xs)
    return all(_same(a, b) for a, b in zip(got, reads.values))


def value_guarded(run: Callable[[list], Any], reads: ValueReads,
                  graph_leaf: Sequence[int]) -> Callable[[list], Any]:
    """``run`` for calls whose reads give the recorded values, else ValueGuardFailed."""
    def guarded(leaves: list) -> Any:
        if not reads_hold(reads, [leaves[i] for i in graph_leaf]):
            raise ValueGuardFailed()
        return run(leaves)

    return guarded


class _Answering(_torch.TorchDispatchMode):
    """Answers the k-th read with the k-th recorded value (step 2)."""

    ignore_compile_internals = hops.transparent_to_hop_compiles  # Note [Dynamo under
    # aotgrad's modes] (hops.py); higher-order ops pass through (a read inside
    # one's body is not answered: it keeps the data-dependence error)
    supports_higher_order_operators = True

    def __init__(self, reads: ValueReads) -> None:
        super().__init__()
        self.reads = reads
        self.next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in READ_OPS:
            return func(*args, **(kwargs or {}))
        k, ops = self.next, self.reads.ops
        if k >= len(ops) or ops[k] is not func:
            raise RuntimeError(
                f"aotgrad: while tracing, the program read a tensor's value ({func}) where "
                "its eager run read " + (f"{ops[k]}" if k < len(ops) else "nothing more") +
                ": it does not take the same path on the same values (Note [Values read "
                "while tracing]). Make the reads depend only on the inputs, or move them "
                "out of the compiled function.")
        self.next += 1
        return self.reads.values[k]


class AnsweredFunction(FlatFunction):
    """``fn`` whose reads of tensor values are answered from ``reads``."""

    def __init__(self, fn: Callable, flat: FlatInputs, reads: ValueReads):
        super().__init__(fn, flat)
        self.reads = reads

    def __call__(self, *graph_inputs: Any) -> list[Any]:
        with _Answering(self.reads):
            return super().__call__(*graph_inputs)
