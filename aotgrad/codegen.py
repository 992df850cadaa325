"""Python source made at compile time, run on every call.

Two users: ``nop`` turns an ATen graph into a plain boxed function
(``graph_function``), and the runtime builds its per-program call path from
source (runtime.py).  Both go through ``make_function``, which compiles source
against a namespace of bound objects and registers it with ``linecache`` so
tracebacks and debuggers show the generated lines.

Note [Graphs as plain functions]: ``GraphModule.forward`` spells each op as
``torch.ops.aten.mul.Tensor(...)``: four attribute lookups and a Python-level
``OpOverload.__call__`` per op, which only forwards to the C++ operator
``OpOverload._op``.  ``graph_function`` binds that C++ operator to a local
name instead, takes the boxed argument list (and clears it, so inputs die at
their last use), and drops each value after its last use as FX does.  It
computes exactly what ``gm.forward`` computes; graphs holding submodule calls
are run by ``gm.forward`` itself.

Note [Verified bindings]: calling an ATen overload through ``_op`` parses its
arguments generically against the schema; the generated Python binding of the
same op (``torch.mul``, ``Tensor.view``) is about 0.5 µs faster per call.  The
binding resolves the overload from the arguments' Python types and fills in
defaults of its own, so it is used for a node only after a check proves that,
for arguments of those types, it dispatches exactly the node's overload with
the node's arguments and nothing else: the binding is run once on meta
tensors of the node's shapes under a recording dispatch mode
(``_torch.dispatched_calls``), the arguments the overload received compared
with the node's, defaults filled in from the schema (``_same_arguments``);
the verdict is cached per (overload, argument types).  When the first op dispatched is the node's (not in-place) overload,
the mode returns meta tensors of the node's own result instead of running it:
the same metadata, for whatever might follow, without the cost of a meta
kernel (a Python decomposition, in a cold process).  With a torch function
mode active at run time the binding would be seen by the mode, so the
generated function then runs the ``_op`` version.

Before (``gm.code``)::

    def forward(self, primals_1, primals_2):
        mul = torch.ops.aten.mul.Tensor(primals_1, primals_2)
        sin = torch.ops.aten.sin.default(mul)
        ...

After::

    def forward(args):
        primals_1, primals_2 = args; args.clear()
        mul = f0(primals_1, primals_2)
        sin = f1(mul)
        ...
"""

from __future__ import annotations

import itertools
import linecache
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _torch

_counter = itertools.count()


def make_function(source: str, name: str, namespace: dict[str, Any]) -> Callable:
    """Compile ``source`` (which defines ``name``) with ``namespace`` as globals."""
    filename = f"<aotgrad generated {name} {next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    fn = namespace[name]
    fn.__aotgrad_source__ = source  # type: ignore[attr-defined]
    return fn


_ITEM = re.compile(r"(\w+)\[(\d+)\]")


def read_inputs(exprs: Sequence[str]) -> list[str]:
    """Lines binding ``i{k}`` to ``exprs[k]``; consecutive items of one
    sequence (``leaves[3]``, ``leaves[4]`` ...) in one statement,
    ``i3, i4, = leaves[3:5]``: a large program's reads in a line or two
    (compiling the source is part of a cold first call)."""
    lines, k = [], 0
    while k < len(exprs):
        item = _ITEM.fullmatch(exprs[k])
        end = k + 1
        if item is not None:
            seq, first = item.group(1), int(item.group(2))
            while end < len(exprs) and exprs[end] == f"{seq}[{first + end - k}]":
                end += 1
        if end - k > 1:
            names = ", ".join(f"i{j}" for j in range(k, end))
            lines.append(f"    {names}, = {seq}[{first}:{first + end - k}]")
        else:
            lines.append(f"    i{k} = {exprs[k]}")
        k = end
    return lines


class Namespace:
    """Objects the generated code refers to, each bound once to a fresh name."""

    def __init__(self, prefix: str = "c"):
        self.values: dict[str, Any] = {}
        self._by_id: dict[int, str] = {}
        self._prefix = prefix

    def bind(self, value: Any, hint: str = "") -> str:
        name = self._by_id.get(id(value))
        if name is None:
            hint = re.sub(r"\W", "_", hint)
            name = f"__{self._prefix}{len(self.values)}_{hint}"
            self._by_id[id(value)] = name
            self.values[name] = value
        return name


