"""Outputs of unknown types, opened: Note [Opened output objects].

``FlatFunction`` (flatten.py) hands an output whose pytree has leaves of
types pytree cannot look into (an unregistered dataclass, transformers'
``DynamicCache``) to ``open_output``.  It walks the whole output, finds the
tensors and symbolic sizes in it, and returns them as the output leaves with
a TreeSpec whose root is an ``_Opened`` node: its context is a ``Template``,
whose unflatten builds a fresh copy of the user's objects from the leaves.

    out = CausalLMOutputWithPast(logits=l, cache=DynamicCache(layers=[L0, L1]))
    leaves:   [l, L0.keys, L0.values, L1.keys, L1.values]
    spec:     TreeSpec(_Opened, <opened CausalLMOutputWithPast: 5 leaves>, [*, *, *, *, *])
    at run time, tree_unflatten(leaves, spec) builds a new ModelOutput holding
    a new DynamicCache holding a new list of new DynamicLayers holding the
    call's tensors; the config, dtypes, classes ... are the same objects.
"""

from __future__ import annotations

import datetime
import enum
import functools
import gc
import numbers
import re
import types
import typing
from typing import Any

import torch

from . import _torch
from ._torch import pytree
from .state import MISSING, instance_dict, slot_descriptors, set_state

# Note [Opened output objects]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# An output is traced once: an object of a type pytree cannot open (an
# unregistered dataclass, a Hugging Face cache) would come back as that one
# object on every call, holding the trace's fake tensors.  PyTorch's
# AOTAutograd refuses it ("Found <type> in output, which is not a known
# type"); aotgrad opens it.  The walk (``_Walk``) goes by id, so shared
# objects and cycles stay shared and cyclic:
#
# * tensors, SymInt / SymFloat / SymBool become output leaves: the graphs
#   compute them and the runtime returns them as any output (aliases rebuilt
#   as views, requires_grad, gradients through ``.backward()``, mutations);
# * values (None, bool, numbers, numpy scalars, str, bytes, dtypes, devices,
#   enums, classes, python modules, ScriptObjects) are kept as they are;
# * list, tuple, dict, set, frozenset, torch.Size, pytree-registered nodes
#   (through their own flatten / unflatten), bound methods are opened;
# * objects of classes defined in Python (every base but ``object`` /
#   ``Generic`` a Python class, no C ``__new__``) and SimpleNamespaces:
#   their ``__dict__`` and ``__slots__``, raw (no properties, no
#   ``__getstate__``), which is all the state such an object has;
# * nn.Modules are not looked into; anything else (a C-extension object, a
#   dict subclass, an iterator) is opaque: ``gc.get_referents`` only tells
#   whether it holds tensors.
#
# Then the walk finds which objects are *shared* with the world outside the
# output: those something else refers to (``gc.get_referrers``: a model's
# config, an input, a module attribute), and all they reach.  The rebuild
# gives what eager gives:
#
# * an object the program made (not shared) is rebuilt on every call:
#   ``cls.__new__`` without ``__init__``, its state set raw, the call's
#   tensors in it.  So each call gets new objects, as in eager, even ones
#   holding no tensor: a mutable object returned from the trace would be
#   one object shared by all calls;
# * a shared object holding no tensor stays that very object (as in eager:
#   ``out.config is model.config``); so do shared modules;
# * an object passed in as an argument is the call's own (an INPUT node,
#   found by walking the call's arguments), whatever the program wrote into
#   it (Note [Objects passed in], objects.py);
# * tuples, frozensets, sizes and functions holding only such values stay
#   as they are.
#
# Refused, with torch's error and the path to the culprit: a shared object
# holding tensors (eager returns that object, into which the trace may have
# put its fake tensors: return the tensors instead), tensors in an opaque
# object, a function capturing tensors, a module or an opaque object the
# program made (neither can be rebuilt; immutable ones such as slices,
# patterns or ``functools.partial`` of values pass), a cycle through a tuple
# being rebuilt.  Rebuilding is exact because the rebuilt object holds the
# same state as eager's: the same classes and values, the call's tensors in
# the same places, the same sharing, and no object of the trace.  An output
# with nothing to rebuild (an enum, a config) keeps pytree's leaves, as
# constants.  The walk costs a scan of the heap per trace (tens of ms in a
# process holding transformers); calls pay only the rebuild.

