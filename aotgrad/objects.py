"""Objects passed in: Note [Objects passed in].

An argument of a type pytree cannot open (a transformers ``DynamicCache``, a
plain object, an unregistered dataclass) is a constant of the program, not a
graph input (flatten.py).  The program runs on it while being traced, and may
write into it:

    def f(x, cache):               # cache = Cache(layers=[]), passed in
        cache.layers.append(Layer(keys=x * 2))
        return x.sin()

    traced once: cache.layers ends as [Layer(keys=<trace tensor>)]
    before: the user's cache kept the trace's fake tensor, and no call wrote
    now:    the cache is restored after each run of the trace; each call ends
            with cache.layers == [<a new Layer holding this call's x * 2>]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._torch import pytree
from .opened import (BOUND, CONST, DICT, FUNC, LEAF, LIST, MODULE, NODE, OBJ, OPAQUE, SET,
                     is_plain_object, walk_roots)
from .state import get_state, instance_dict, same_state, set_state
from .subclass import hashable

# Note [Objects passed in]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# An object passed in (an instance of a class defined in Python that pytree
# does not open) is part of the program: the trace reads its state and runs
# the program's writes into it, which no compiled call would replay.  Left so,
# both are silent: the user's object keeps the trace's fake tensors, later
# calls write nothing, and a call with the object in another state runs the
# program compiled for the first.  aotgrad makes them exact, or refuses:
#
# * the tensors (and symbolic sizes) an object holds are not graph inputs:
#   a program that computes with them (the fake mode meets a real tensor) is
#   refused, naming the argument, its type and the path to a tensor: pass
#   them as arguments and return the new ones.  A program may carry them
#   along (a DeviceMesh's, a cache's old layers moved about): they are the
#   call's own, as the objects are (INPUT nodes), and the guard key holds
#   what the program can read of them without computing (sizes, strides,
#   dtype, device, requires_grad);
# * every run of the program while tracing starts from a snapshot of the raw
#   state (``get_state``: items, ``__dict__``, slots) of every list, dict, set
#   and object the arguments reach, and ends by restoring it: the user's
#   objects never hold a trace tensor and are as before the compilation;
# * what the program wrote is the new state of each object whose state
#   changed.  It is opened as outputs are (Note [Opened output objects]): its
#   tensors and sizes become graph outputs, objects the program made are built
#   anew on each call, objects passed in are the call's own (INPUT nodes of the
#   template, numbered by the walk of the call's objects).  The runtime returns
#   a ``Deferred`` output; ``AOTFunction`` finishes it with the call's leaves:
#   it builds the output and sets each written object's state;
# * the guard key holds a fingerprint of the objects' states (``state_key``:
#   the walk's structure, classes, values, the sharing, the identity of what
#   the walk does not look into), not their identity: a new empty cache on
#   each call reuses one compilation; a cache the last call filled has another
#   key, and is refused when the program computes with the tensors in it.
#
# Exact because the program's Python-level effect on an object depends only
# on what the guard holds (the objects' states, the tensors' metadata), so
# eager leaves each call's objects in the state the trace left its copy in,
# with that call's tensors and new objects in it.  Not covered: the state of
# C objects (a written one that came to hold tensors is refused), modules (not
# looked into), objects reached only through globals or closures.


@dataclass
class Passed:
    """The objects passed in, seen after a run of the program (opened.py reads it)."""
    known: dict[int, int]                 # id -> node of the walk of the objects passed in
    writes: list[tuple[int, str, tuple]]  # (node, where, new state) of each changed object
    exclude: set[int]                     # ids that do not make an object shared
    object_leaves: tuple[int, ...]        # the leaves the walk starts from


def object_leaves(leaves: list) -> tuple[int, ...]:
    """The leaves that are objects passed in (Note [Objects passed in])."""
    return tuple(k for k, x in enumerate(leaves)
                 if not isinstance(x, torch.Tensor) and is_plain_object(x))


def leaf_labels(in_spec: Any, leading: int = 0) -> list[str]:
    """How an error names each leaf of ``(args, kwargs)``: ``args[1]``,
    ``cache``, ``args[0]['cache']``; ``leading`` arguments (the
    parameters, buffers and modes ``aot_module`` passes first) are not counted."""
    tree = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
    out = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        head, rest = path[:2], pytree.keystr(path[2:])
        if len(head) == 2 and getattr(head[0], "idx", None) == 0:
            out.append(f"args[{head[1].idx - leading}]{rest}")
        elif len(head) == 2 and hasattr(head[1], "key"):
            out.append(f"{head[1].key}{rest}")
        else:
            out.append(pytree.keystr(path))
    return out


def _where(walk: Any, i: int) -> str:
    top, path = walk.path(i)
    return f"{walk.origin[top]}{path}"


def held_tensors_error(walk: Any, held: list[int], why: str) -> RuntimeError:
    """The error for an object passed in that holds tensors (at the nodes
    ``held`` of ``walk``) and that the program ``why``."""
    i = held[0]
    top, _ = walk.path(i)
    root = walk.objs[top]
    what = "a tensor" if isinstance(walk.objs[i], torch.Tensor) else "a symbolic size"
    return RuntimeError(
        f"aotgrad: the argument {walk.origin[top]} ({type(root).__module__}."
        f"{type(root).__qualname__}) holds {what} at {_where(walk, i)}, and the program {why}. "
        "aotgrad compiles an argument of a type pytree does not open as part of the program, "
        "not as an input: the tensors it holds are not graph inputs, the graph cannot compute "
        "with them (Note [Objects passed in]). Pass the tensors as arguments and return the "
        "new ones (or register the type with torch.utils._pytree.register_pytree_node if the "
        "program does not write into it); a cache can be passed empty, a new one per call, and "
        "read after the call.")


def _uses_real_tensors(error: Exception) -> bool:
    """What the fake mode raises for an op on a tensor that is not fake."""
    return isinstance(error, AssertionError) and \
        "Please convert all Tensors to FakeTensors first" in str(error)


_STATEFUL = frozenset({LIST, DICT, SET, OBJ, NODE, OPAQUE})


class Snapshot:
    """The states of the objects passed in before a run of the program."""

    def __init__(self, leaves: list, objects: tuple[int, ...], labels: list[str]):
        self.objects = objects
        self.walk = w = walk_roots([leaves[k] for k in objects], [labels[k] for k in objects])
        self.states = {i: get_state(w.objs[i]) for i, k in enumerate(w.kind) if k in _STATEFUL}
        self.held = [i for i, k in enumerate(w.kind) if k == LEAF]   # tensors and sizes

    def explained(self, error: Exception) -> Exception:
        """``error`` of a run of the program, or aotgrad's when it comes from
        the tensors the objects hold."""
        if self.held and _uses_real_tensors(error):
            return held_tensors_error(self.walk, self.held,
                                      "computes with a tensor that is not one of its inputs, "
                                      "such as those")
        return error

    def passed(self) -> Passed:
        """What the run wrote (call before ``restore``)."""
        w = self.walk
        writes: list = []
        exclude: set[int] = {id(self.states), id(writes)}
        for i, before in self.states.items():
            x = w.objs[i]
            if before is None:  # a C object: its state is not seen
                inside = walk_roots([x], [_where(w, i)])
                held = [j for j, k in enumerate(inside.kind) if k == LEAF]
                if held:
                    raise RuntimeError(
                        f"aotgrad: the program put a tensor into an object passed in, at "
                        f"{_where(inside, held[0])}, inside a {type(x).__qualname__} whose state "
                        "aotgrad can neither read nor restore (Note [Objects passed in]). Pass "
                        "the tensors as arguments and return the new ones.")
                continue
            now = get_state(x)
            if not same_state(before, now):
                writes.append((i, _where(w, i), now))
                exclude.add(id(now))
                for _, data in now:
                    exclude.add(id(data))
                    exclude.update(id(p) for p in data if type(p) is tuple)
        known = {}
        for i, k in enumerate(w.kind):
            if k != CONST:  # the tensors they hold too: the call's own
                x = w.objs[i]
                known[id(x)] = i
                d = instance_dict(x)
                if d is not None:
                    exclude.add(id(d))
        exclude.update(known)
        return Passed(known, writes, exclude, self.objects)

    def restore(self) -> None:
        w = self.walk
        for i, before in self.states.items():
            x = w.objs[i]
            if before is not None and not same_state(before, get_state(x)):
                set_state(x, before)


def state_key(roots: list) -> tuple:
    """Note [Objects passed in]: a fingerprint of the objects' states, for
    the guard key: equal for objects of equal structure and values."""
    w = walk_roots(roots)
    out: list = []
    for i, x in enumerate(w.objs):
        kind, p = w.kind[i], w.payload[i]
        if kind == CONST:
            out.append((type(x), hashable(x)))
        elif kind == OBJ:
            cls, _, attrs, slots = p
            out.append((cls, None if attrs is None else tuple(attrs),
                        tuple((d.__name__, c) for d, c in slots)))
        elif kind == DICT:
            out.append((kind, tuple(p)))
        elif kind == NODE:
            spec, ch = p
            out.append((kind, type(x), str(spec), tuple(ch)))
        elif kind == BOUND:
            out.append((kind, p[1], tuple(w.children[i])))
        elif kind == LEAF:  # what the program may read of it (Note [Objects passed in])
            out.append((kind, type(x), tuple(x.shape), x.stride(), x.storage_offset(), x.dtype,
                        x.device, x.requires_grad, x.layout)
                       if isinstance(x, torch.Tensor) else (kind, hashable(x)))
        elif kind in (OPAQUE, MODULE, FUNC):  # by identity: not looked into
            out.append((kind, hashable(x), tuple(w.children[i])))
        else:  # list, set, tuple, size, frozenset, method
            out.append((kind, type(x), tuple(w.children[i])))
    return tuple(w.roots), tuple(out)


def kept(leaves: list) -> Any:
    """A context after which the objects in ``leaves`` are as before (an
    extra eager run on them: Note [Eager's error, not the tracer's])."""
    return _Kept(leaves)


class _Kept:
    def __init__(self, leaves: list):
        self.leaves = leaves

    def __enter__(self) -> None:
        objects = object_leaves(self.leaves)
        self.snap = Snapshot(self.leaves, objects, [""] * len(self.leaves)) if objects else None

    def __exit__(self, *exc: Any) -> None:
        if self.snap is not None:
            self.snap.restore()