_LITERALS = (bool, int, str, type(None))


def _format(value: Any, ns: Namespace, names: dict | None = None) -> str:
    """Source for one argument of a graph node (``names``: nodes read under
    another node's name, Note [Broadcast expands])."""
    if isinstance(value, fx.Node):
        return names.get(value, value.name) if names else value.name
    if type(value) in _LITERALS:
        return repr(value)
    if type(value) is float:
        return repr(value) if math.isfinite(value) else ns.bind(value)
    if isinstance(value, (list, tuple)):  # also fx's immutable_list, torch.Size
        items = [_format(v, ns, names) for v in value]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_format(k, ns, names)}: {_format(v, ns, names)}"
                               for k, v in value.items()) + "}"
    return ns.bind(value)  # dtypes, devices, slices, memory formats, ...


@dataclass(frozen=True)
class Binding:
    """A verified Python binding of an ATen overload (Note [Verified bindings]);
    ``spread``: the trailing int list goes as separate arguments
    (``x.view(2, 4)``: the parser is faster with ints than with a list)."""
    fn: Callable
    spread: bool

    def args(self, args: tuple) -> tuple:
        return (*args[:-1], *args[-1]) if self.spread else args


def _call_source(node: fx.Node, ns: Namespace, bindings: bool,
                 names: dict | None = None) -> tuple[str, bool]:
    """The call expression of ``node`` (an ``_Rewrite`` stands for the node it
    replaces), and whether it uses a binding."""
    target = node.target
    args = node.args
    binding = None
    if isinstance(target, _torch.OpOverload):  # Note [Graphs as plain functions]
        binding = verified_binding(node) if bindings else None
        if binding is not None:
            callee = ns.bind(binding.fn, target._opname)
            args = binding.args(args)
        else:
            callee = ns.bind(target._op, target._opname)
    else:
        callee = ns.bind(target, getattr(target, "__name__", "fn"))
    parts = [_format(a, ns, names) for a in args]
    parts += [f"{k}={_format(v, ns, names)}" for k, v in node.kwargs.items()]
    return f"{callee}({', '.join(parts)})", binding is not None


_verdicts: dict[tuple, Binding | None] = {}


def _kind(value: Any) -> Any:
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        # symbolic sizes: no binding (checking one would specialize them)
        static = isinstance(val, torch.Tensor) and all(type(d) is int for d in val.shape)
        return "tensor" if static else None
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_kind(v) for v in value))
    return type(value) if type(value) in (bool, int, float, type(None)) else None


def verified_binding(node: "fx.Node | _Rewrite") -> Binding | None:
    """Note [Verified bindings]: the Python binding of ``node``'s overload, if
    it provably dispatches that overload for arguments like ``node``'s."""
    target = node.target
    if node.kwargs or target.namespace != "aten":
        return None
    kinds = tuple(_kind(a) for a in node.args)
    if None in kinds or any(isinstance(k, tuple) and None in k for k in kinds):
        return None
    key = (target, kinds)
    if key not in _verdicts:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        _verdicts[key] = _check_binding(target, node.args, val)
    return _verdicts[key]