_HEAPTYPE = 1 << 9

# node kinds
LEAF, CONST, LIST, TUPLE, SIZE, DICT, SET, FROZENSET, OBJ, NODE, METHOD, BOUND, FUNC, OPAQUE, \
    MODULE, INPUT = range(16)   # INPUT: an object passed in (Note [Objects passed in], objects.py)
_MUTABLE = frozenset({LIST, DICT, SET, OBJ, NODE, OPAQUE, MODULE})   # identity matters
_FROM_CHILDREN = frozenset({TUPLE, SIZE, FROZENSET, NODE, METHOD, BOUND})
_VALUE_LIKE = frozenset({TUPLE, SIZE, FROZENSET, METHOD, BOUND})

_VALUE_TYPES = frozenset({
    type(None), bool, int, float, complex, str, bytes, type(Ellipsis), type(NotImplemented),
    torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme, torch.finfo,
    torch.iinfo})
_REFERENCE_TYPES = (numbers.Number, type, types.ModuleType, enum.Enum, torch.ScriptObject,
                    types.MethodDescriptorType, types.WrapperDescriptorType,
                    types.GetSetDescriptorType, types.MemberDescriptorType,
                    types.ClassMethodDescriptorType)
# opaque, immutable: kept when made by the program and holding no tensor
_IMMUTABLE_OPAQUE = (slice, range, re.Pattern, functools.partial, types.CodeType,
                     datetime.date, datetime.time, datetime.timedelta, datetime.tzinfo,
                     torch.Stream, torch.Event, property, staticmethod,
                     classmethod)
# never looked into (their referents reach whole module namespaces)
_SEALED = (types.FrameType, types.GeneratorType, types.CoroutineType,
           types.AsyncGeneratorType, types.TracebackType)
_LAYOUT_FREE_BASES = (object, typing.Generic)


class _Opened:
    """The pytree node type of an opened output (never instantiated by aotgrad:
    its TreeSpec is built directly, see ``open_output``)."""

    __slots__ = ("values", "template")

    def __init__(self, values: list, template: "Template"):
        self.values, self.template = values, template


pytree.register_pytree_node(
    _Opened, lambda o: (list(o.values), o.template),
    lambda values, template: template.unflatten(list(values)),
    serialized_type_name="aotgrad.opened._Opened")


class Deferred:
    """An output whose building needs the call's objects passed in (Note
    [Objects passed in], objects.py): what the runtime returns for such a
    program; the caller finishes it with the call's leaves."""

    __slots__ = ("template", "values")

    def __init__(self, template: "Template", values: list):
        self.template, self.values = template, values

    def finish(self, leaves: list) -> Any:
        t = self.template
        inputs = walk_roots([leaves[k] for k in t.object_leaves]).objs
        return t.build(self.values, inputs)


class Template:
    """How to build the user's output from its leaves (Note [Opened output objects]).

    ``nodes[i]`` is ``(kind, payload)``; children are node indices, so that a
    node reached twice is built once.  ``writes`` (Note [Objects passed in],
    objects.py): ``(input node, parts)`` setting the state of an object passed
    in, ``parts`` as ``get_state`` gives them with node indices for values;
    ``object_leaves``: the call's leaves whose walk numbers the input nodes."""

    __slots__ = ("nodes", "root", "num_leaves", "what", "writes", "object_leaves", "uses_inputs",
                 "unknown")

    def __init__(self, nodes: tuple, root: int, num_leaves: int, what: str,
                 writes: tuple = (), object_leaves: tuple = (), uses_inputs: bool = False,
                 unknown: type | None = None):
        self.nodes, self.root, self.num_leaves, self.what = nodes, root, num_leaves, what
        self.writes, self.object_leaves = writes, object_leaves
        self.uses_inputs = uses_inputs or bool(writes)
        self.unknown = unknown  # the first output leaf of a type pytree does not open

    def __repr__(self) -> str:
        writes = f", {len(self.writes)} writes into objects passed in" if self.writes else ""
        return f"<opened {self.what}: {self.num_leaves} leaves{writes}>"

    def unflatten(self, values: list) -> Any:
        return Deferred(self, values) if self.uses_inputs else self.build(values)

    def build(self, values: list, inputs: list | None = None) -> Any:
        nodes, made = self.nodes, {}

        def b(i: int) -> Any:
            kind, p = nodes[i]
            if kind == LEAF:
                return values[p]
            if kind == CONST:
                return p
            if kind == INPUT:
                return inputs[p]
            if i in made:
                return made[i]
            if kind == LIST:
                o = made[i] = []
                o.extend([b(c) for c in p])
            elif kind == DICT:
                o = made[i] = {}
                for k, v in p:
                    key = b(k)
                    o[key] = b(v)
            elif kind == OBJ:
                cls, new, attrs, slots = p
                o = made[i] = new(cls)
                if attrs is not None:
                    state = {name: b(c) for name, c in attrs}
                    object.__getattribute__(o, "__dict__").update(state)
                for desc, c in slots:
                    desc.__set__(o, b(c))
            elif kind == SET:
                o = made[i] = set()
                o.update([b(c) for c in p])
            elif kind == TUPLE:
                o = made[i] = tuple([b(c) for c in p])
            elif kind == SIZE:
                o = made[i] = torch.Size([b(c) for c in p])
            elif kind == FROZENSET:
                o = made[i] = frozenset([b(c) for c in p])
            elif kind == NODE:
                spec, children = p
                o = made[i] = pytree.tree_unflatten([b(c) for c in children], spec)
            elif kind == METHOD:
                func, owner = p
                o = made[i] = types.MethodType(b(func), b(owner))
            else:  # BOUND: a builtin method of a rebuilt object
                owner, name = p
                o = made[i] = getattr(b(owner), name)
            return o

        out = b(self.root)
        if self.writes:
            states = [(inputs[target], [(tag, [(n, MISSING if v < 0 else b(v)) for n, v in data]
                                         if tag in ("attrs", "slots") else
                                         [(b(k), b(v)) for k, v in data] if tag == "map" else
                                         [b(v) for v in data]) for tag, data in parts])
                      for target, parts in self.writes]
            for obj, parts in states:
                set_state(obj, parts)
        return out


def _leaf_spec() -> Any:
    make = getattr(pytree, "treespec_leaf", None)  # torch >= 2.10
    return make() if make is not None else pytree.LeafSpec()


def open_output(out: Any, out_leaves: list, passed: Any = None,
                unknown: type | None = None) -> tuple[list, Any] | None:
    """The leaves and TreeSpec of ``out``, opened (the module docstring); None
    when nothing in it needs rebuilding (pytree's leaves then stand).
    ``passed``: the objects passed in and what the program wrote into them
    (``objects.Passed``, Note [Objects passed in]): those objects are the
    call's own (INPUT nodes), the writes are replayed by the template."""
    walk = _Walk(passed.known if passed is not None else None)
    root = walk.visit(out, None, "", pytree_level=True)
    raw_writes = []
    for target, label, parts in passed.writes if passed is not None else ():
        raw_writes.append((target, [(tag, _visit_part(walk, tag, data, label))
                                    for tag, data in parts]))
    walk.find_shared(exclude={id(out_leaves)} | (passed.exclude if passed is not None else set()))
    plan = _Plan(walk)
    nodes, leaves, writes = plan.template_nodes(root, raw_writes)
    if not plan.rebuilds_objects and not plan.uses_inputs and not writes:
        return None
    template = Template(nodes, 0, len(leaves), type(out).__name__, tuple(writes),
                        passed.object_leaves if passed is not None else (), plan.uses_inputs,
                        unknown)
    spec = pytree.TreeSpec(_Opened, template, [_leaf_spec() for _ in leaves])
    return leaves, spec