def _check_binding(target: Any, args: tuple, val: Any) -> Binding | None:
    name = target._schema.name.split("::")[1]
    fn = getattr(_torch.VariableFunctions, name, None) or getattr(_torch.TensorBase, name, None)
    if fn is None or not _is_builtin(fn):
        return None

    def meta(value: Any) -> Any:
        if isinstance(value, fx.Node):
            value = value.meta["val"]
        if isinstance(value, torch.Tensor):
            return _meta_like(value)
        if isinstance(value, (list, tuple)):
            return type(value)(meta(v) for v in value)
        return value

    ints = len(args) == 2 and isinstance(args[1], (list, tuple)) and args[1] and \
        all(type(v) is int for v in args[1])
    # the node's own result (its metadata) stands in for running the overload
    stand_in = (target, meta(val)) if _static_tensors(val) and \
        not target._schema.is_mutable else None
    meta_args = tuple(meta(a) for a in args)
    expected = _normalized(target._schema, meta_args, {})
    for binding in ([Binding(fn, True)] if ints else []) + [Binding(fn, False)]:
        try:
            calls = _torch.dispatched_calls(binding.fn, binding.args(meta_args), stand_in)
        except Exception:  # no meta kernel, symbolic sizes, an argument the binding refuses
            continue
        if len(calls) == 1 and calls[0][0] is target and expected is not None and \
                _same_arguments(_normalized(target._schema, *calls[0][1:]), expected):
            return binding
    return None


def _normalized(schema: Any, args: tuple, kwargs: dict) -> list | None:
    """Every argument of ``schema``, as given or by its default (None: one
    is missing)."""
    values = []
    for k, arg in enumerate(schema.arguments):
        if k < len(args):
            values.append(args[k])
        elif arg.name in kwargs:
            values.append(kwargs[arg.name])
        elif arg.has_default_value():
            values.append(arg.default_value)
        else:
            return None
    return values


def _same_arguments(got: Any, expected: Any) -> bool:
    """Note [Verified bindings]: the binding passed the overload the node's
    very arguments: the same tensors, equal values of the same types (a
    binding's own defaults may differ from the schema's:
    ``torch.binary_cross_entropy_with_logits(a, b)`` passes ``reduction=0``
    where the schema's default is 1, the mean)."""
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        return got is expected
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(
            _same_arguments(g, e) for g, e in zip(got, expected))
    return type(got) is type(expected) and got == expected


def _static_tensors(val: Any) -> bool:
    """A tensor, or a tuple of them, with static sizes and strides."""
    if isinstance(val, torch.Tensor):
        return all(type(d) is int for d in (*val.shape, *val.stride(), val.storage_offset()))
    return isinstance(val, tuple) and bool(val) and all(_static_tensors(v) for v in val)


_BROADCASTING = frozenset(("aten::mul.Tensor", "aten::add.Tensor", "aten::sub.Tensor",
                           "aten::div.Tensor"))