def _visit_part(walk: "_Walk", tag: str, data: list, label: str) -> list:
    """The nodes of one part of an object's new state (``get_state``)."""
    if tag == "map":
        return [(walk.visit_root(k, f"{label}<key {k!r}>"), walk.visit_root(v, f"{label}[{k!r}]"))
                for k, v in data]
    if tag in ("attrs", "slots"):
        return [(n, -1 if v is MISSING else
                 walk.visit_root(v, f"{label}.{n if tag == 'attrs' else n.__name__}"))
                for n, v in data]
    return [walk.visit_root(v, f"{label}[{k}]" if tag == "items" else f"{label}<item>")
            for k, v in enumerate(data)]


def walk_roots(roots: list, labels: list | None = None) -> "_Walk":
    """The walk of objects passed in (no sharing analysis): its nodes, in a
    fixed order for objects of the same structure (Note [Objects passed in]);
    ``labels`` name the roots (``origin``)."""
    w = _Walk()
    w.roots = []
    for k, r in enumerate(roots):
        i = w.visit(r, None, "")
        w.roots.append(i)
        if labels is not None:
            w.origin.setdefault(i, labels[k])
    return w


def is_plain_object(x: Any) -> bool:
    """Whether the walk opens ``x`` as an object (OBJ): an instance of a class
    defined in Python, whose whole state is its ``__dict__`` and slots."""
    t = type(x)
    if t in _VALUE_TYPES or isinstance(x, (torch.Tensor, torch.nn.Module, *_torch.sym_types)) \
            or isinstance(x, _REFERENCE_TYPES) or t in _FUNCTION_TYPES \
            or not pytree.tree_is_leaf(x):
        return False
    return _rebuildable(t) is not None


_FUNCTION_TYPES = (types.FunctionType, types.MethodType, types.BuiltinMethodType,
                   types.MethodWrapperType)


class _Walk:
    """The objects reachable from an output, as a graph of nodes."""

    def __init__(self, known: dict[int, int] | None = None) -> None:
        self.known = known or {}        # id -> node of the objects passed in (INPUT)
        self.origin: dict[int, str] = {}  # write values: node -> where it was put
        self.roots: list[int] = []        # walk_roots: the node of each root
        self.objs: list = []            # node -> object (kept alive, so ids stay unique)
        self.node_of: dict[int, int] = {}
        self.kind: list[int] = []
        self.payload: list = []         # kind data; children as node indices
        self.children: list[list[int]] = []
        self.parent: list[tuple[int | None, str]] = []   # the first path to each node
        self.pytree_level: set[int] = set()   # containers pytree itself would open
        self.internal: set[int] = set()       # ids of our objects and their __dict__s
        self.busy: set[int] = set()
        self.cyclic: set[int] = set()         # reached while being walked
        self.shared: set[int] = set()

    def visit(self, x: Any, parent: int | None, step: str, pytree_level: bool = False) -> int:
        i = self.node_of.get(id(x))
        if i is not None:
            if i in self.busy:
                self.cyclic.add(i)
            return i
        i = len(self.objs)
        self.objs.append(x)
        self.node_of[id(x)] = i
        self.kind.append(CONST)
        self.payload.append(None)
        self.children.append([])
        self.parent.append((parent, step))
        self.busy.add(i)
        try:
            self._classify(i, x, pytree_level)
        finally:
            self.busy.discard(i)
        return i

    def visit_root(self, x: Any, label: str) -> int:
        new = id(x) not in self.node_of
        i = self.visit(x, None, "")
        if new:
            self.origin[i] = label
        return i

    def _set(self, i: int, kind: int, payload: Any, children: list[int]) -> None:
        self.kind[i], self.payload[i], self.children[i] = kind, payload, children

    def _classify(self, i: int, x: Any, pytree_level: bool) -> None:
        t = type(x)
        k = self.known.get(id(x)) if self.known else None
        if k is not None:
            self.kind[i], self.payload[i] = INPUT, k  # the call's own object
            return
        if isinstance(x, torch.Tensor) or isinstance(x, _torch.sym_types):
            self.kind[i] = LEAF
            return
        if t in _VALUE_TYPES or isinstance(x, _REFERENCE_TYPES):
            return  # CONST
        if isinstance(x, torch.nn.Module):
            self.kind[i] = MODULE  # not looked into: kept when shared, else refused
            return
        self.internal.add(id(x))
        if pytree_level and (t in (list, tuple, dict, torch.Size) or not pytree.tree_is_leaf(x)):
            self.pytree_level.add(i)  # what pytree itself opens
        else:
            pytree_level = False
        if t is list or t is tuple or t is set or t is frozenset or t is torch.Size:
            kind = {list: LIST, tuple: TUPLE, set: SET, frozenset: FROZENSET,
                    torch.Size: SIZE}[t]
            ch = [self.visit(v, i, f"[{k}]", pytree_level) for k, v in enumerate(list(x))]
            self._set(i, kind, ch, ch)
        elif t is dict:
            pairs = [(self.visit(k, i, f"<key {k!r}>"), self.visit(v, i, f"[{k!r}]", pytree_level))
                     for k, v in list(x.items())]
            self._set(i, DICT, pairs, [c for kv in pairs for c in kv])
        elif t is types.MethodType:
            f = self.visit(x.__func__, i, ".__func__")
            s = self.visit(x.__self__, i, ".__self__")
            self._set(i, METHOD, (f, s), [f, s])
        elif t in (types.BuiltinMethodType, types.MethodWrapperType):
            owner = x.__self__
            if owner is None or isinstance(owner, (types.ModuleType, type)):
                self.internal.discard(id(x))
                return  # a builtin function: CONST
            s = self.visit(owner, i, ".__self__")
            self._set(i, BOUND, (s, x.__name__), [s])
        elif t is types.FunctionType:
            cells = [c.cell_contents for c in x.__closure__ or () if _cell_full(c)]
            values = cells + list(x.__defaults__ or ()) + list((x.__kwdefaults__ or {}).values())
            self._set(i, FUNC, None, [self.visit(v, i, f"<captured {k}>")
                                      for k, v in enumerate(values)])
        elif not pytree.tree_is_leaf(x):
            children, spec = pytree.tree_flatten(x, is_leaf=lambda y: y is not x)
            d = instance_dict(x)
            if d is not None:
                self.internal.add(id(d))
            ch = [self.visit(v, i, f"<{k}>", pytree_level) for k, v in enumerate(children)]
            self._set(i, NODE, (spec, ch), ch)
        else:
            new = _rebuildable(t)
            if new is None:
                self._opaque(i, x)
            else:
                self._object(i, x, t, new)

    def _object(self, i: int, x: Any, t: type, new: Any) -> None:
        attrs = None
        children: list[int] = []
        d = instance_dict(x)
        if d is not None:
            self.internal.add(id(d))
            attrs = [(name, self.visit(v, i, f".{name}")) for name, v in list(d.items())]
            children += [c for _, c in attrs]
        slots = []
        for desc in slot_descriptors(t):
            try:
                v = desc.__get__(x, t)
            except AttributeError:
                continue  # never set
            c = self.visit(v, i, f".{desc.__name__}")
            slots.append((desc, c))
            children.append(c)
        self._set(i, OBJ, (t, new, attrs, tuple(slots)), children)

    def _opaque(self, i: int, x: Any) -> None:
        ch = [] if isinstance(x, _SEALED) else \
            [self.visit(v, i, f"<referent {k}>") for k, v in enumerate(gc.get_referents(x))
             if not isinstance(v, type)]
        self._set(i, OPAQUE, None, ch)

    def find_shared(self, exclude: set[int]) -> None:
        """The objects that something outside the output refers to, and all
        they reach (Note [Opened output objects])."""
        cands = [i for i, k in enumerate(self.kind) if k in _MUTABLE and i not in self.pytree_level]
        if not cands:
            return
        found = self._referred_from_outside(cands, exclude)
        if found:
            gc.collect()  # garbage of the trace may still refer to them
            found = self._referred_from_outside(cands, exclude)
        todo = list(found)
        while todo:
            i = todo.pop()
            if i in self.shared:
                continue
            self.shared.add(i)
            todo += self.children[i]

    def _referred_from_outside(self, cands: list[int], exclude: set[int]) -> set[int]:
        targets = [self.objs[i] for i in cands]
        by_id = {id(o): i for o, i in zip(targets, cands)}
        ours = self.internal | exclude | {id(self.objs), id(targets)}
        found = set()
        for r in gc.get_referrers(*targets):
            if id(r) in ours or isinstance(r, types.FrameType):
                continue
            for o in gc.get_referents(r):
                i = by_id.get(id(o))
                if i is not None:
                    found.add(i)
        return found

    def path(self, i: int) -> tuple[int, str]:
        """The output leaf pytree could not open (or the write value) that
        holds node ``i``, and the path from it."""
        steps = []
        while True:
            parent, step = self.parent[i]
            if parent is None or parent in self.pytree_level:
                return i, "".join(reversed(steps))
            steps.append(step)
            i = parent