def _broadcast_expands(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Note [Broadcast expands]: ``expand(x, S)`` whose every user is a
    mul/add/sub/div of it with a contiguous tensor of shape S and x's dtype
    and device (and no other argument) computes, through broadcasting,
    exactly what the op computes with ``x`` itself: same values, shape S,
    dtype, contiguous result.  Backward graphs are full of these (the
    gradient of a sum); ``nop`` passes ``x`` and skips the expand.  Returns
    expand -> x."""
    found = {}
    for node in graph.find_nodes(op="call_function", target=_torch.aten.expand.default):
        src, val = node.args[0], node.meta.get("val")
        src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor) and
                all(type(d) is int for d in val.shape) and node.users):
            continue
        shape = tuple(val.shape)

        def fits(user: fx.Node) -> bool:
            if user.op != "call_function" or user.kwargs or len(user.args) != 2 or \
                    getattr(user.target, "_schema", None) is None or \
                    f"{user.target._schema.name}.{user.target._overloadname}" not in _BROADCASTING:
                return False
            a, b = user.args
            other = b if a is node else a
            ov, uv = getattr(other, "meta", {}).get("val"), user.meta.get("val")
            return other is not node and isinstance(other, fx.Node) and \
                isinstance(ov, torch.Tensor) and isinstance(uv, torch.Tensor) and \
                tuple(ov.shape) == shape and tuple(uv.shape) == shape and \
                ov.dtype == src_val.dtype == val.dtype and ov.device == src_val.device and \
                ov.is_contiguous()

        if all(fits(u) for u in node.users):
            found[node] = src
    return found


def fresh_outputs(gm: fx.GraphModule) -> frozenset[int]:
    """Positions of ``gm``'s outputs whose value is made by an op that never
    returns an alias of its arguments (so never a view), when run as Python."""
    outs = gm.graph.output_node().args[0]
    if not isinstance(outs, (list, tuple)):
        return frozenset()

    def fresh(n: Any) -> bool:
        schema = getattr(n.target, "_schema", None) if isinstance(n, fx.Node) and \
            n.op == "call_function" else None
        return schema is not None and all(r.alias_info is None for r in schema.returns)

    return frozenset(k for k, n in enumerate(outs) if fresh(n))


@dataclass(frozen=True)
class _Rewrite:
    """A node's call, written another way (Note [Peepholes])."""
    target: Any
    args: tuple
    kwargs: dict


def _peepholes(graph: fx.Graph, skipped: dict[fx.Node, fx.Node]
               ) -> dict[fx.Node, _Rewrite]:
    """Note [Peepholes]: two patterns of backward graphs that ``nop`` runs in
    fewer ops, exactly (same values, shape, strides, dtype):

    * ``t(t(x))`` is ``x``: the inner ``t`` has no other user; returned from
      the graph only when ``x`` is neither an input nor returned itself (the
      returned tensors stay distinct non-inputs, Note [Distinct outputs]).
      ``t`` on two dimensions or fewer swaps strides, so twice restores
      them; the result is ``x`` rather than a view of it.  Adds to
      ``skipped``: node -> the node whose value it takes.
    * ``view(sum(g, dims, True), S)``, ``S`` the sum's shape without the
      summed dims and the sum's only user the view: ``sum(g, dims)`` (both
      contiguous).  Returns view -> its rewrite; the sum is skipped.
    """
    aten = _torch.aten
    out_node = graph.output_node()
    for t2 in graph.find_nodes(op="call_function", target=aten.t.default):
        t1 = t2.args[0]
        if not (isinstance(t1, fx.Node) and t1.target is aten.t.default and
                len(t1.users) == 1 and t1 not in skipped):
            continue
        x = skipped.get(t1.args[0], t1.args[0])
        if out_node in t2.users and (x.op == "placeholder" or out_node in x.users):
            continue
        skipped[t1] = skipped[t2] = x
    rewrites = {}
    for view in graph.find_nodes(op="call_function", target=aten.view.default):
        total = view.args[0]
        if not (isinstance(total, fx.Node) and total.target is aten.sum.dim_IntList and
                len(total.users) == 1 and total not in skipped and
                len(total.args) == 3 and total.args[2] is True):
            continue
        val = total.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(type(d) is int for d in val.shape):
            continue
        dims = {d % val.dim() for d in total.args[1]} if val.dim() else set()
        kept = [d for k, d in enumerate(val.shape) if k not in dims]
        if list(view.args[1]) != kept:
            continue
        rewrites[view] = _Rewrite(aten.sum.dim_IntList, (total.args[0], total.args[1]),
                                  dict(total.kwargs))
        skipped[total] = total  # emitted by the view's rewrite; no other user
    for node, src in skipped.items():  # an expand of a t(t(x)) reads x
        while src in skipped and skipped[src] is not src:
            src = skipped[src]
        skipped[node] = src
    return rewrites


#: ``GraphModule.meta`` key: {graph output position: graph input index} for the
#: new values of inputs the runtime writes back with a plain ``copy_`` (Note
#: [Updates in place], runtime.py)
INPUT_UPDATES_META = "aotgrad_input_updates"


def _in_place_variant(target: Any) -> Any:
    """``aten.add_.Tensor`` for ``aten.add.Tensor``, if it exists and writes its self."""
    name = target._schema.name
    if not name.startswith("aten::") or target.namespace != "aten":
        return None
    packet = getattr(_torch.aten, name[len("aten::"):] + "_", None)
    variant = getattr(packet, target._overloadname, None) if packet is not None else None
    if variant is None:
        return None
    args, own = variant._schema.arguments, target._schema.arguments
    if len(args) != len(own) or not args or args[0].alias_info is None or \
            not args[0].alias_info.is_write or \
            [a.name for a in args[1:]] != [a.name for a in own[1:]]:
        return None
    return variant


def _updates_in_place(gm: fx.GraphModule) -> tuple[dict[fx.Node, "_Rewrite"], frozenset[int]]:
    """Note [Updates in place] (runtime.py): the input updates of
    ``INPUT_UPDATES_META`` that the graph can compute into the input itself:
    ``new = op(x, ...)`` with ``x`` the input, read by nothing after ``op``
    and not returned, ``new`` of ``x``'s shape, strides, dtype and device, no
    other argument sharing ``x``'s memory, and ``new`` returned elsewhere only
    as a value saved for the backward.  Returns the rewrites (``op_(x, ...)``)
    and the output positions they cover."""
    updates = gm.meta.get(INPUT_UPDATES_META)
    if not updates:
        return {}, frozenset()
    from .descriptors import DESC, Saved

    graph = gm.graph
    out_node = graph.output_node()
    outs = out_node.args[0]
    descs = out_node.meta.get(DESC) or ()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    order = {n: k for k, n in enumerate(graph.nodes)}
    rewrites: dict[fx.Node, _Rewrite] = {}
    done = set()
    for pos, index in updates.items():
        new, x = outs[pos], placeholders[index]
        if not (isinstance(new, fx.Node) and new.op == "call_function" and
                isinstance(new.target, _torch.OpOverload) and new.args and new.args[0] is x
                and new not in rewrites):
            continue
        variant = _in_place_variant(new.target)
        xv, nv = x.meta.get("val"), new.meta.get("val")
        if variant is None or not (isinstance(xv, torch.Tensor) and isinstance(nv, torch.Tensor)):
            continue
        if (tuple(xv.shape), xv.stride(), xv.dtype, xv.device) != \
                (tuple(nv.shape), nv.stride(), nv.dtype, nv.device) or \
                not all(type(d) is int for d in (*xv.shape, *xv.stride())):
            continue
        memory = _torch.storage_of(xv)
        others = [a for a in _torch.pytree.tree_leaves((new.args[1:], new.kwargs))
                  if isinstance(a, fx.Node)]
        if any(isinstance(a.meta.get("val"), torch.Tensor) and
               _torch.storage_of(a.meta["val"]) == memory for a in others):
            continue
        if any(order[u] > order[new] for u in x.users if u is not new) or out_node in x.users:
            continue
        if any(o is new and k != pos and not (k < len(descs) and isinstance(descs[k], Saved))
               for k, o in enumerate(outs)):
            continue
        rewrites[new] = _Rewrite(variant, new.args, dict(new.kwargs))
        done.add(pos)
    return rewrites, frozenset(done)


def _addresses_storage(op_name: str) -> bool:
    """Ops that place their result in storage absolutely: ``as_strided``
    (strides and offset), ``set_``, storage access."""
    return "as_strided" in op_name or "set_" in op_name or "storage" in op_name


#: ``gm.meta`` key: the program read a storage offset in Python while it was
#: traced (Note [Offsets read in Python], values.py)
OFFSETS_READ_META = "aotgrad_offsets_read"


def reads_storage_offsets(gm: fx.GraphModule) -> bool:
    """Whether an op of ``gm`` addresses storage absolutely, reading its
    inputs' storage offsets (Note [Offsets nobody reads], runtime.py), or the
    program read one while it was traced."""
    if gm.meta.get(OFFSETS_READ_META):
        return True
    for n in gm.graph.nodes:
        if n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if schema is None and n.target is not operator.getitem:
                return True  # not an ATen op: assume it may
            if schema is not None and _addresses_storage(schema.name):
                return True
        elif n.op not in ("placeholder", "output", "get_attr"):
            return True
    return False


# Note [Ops that take any strides]: ops whose kernels compute the same values
# for inputs of any strides (TensorIterator's pointwise ops and sums, BLAS
# matmuls, which copy what they cannot take), and views that accept any
# strides.  Not every kernel does: ``native_group_norm_backward`` reads its
# gradient as if contiguous (autograd's formula makes it so), and gives
# garbage for an expanded one.  So a tangent is passed as it comes only
# when every op it reaches is one of these, checked op by op.
_ANY_STRIDES = frozenset((
    "aten::sum.dim_IntList", "aten::sum.default", "aten::mean.dim", "aten::mean.default",
    "aten::mm.default", "aten::bmm.default", "aten::addmm.default", "aten::mv.default",
    "aten::dot.default", "aten::t.default", "aten::transpose.int", "aten::permute.default",
    "aten::expand.default", "aten::unsqueeze.default", "aten::squeeze.dim",
    "aten::squeeze.dims", "aten::squeeze.default", "aten::select.int", "aten::slice.Tensor",
    "aten::clone.default", "aten::_to_copy.default", "aten::detach.default",
    "aten::alias.default", "aten::neg.default"))


def _takes_any_strides(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    if not isinstance(n.target, _torch.OpOverload):
        return False
    if torch.Tag.pointwise in n.target.tags:
        return True
    return f"{n.target._schema.name}.{n.target._overloadname}" in _ANY_STRIDES


def stride_free_inputs(gm: fx.GraphModule) -> frozenset[int]:
    """Positions of ``gm``'s inputs whose strides no op of the graph depends
    on (Note [Tangents as they come], runtime.py): everything computed from
    them goes only through ops that take any strides (Note [Ops that take
    any strides]) to the graph's outputs."""
    sensitive: set[fx.Node] = set()
    for n in reversed(gm.graph.nodes):
        if n.op == "output":
            continue
        if n in sensitive or (n.op != "placeholder" and not _takes_any_strides(n)):
            sensitive.update(n.all_input_nodes)
            sensitive.add(n)
    placeholders = gm.graph.find_nodes(op="placeholder")
    return frozenset(k for k, p in enumerate(placeholders) if p not in sensitive)


def graph_function(gm: fx.GraphModule) -> Callable[[list], Any]:
    """A boxed function computing what ``gm.forward`` computes
    (Note [Graphs as plain functions], Note [Verified bindings])."""
    fast = _graph_function(gm, bindings=True)
    if not fast.__aotgrad_bindings__:
        return fast
    mode_on = _torch.torch_function_mode_enabled
    plain: list[Callable] = []  # made on first use: rare

    def forward(args: list) -> Any:
        if mode_on():
            if not plain:
                plain.append(_graph_function(gm, bindings=False))
            return plain[0](args)
        return fast(args)

    forward.__aotgrad_source__ = fast.__aotgrad_source__  # type: ignore[attr-defined]
    forward.__aotgrad_updated__ = fast.__aotgrad_updated__  # type: ignore[attr-defined]
    return forward


_UNREAD = "__unread"


def _unpacked_results(graph: fx.Graph) -> dict[fx.Node, list[str]]:
    """Note [Results unpacked]: a node whose results are read only through
    ``getitem`` with distinct constant indices (``_native_batch_norm_legit_functional``
    and its five) is written ``a, b, c, = op(...)``: one statement for the
    node and its items instead of one each plus one dropping the tuple.  What
    the function computes is the same; its source is shorter, and compiling
    the source is a good part of a cold first call (a CNN's two graphs: 474
    lines, about 6 ms).  Returns node -> the names bound, ``_UNREAD`` for an
    index nothing reads (dropped right after)."""
    found = {}
    for node in graph.find_nodes(op="call_function", target=operator.getitem):
        tup = node.args[0]
        if tup in found or not isinstance(tup, fx.Node) or tup.op != "call_function":
            continue
        val = tup.meta.get("val")  # a tuple: an op of several results, never a Tensor[]
        if not isinstance(val, tuple) or not isinstance(tup.target, _torch.OpOverload) or \
                len(tup.target._schema.returns) != len(val):
            continue
        targets = [_UNREAD] * len(val)
        for item in tup.users:
            k = item.args[1] if item.target is operator.getitem and len(item.args) == 2 \
                and not item.kwargs else None
            if type(k) is not int or not 0 <= k < len(val) or targets[k] != _UNREAD:
                break
            targets[k] = item.name if item.users else _UNREAD
        else:
            found[tup] = targets
    return found


def _graph_function(gm: fx.GraphModule, bindings: bool) -> Callable[[list], Any]:
    graph = gm.graph
    if type(graph._codegen) is not fx.graph.CodeGen or any(
            n.op == "call_module" or (n.op == "placeholder" and n.target.startswith("*"))
            for n in graph.nodes):
        fw = gm.forward

        def run_module(args: list) -> Any:
            return fw(*args)

        run_module.__aotgrad_bindings__ = False  # type: ignore[attr-defined]
        run_module.__aotgrad_updated__ = frozenset()  # type: ignore[attr-defined]
        return run_module
    ns = Namespace("op")
    skipped = _broadcast_expands(graph) if bindings else {}
    rewrites = _peepholes(graph, skipped) if bindings else {}
    in_place, updated = _updates_in_place(gm)  # both variants: the runtime relies on it
    rewrites.update(in_place)
    names = {e: src.name for e, src in skipped.items()}
    used_bindings = bool(skipped or rewrites)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in reversed(graph.nodes):
        if node in skipped:
            continue
        if node in rewrites:
            read: list[fx.Node] = []
            fx.node.map_arg(rewrites[node].args, read.append)
        else:
            read = node.all_input_nodes
        for used in read:
            last_use.setdefault(skipped.get(used, used), node)
    dies_after: dict[fx.Node, list[str]] = {}
    for value, user in last_use.items():
        if user.op != "output":
            dies_after.setdefault(user, []).append(value.name)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    lines = ["def forward(args):"]
    if placeholders:
        lines.append(f"    {', '.join(n.name for n in placeholders)}, = args")
    lines.append("    args.clear()")
    unused = [n.name for n in placeholders if not n.users]
    if unused:
        lines.append(f"    {' = '.join(unused)} = None")
    unpacked = _unpacked_results(graph)
    items = {item for node in unpacked for item in node.users}
    never_bound = {node.name for node in unpacked}
    for node in graph.nodes:
        if node.op == "placeholder" or node in items:
            continue
        if node.op == "get_attr":
            obj = get_attr_path(gm, node.target)
            lines.append(f"    {node.name} = {ns.bind(obj, 'attr')}")
        elif node in skipped:
            continue
        elif node in unpacked:
            source, bound = _call_source(rewrites.get(node, node), ns, bindings, names)
            used_bindings |= bound
            targets = unpacked[node]
            lines.append(f"    {', '.join(targets)}, = {source}")
            if _UNREAD in targets:
                lines.append(f"    {_UNREAD} = None")
        elif node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and type(node.args[1]) is int:
            lines.append(f"    {node.name} = {_format(node.args[0], ns, names)}[{node.args[1]}]")
        elif node.op == "call_function":
            source, bound = _call_source(rewrites.get(node, node), ns, bindings, names)
            used_bindings |= bound
            lines.append(f"    {node.name} = {source}")
        elif node.op == "call_method":
            self_arg, *rest = node.args
            args = [_format(a, ns) for a in rest]
            args += [f"{k}={_format(v, ns)}" for k, v in node.kwargs.items()]
            lines.append(f"    {node.name} = {_format(self_arg, ns)}.{node.target}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"    return {_format(node.args[0], ns, names)}")
            continue
        dead = [name for name in dies_after.get(node, ())
                if name != node.name and name not in never_bound]
        if node.op != "output" and not node.users and node not in unpacked:
            dead.append(node.name)
        if dead:
            lines.append(f"    {' = '.join(dead)} = None")
    fn = make_function("\n".join(lines) + "\n", "forward", dict(ns.values))
    fn.__aotgrad_bindings__ = used_bindings  # type: ignore[attr-defined]
    fn.__aotgrad_updated__ = updated  # type: ignore[attr-defined]
    return fn


def _is_builtin(fn: Any) -> bool:
    """A binding written in C++ (not a Python wrapper around one)."""
    return type(fn).__name__ in ("builtin_function_or_method", "method_descriptor")


def _meta_like(val: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``val``'s static metadata (raises if symbolic)."""
    return torch.empty_strided([int(d) for d in val.shape], [int(d) for d in val.stride()],
                               dtype=val.dtype, device="meta")


def get_attr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root