class _Plan:
    """Which nodes are rebuilt, kept as they are, or refused (Note [Opened
    output objects]); decided top-down, for the nodes a rebuild reaches."""

    def __init__(self, walk: _Walk):
        self.w = walk
        self.const: dict[int, bool] = {}
        self.has_leaf = self._has_leaf()
        self.rebuilds_objects = False
        self.uses_inputs = False

    def _has_leaf(self) -> list[bool]:
        w = self.w
        parents: list[list[int]] = [[] for _ in w.kind]
        for i, ch in enumerate(w.children):
            for c in ch:
                parents[c].append(i)
        has = [k == LEAF for k in w.kind]
        todo = [i for i, h in enumerate(has) if h]
        while todo:
            for p in parents[todo.pop()]:
                if not has[p]:
                    has[p] = True
                    todo.append(p)
        return has

    def _is_const(self, i: int, busy: set[int]) -> bool:
        """Kept as it is (a value, a shared object, a tuple of such), else
        rebuilt; refuses what can be neither."""
        w = self.w
        kind = w.kind[i]
        if kind == CONST:
            return True
        if kind == LEAF or kind == INPUT or i in w.pytree_level:
            return False
        if i in self.const:
            return self.const[i]
        if i in w.shared:
            if self.has_leaf[i]:
                self._refuse(i, "it is also referred to from outside the output (an input, "
                                "a module attribute, a global ...) and holds tensors; eager "
                                "returns that very object, which the trace may have filled "
                                "with its own tensors")
            result = True
        elif kind == OPAQUE:
            if self.has_leaf[i]:
                self._refuse(i, "it holds tensors where aotgrad cannot reach them")
            if not isinstance(w.objs[i], _IMMUTABLE_OPAQUE):
                self._refuse(i, "the program made this object and aotgrad cannot build a "
                                "new one per call")
            result = True
        elif kind == FUNC:
            if self.has_leaf[i]:
                self._refuse(i, "a function that captures tensors")
            result = True
        elif kind == MODULE:
            self._refuse(i, "the program made this module: its parameters and buffers would be "
                            "the trace's")
        elif kind not in _VALUE_LIKE or i in busy:
            result = False  # made by the program: rebuilt
        else:
            busy.add(i)
            result = all([self._is_const(c, busy) for c in w.children[i]])
            busy.discard(i)
        self.const[i] = result
        return result

    def template_nodes(self, root: int, writes: list = ()) -> tuple[tuple, list, list]:
        """The Template's nodes (renumbered), the leaves, in build order, and
        the writes (parts of nodes renumbered)."""
        w = self.w
        index: dict[int, int] = {}
        nodes: list = []
        leaves: list = []

        def emit(i: int) -> int:
            if i in index:
                return index[i]
            kind = w.kind[i]
            if self._is_const(i, set()):
                index[i] = len(nodes)
                nodes.append((CONST, w.objs[i]))
                return index[i]
            index[i] = j = len(nodes)
            nodes.append(None)
            if kind == LEAF:
                nodes[j] = (LEAF, len(leaves))
                leaves.append(w.objs[i])
                return j
            if kind == INPUT:
                nodes[j] = (INPUT, w.payload[i])
                self.uses_inputs = True
                return j
            if i in w.cyclic and kind in _FROM_CHILDREN:
                self._refuse(i, "a cycle goes through this immutable object")
            if i not in w.pytree_level:
                self.rebuilds_objects = True
            p = w.payload[i]
            if kind in (LIST, TUPLE, SIZE, SET, FROZENSET):
                payload: Any = tuple(emit(c) for c in p)
            elif kind == DICT:
                payload = tuple((emit(k), emit(v)) for k, v in p)
            elif kind == OBJ:
                cls, new, attrs, slots = p
                payload = (cls, new,
                           None if attrs is None else tuple((n, emit(c)) for n, c in attrs),
                           tuple((d, emit(c)) for d, c in slots))
            elif kind == NODE:
                spec, ch = p
                payload = (spec, tuple(emit(c) for c in ch))
            elif kind == METHOD:
                payload = (emit(p[0]), emit(p[1]))
            elif kind == BOUND:
                payload = (emit(p[0]), p[1])
            else:
                raise AssertionError(f"aotgrad: node kind {kind} cannot be rebuilt")
            nodes[j] = (kind, payload)
            return j

        emit(root)
        out_writes = [(target, tuple((tag, tuple((n, v if v < 0 else emit(v)) for n, v in data)
                                      if tag in ("attrs", "slots") else
                                      tuple((emit(k), emit(v)) for k, v in data) if tag == "map"
                                      else tuple(emit(v) for v in data))
                                     for tag, data in parts))
                      for target, parts in writes]
        return tuple(nodes), leaves, out_writes

    def _refuse(self, i: int, why: str) -> None:
        top_node, path = self.w.path(i)
        top, obj = self.w.objs[top_node], self.w.objs[i]
        what = f" ({type(obj).__module__}.{type(obj).__qualname__})" if path else ""
        label = self.w.origin.get(top_node)
        if label is not None:  # Note [Objects passed in] (objects.py)
            raise RuntimeError(
                f"aotgrad: the program writes into an object passed in: at {label}{path}"
                f"{what}, {why}. aotgrad replays such writes on every call (new objects "
                "made per call, tensors as outputs), but not this one. Pass the tensors as "
                "arguments and return the new ones, or return a new object instead of "
                "writing into the argument.")
        where = f"{type(top).__name__}{path}" if path else type(top).__name__
        raise RuntimeError(
            f"Found {type(top)} in output, which is not a known type. If this type holds "
            "tensors, you need to register a pytree for it (aotgrad opens such objects and "
            f"builds a new one per call, but not this one: at {where}{what}, {why}. Register "
            "the type with torch.utils._pytree.register_pytree_node or register_dataclass, "
            "or return its tensors in a tuple or dict).")


def _cell_full(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=512)
def _rebuildable(cls: type) -> Any:
    """``__new__`` that makes an empty ``cls`` whose whole state is its
    ``__dict__`` and slots; None when ``cls`` has a C layout or ``__new__``."""
    new: Any = object.__new__
    for c in cls.__mro__:
        if c in _LAYOUT_FREE_BASES:
            continue
        if c is types.SimpleNamespace:
            new = types.SimpleNamespace.__new__
            continue
        if not c.__flags__ & _HEAPTYPE:
            return None  # a C type: list, dict, Exception, torch._C ...
        own_new = c.__dict__.get("__new__")
        if own_new is not None and not isinstance(own_new, (staticmethod, types.FunctionType)):
            return None  # a C __new__ (pybind11, PyType_FromSpec)
    return new
