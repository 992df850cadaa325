"""Property-based fuzzing of aotgrad against eager PyTorch: views x in-place mutation.

A *program* is a short straight-line Python function over 1-3 small float
tensors that mixes views (``view``, ``t()``, slicing, ``unsqueeze``,
``expand``, ``unbind`` ...), out-of-place pointwise ops, in-place data
mutations (``mul_``, ``add_``, ``copy_``, ``zero_`` ..., sometimes under
``torch.no_grad()``) and in-place metadata mutations (``t_``, ``unsqueeze_``,
``transpose_`` ...) on inputs, views of inputs, intermediates and views of
intermediates, and returns 1-3 of those values (the same one twice, a view
together with its base ...).  It is a small frozen dataclass that renders
as Python source; the rendered source *is* what runs (eagerly, through
``aotgrad.aot_function(f, aotgrad.nop)``, and as printed reproducers), so a
reproducer can be pasted as is.

The generator (``programs()``, a hypothesis strategy) builds a program step
by step while running it eagerly on live tensors: shapes, strides and view
relationships are always those of the real program, and a step that makes
eager raise is usually rejected (sometimes kept as the last step, so that
"eager raises => compiled raises the same exception type" is tested too).

The comparator (``compare`` / ``check_program``) runs the program on
identical fresh inputs eagerly and through the compiled function (twice: the
second call takes the cached path) and compares, in order:

1. the forward: if eager raises, compiled must raise the same type, exactly
   (text differences are notes, not failures);
2. every output: type, dtype, shape, stride (of dimensions of size > 1),
   storage offset, values, requires_grad, is_leaf, ``_is_view()``, identity
   (is it input j / output k itself), ``_base`` (input j / output k / base of
   input j / an unnamed tensor, numbered), and storage aliasing with every
   input and earlier output (``untyped_storage().data_ptr()``);
3. every input after the call: shape, stride, offset, values, requires_grad,
   is_leaf, ``_is_view()``, aliasing between inputs (mutations replayed?);
4. gradients: a fixed random-weighted sum of the outputs that require grad is
   back-propagated to the leaves the inputs were made from; ``.grad`` of each
   leaf (None vs tensor too).  Tolerated: eager's backward raising "modified
   by an inplace operation" (a saved value was mutated) where the compiled
   one succeeds: it is noted, and gradients are not compared;
5. every output is then mutated in place with ``add_(1)`` (same exception
   type required), and inputs and outputs are compared again: view
   relationships must survive.

Command line (for long campaigns)::

    python tests/fuzz_programs.py --count 300 [--seed S] [--allow-unsupported]

prints progress, a summary, and for each distinct failure kind one reproducer
shrunk to a minimum (runnable Python source).  Exit status 1 on any mismatch.
``--impl torch`` runs the same campaign against PyTorch's own AOTAutograd
(a calibration of the fuzzer: tests may use it as a baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import linecache
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------
# The program model
# --------------------------------------------------------------------------

INPUT_NAMES = ("a", "b", "c")
INPUT_SHAPES = ((2, 3), (3,), (2, 3, 1), (3, 2), (1, 3), (2, 2))


@dataclass(frozen=True)
class InputSpec:
    """One argument of the program.

    ``alias_of is None``: a fresh tensor ``torch.randn(shape)``; when
    ``requires_grad``, the leaf is passed itself (``clone=False``: mutating it
    is an eager error) or as ``leaf.clone()`` (a non-leaf, mutable).
    ``alias_of = j``: the argument is ``<input j><view>`` (a view of an earlier
    argument, or that very argument when ``view == ""``).
    """
    name: str
    shape: tuple = (2, 3)
    requires_grad: bool = False
    clone: bool = True
    alias_of: int | None = None
    view: str = ""


@dataclass(frozen=True)
class Step:
    """One statement; ``no_grad`` wraps it in ``with torch.no_grad():``."""
    code: str
    no_grad: bool = False

    def lines(self) -> list[str]:
        if self.no_grad:
            return ["with torch.no_grad():", "    " + self.code]
        return [self.code]


@dataclass(frozen=True)
class Program:
    inputs: tuple[InputSpec, ...]
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]
    grad_enabled: bool = True        # the whole call runs under torch.no_grad() when False

    # -- rendering ---------------------------------------------------------
    def fn_source(self) -> str:
        params = ", ".join(i.name for i in self.inputs)
        body = [line for s in self.steps for line in s.lines()]
        body.append("return (" + "".join(o + ", " for o in self.outputs).rstrip(" ") + ")")
        return f"def f({params}):\n" + "".join("    " + line + "\n" for line in body)

    def inputs_source(self) -> str:
        lines = ["def make_inputs():", "    g = torch.Generator().manual_seed(0)"]
        leaves = []
        for spec in self.inputs:
            if spec.alias_of is not None:
                continue
            rg = ", requires_grad=True" if spec.requires_grad else ""
            leaves.append(f"torch.randn({spec.shape!r}, generator=g{rg})")
        lines.append("    leaves = [" + ", ".join(leaves) + "]")
        k = 0
        for spec in self.inputs:
            if spec.alias_of is None:
                clone = ".clone()" if spec.requires_grad and spec.clone else ""
                lines.append(f"    {spec.name} = leaves[{k}]{clone}")
                k += 1
            else:
                lines.append(f"    {spec.name} = {self.inputs[spec.alias_of].name}{spec.view}")
        lines.append("    return leaves, [" + ", ".join(i.name for i in self.inputs) + "]")
        return "\n".join(lines) + "\n"

    def source(self) -> str:
        """The program as a module: ``f`` and ``make_inputs``."""
        mode = "" if self.grad_enabled else "# NOTE: f is called under torch.no_grad()\n"
        return "import torch\n\n\n" + mode + self.fn_source() + "\n\n" + self.inputs_source()

    def reproducer(self, comment: str = "") -> str:
        """Runnable source: the program, then the comparator on it."""
        head = "".join(f"# {line}\n" for line in comment.splitlines())
        grad = "" if self.grad_enabled else ", grad_enabled=False"
        return (head + self.source() + "\n\n"
                "if __name__ == \"__main__\":\n"
                "    import sys\n"
                f"    sys.path.insert(0, {TESTS_DIR!r})\n"
                "    from fuzz_programs import compare\n"
                f"    print(compare(f, make_inputs{grad}).report())\n")

    def __repr__(self) -> str:
        return "Program<\n" + self.source() + ">"

    def size(self) -> int:
        return (len(self.steps) * 4 + len(self.outputs) * 2 + len(self.inputs) * 2 +
                sum(s.no_grad for s in self.steps) + sum(i.requires_grad for i in self.inputs) +
                sum(i.alias_of is not None for i in self.inputs) + (not self.grad_enabled))

    # -- loading -----------------------------------------------------------
    def load(self) -> tuple[Callable, Callable]:
        """exec the source; returns ``(f, make_inputs)``."""
        return load_source(self.source())


_counter = itertools.count()


def load_source(src: str) -> tuple[Callable, Callable]:
    filename = f"<fuzz-program-{next(_counter)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    ns: dict = {"__name__": "fuzz_program"}
    exec(compile(src, filename, "exec"), ns)
    return ns["f"], ns["make_inputs"]


# --------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------

def _shape_args(shape: Sequence[int]) -> str:
    return ", ".join(str(s) for s in shape)


# step kinds, as weights: views and in-place data mutations most often
CATEGORIES = ("view",) * 3 + ("inplace",) * 3 + ("pointwise",) * 2 + ("metadata",)


def _factorizations(n: int, max_dims: int = 3) -> list[tuple]:
    out = [(n,)]
    if max_dims >= 2:
        for d in range(1, n + 1):
            if n % d == 0:
                out.extend((d,) + rest for rest in _factorizations(n // d, max_dims - 1))
    return sorted(set(out), key=lambda s: (len(s), s))


def _view_ops(x: str, t: torch.Tensor) -> list[str]:
    """Out-of-place view ops applicable to ``t`` (by shape only)."""
    s, d = tuple(t.shape), t.dim()
    ops = []
    if d >= 2:
        ops.append(f"{x}.transpose(0, 1)")
    if d <= 2:
        ops.append(f"{x}.t()")
    if d >= 1 and s[0] >= 1:
        ops.append(f"{x}[0]")
    if d >= 1 and s[0] >= 2:
        ops.append(f"{x}[1:]")
    if d >= 2 and s[1] >= 2:
        ops.append(f"{x}[:, 1:]")
    if d < 4:
        ops += [f"{x}.unsqueeze(0)", f"{x}.unsqueeze(-1)"]
    if 1 in s:
        ops.append(f"{x}.squeeze()")
        ops += [f"{x}.squeeze({i})" for i, n in enumerate(s) if n == 1][:1]
    ops.append(f"{x}.detach()")
    for shape in _factorizations(t.numel()):
        if shape != s:
            ops.append(f"{x}.view({_shape_args(shape)})")
            ops.append(f"{x}.reshape({_shape_args(shape)})")
    ops.append(f"{x}.view(-1)")
    if d < 3 and t.numel() <= 16:
        ops.append(f"{x}.expand(2, {_shape_args(s)})" if d else f"{x}.expand(2)")
    ones = [i for i, n in enumerate(s) if n == 1]
    if ones:
        ops.append(f"{x}.expand({_shape_args([2 if i == ones[0] else n for i, n in enumerate(s)])})")
    if d >= 2:
        ops.append(f"{x}.diagonal()")
    if d == 3:
        ops.append(f"{x}.permute(2, 0, 1)")
    if d >= 1:
        ops.append(f"{x}.unbind(0)[0]")
        ops.append(f"{x}.split(1)[-1]")
    return ops


def _pointwise_ops(x: str, t: torch.Tensor, env: dict) -> list[str]:
    ops = [f"{x}.mul(2)", f"{x}.add(1)", f"{x}.sin()", f"{x}.relu()", f"{x}.clone()",
           f"{x}.contiguous()"]
    for y, u in env.items():
        if _broadcastable(t.shape, u.shape):
            ops += [f"{x} * {y}", f"{x} + {y}"]
    return ops


def _inplace_ops(x: str, t: torch.Tensor, env: dict) -> list[str]:
    ops = [f"{x}.mul_(2)", f"{x}.add_(1)", f"{x}.zero_()", f"{x}.sin_()", f"{x}.relu_()"]
    ptr = t.untyped_storage().data_ptr()
    for y, u in env.items():
        # an operand that overlaps the written memory makes eager's result depend on
        # the kernel's loop order: not a contract, so never generated
        if u.untyped_storage().data_ptr() != ptr and \
                _broadcastable(t.shape, u.shape) == tuple(t.shape):
            ops += [f"{x}.copy_({y})", f"{x}.add_({y})", f"{x}.mul_({y})"]
    return ops


def _metadata_ops(x: str, t: torch.Tensor) -> list[str]:
    d, s = t.dim(), tuple(t.shape)
    ops = []
    if d <= 2:
        ops.append(f"{x}.t_()")
    if d >= 2:
        ops.append(f"{x}.transpose_(0, 1)")
    if d < 4:
        ops.append(f"{x}.unsqueeze_(0)")
    if 1 in s:
        ops.append(f"{x}.squeeze_({s.index(1)})")
    if not (t.is_leaf and t.requires_grad):
        # detach_() of a leaf that requires grad and that autograd saved: eager
        # keeps the saved leaf usable, aotgrad's traced stand-in cannot (documented)
        ops.append(f"{x}.detach_()")
    return ops


def _broadcastable(s1, s2):
    try:
        return tuple(torch.broadcast_shapes(s1, s2))
    except RuntimeError:
        return None


def _replay(skeleton: Program, steps: Sequence[Step]) -> dict:
    """Run the inputs and ``steps`` eagerly; the variables afterwards (name -> tensor)."""
    _, make_inputs = skeleton.load()
    _, args = make_inputs()
    env: dict = dict(zip((s.name for s in skeleton.inputs), args))
    src = "\n".join(line for s in steps for line in s.lines())
    with torch.set_grad_enabled(skeleton.grad_enabled):
        exec(src, {"torch": torch}, env)
    return env


def _strategies():
    from hypothesis import strategies as st
    return st


def programs(max_inputs: int = 3, min_steps: int = 3, max_steps: int = 8):
    """A hypothesis strategy of ``Program``s."""
    st = _strategies()

    @st.composite
    def build(draw):
        def chance(percent: int) -> bool:  # shrinks towards False
            return draw(st.integers(0, 99)) >= 100 - percent

        def pick(options: Sequence):
            return options[draw(st.integers(0, len(options) - 1))]

        # ---- inputs
        n_in = draw(st.integers(1, max_inputs))
        specs: list[InputSpec] = []
        for k in range(n_in):
            name = INPUT_NAMES[k]
            if k > 0 and chance(15):
                j = draw(st.integers(0, k - 1))
                base = specs[j]
                views = ["", ".unsqueeze(0)"] + (["[0]"] if len(base.shape) >= 1 else [])
                if len(base.shape) == 2:
                    views.append(".t()")
                if len(base.shape) >= 2 and base.shape[1] >= 2:
                    views.append("[:, 1:]")
                view = pick(views)
                shape = tuple(_eval_shape(base.shape, view))
                specs.append(InputSpec(name, shape, base.requires_grad, base.clone, j, view))
                continue
            shape = pick(INPUT_SHAPES)
            rg = chance(55)
            clone = not chance(15) if rg else True
            specs.append(InputSpec(name, shape, rg, clone))
        grad_enabled = not chance(12)
        # some programs neither mutate their inputs nor return views of them (what
        # aotgrad supported first): in-place ops then only touch intermediates
        pure_outside = chance(30)
        input_names = [s.name for s in specs]
        skeleton = Program(tuple(specs), (), (specs[0].name,), grad_enabled)
        env = _replay(skeleton, ())
        parent: dict = {}
        # Views taken before an in-place metadata change of their base (t_,
        # unsqueeze_ ...) cannot be regenerated by functionalization (torch's
        # AOTAutograd fails the same way): such views are not used afterwards.
        dead: set = set()

        # ---- steps
        steps: list[Step] = []
        n_steps = draw(st.integers(min_steps, max_steps))
        fresh = (f"v{i}" for i in itertools.count(1))
        new_name = next(fresh)
        ended = False
        for _ in range(n_steps):
            if ended:
                break
            for _attempt in range(12):
                category = pick(CATEGORIES)
                pool = [n for n in env if n not in dead]
                if category == "metadata":
                    # an in-place metadata change of a *view*, then writing through
                    # it, is beyond functionalization (torch's too): only non-views
                    pool = [n for n in pool if not env[n]._is_view()]
                    if not pool:
                        continue
                if pure_outside and category in ("inplace", "metadata"):
                    pool = [n for n in pool if not _aliases_input(n, env, input_names)]
                    if not pool:
                        continue
                x = pick(pool)
                t = env[x]
                if category == "view":
                    code = f"{new_name} = " + pick(_view_ops(x, t))
                elif category == "pointwise":
                    live = {n: v for n, v in env.items() if n not in dead}
                    code = f"{new_name} = " + pick(_pointwise_ops(x, t, live))
                elif category == "inplace":
                    code = pick(_inplace_ops(x, t, {n: v for n, v in env.items()
                                                    if n not in dead}))
                else:
                    code = pick(_metadata_ops(x, t))
                    if "detach_" in code and sum(
                            _storage_ptr(env[n]) == _storage_ptr(t) for n in input_names) > 1:
                        # detach_() of inputs that alias each other: beyond the
                        # synthetic base (documented), not generated
                        continue
                # metadata mutations under no_grad leave eager's autograd graph
                # inconsistent (wrong-shaped or silently wrong gradients): not generated
                if category == "inplace" and code.split(".")[0] in env and \
                        torch._debug_has_internal_overlap(env[code.split(".")[0]]) == 1:
                    # fills of overlapping tensors: eager allows them, aotgrad refuses
                    # them (functionalization cannot write them back): not generated
                    continue
                step = Step(code, category != "metadata" and chance(20))
                try:
                    trial = _replay(skeleton, (*steps, step))
                except Exception:
                    if not chance(25):
                        continue
                    ended = True  # keep it: the program raises here (eager and compiled must agree)
                    steps.append(step)
                    break
                new = trial.get(new_name)
                if new is not None and (new.numel() == 0 or new.numel() > 64 or new.dim() > 4):
                    continue
                env = trial
                steps.append(step)
                if category == "metadata" or "detach_" in code:
                    ptr = _storage_ptr(env[x])
                    dead.update(n for n in env if n != x and _storage_ptr(env[n]) == ptr)
                if new is not None:
                    if category == "view":
                        parent[new_name] = x
                    new_name = next(fresh)
                break

        # ---- outputs
        names = [n for n in env if n not in dead]
        if pure_outside:
            names = [n for n in names if n in input_names or not _aliases_input(n, env, input_names)]
        outputs = [pick(names)]
        for _ in range(draw(st.integers(0, 2))):
            mode = draw(st.integers(0, 3))
            prev = pick(outputs)
            if mode == 1:
                outputs.append(prev)                                  # the same one twice
            elif mode == 2 and prev in parent:
                outputs.append(parent[prev])                          # a view with its base
            elif mode == 3 and any(p == prev for p in parent.values()):
                outputs.append(pick([v for v, p in parent.items() if p == prev]))  # base, then view
            else:
                outputs.append(pick(names))
            if outputs[-1] not in names:
                outputs[-1] = prev
        return Program(tuple(specs), tuple(steps), tuple(outputs), grad_enabled)

    return build()


def _aliases_input(name: str, env: dict, input_names: Sequence[str]) -> bool:
    """Does ``env[name]`` share storage with an input (or is one)?"""
    ptr = env[name].untyped_storage().data_ptr()
    return any(env[i].untyped_storage().data_ptr() == ptr for i in input_names)


def _eval_shape(shape: tuple, view: str) -> tuple:
    return tuple(eval("t" + view, {"t": torch.empty(shape)}).shape)


# --------------------------------------------------------------------------
# The comparator
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Raised:
    type: type
    message: str

    def __repr__(self) -> str:
        return f"{self.type.__name__}({_first_line(self.message)!r})"


class _Ok:
    def __repr__(self) -> str:
        return "ok"


OK = _Ok()   # an attempted step that did not raise


@dataclass(frozen=True)
class TensorValue:
    value: torch.Tensor

    def __repr__(self) -> str:
        return repr(self.value.tolist())


VERSION_COUNTER_ERROR = "modified by an inplace operation"
# autograd errors eager raises lazily (at backward or when a grad_fn is rebuilt)
AUTOGRAD_LATE_ERRORS = (VERSION_COUNTER_ERROR, "is a view and its base or another view of its base",
                        "created in no_grad mode",
                        "saved tensor that has been detached in-place")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""


class Recorder:
    """What one side (eager or compiled) did, as an ordered list of (key, value)."""

    def __init__(self):
        self.entries: list[tuple[str, Any]] = []

    def add(self, key: str, value: Any) -> None:
        self.entries.append((key, value))

    def attempt(self, key: str, thunk: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            result = thunk()
        except Exception as e:  # noqa: BLE001 - the exception *is* the observation
            self.add(key, Raised(type(e), str(e)))
            return False, None
        self.add(key, OK)
        return True, result

    def get(self, key: str, thunk: Callable[[], Any]) -> Any:
        """Record ``thunk()``, or what it raised."""
        try:
            value = thunk()
        except Exception as e:  # noqa: BLE001
            value = Raised(type(e), str(e))
        self.add(key, value)
        return value


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _describe_tensor(rec: Recorder, key: str, t: Any, values: bool = True) -> None:
    rec.add(key + ".type", type(t).__name__)
    if not isinstance(t, torch.Tensor):
        rec.add(key + ".value", t)
        return
    rec.add(key + ".dtype", t.dtype)
    rec.add(key + ".shape", tuple(t.shape))
    # the stride of a size-1 dimension is unobservable (indexing never uses it): left out
    rec.add(key + ".stride", tuple(st if n > 1 else None for st, n in zip(t.stride(), t.shape)))
    rec.add(key + ".storage_offset", t.storage_offset())
    if values:
        rec.add(key + ".value", TensorValue(t.detach().clone()))
    # autograd metadata: reading it may raise (e.g. a no_grad view whose base was
    # modified in place with grad mode on raises when its grad_fn is rebuilt)
    rec.get(key + ".requires_grad", lambda: t.requires_grad)
    rec.get(key + ".is_leaf", lambda: t.is_leaf)
    rec.get(key + "._is_view()", lambda: t._is_view())


def _label(t: Any, named: list[tuple[str, torch.Tensor]], unnamed: list) -> str | None:
    """A name for ``t`` that means the same on both sides."""
    if t is None:
        return None
    for name, u in named:
        if t is u:
            return name
    # an intermediate the program does not return: which one is not compared
    # (outputs returned as plain tensors shift any numbering; storage sharing
    # between outputs is compared separately)
    return "unnamed tensor"


def _safe_requires_grad(t: torch.Tensor) -> bool:
    try:
        return t.requires_grad
    except Exception:  # noqa: BLE001 - recorded elsewhere
        return False


def _loss_weight(i: int, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(shape, generator=g)


def observe(fn: Callable, make_inputs: Callable, grad_enabled: bool = True) -> Recorder:
    """Run ``fn`` on fresh inputs and record everything the comparator checks."""
    rec = Recorder()
    leaves, args = make_inputs()
    with torch.set_grad_enabled(grad_enabled):
        ok, out = rec.attempt("forward", lambda: fn(*args))
    if not ok:
        return rec
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    rec.add("number of outputs", len(outs))
    named = [(f"input {j}", a) for j, a in enumerate(args)] + \
        [(f"output {i}", o) for i, o in enumerate(outs)] + \
        [(f"base of input {j}", a._base) for j, a in enumerate(args) if a._base is not None]
    unnamed: list = []

    # outputs
    for i, o in enumerate(outs):
        key = f"output {i}"
        _describe_tensor(rec, key, o)
        if not isinstance(o, torch.Tensor):
            continue
        rec.add(key + " identity", next((n for n, u in named[:len(args) + i] if u is o), None))
        rec.get(key + "._base", lambda: _label(o._base, named, unnamed))
        rec.add(key + " shares storage with",
                tuple(n for n, u in named[:len(args) + i]
                      if isinstance(u, torch.Tensor) and _storage_ptr(u) == _storage_ptr(o)))

    # inputs after the call
    for j, a in enumerate(args):
        key = f"input {j} after the call"
        _describe_tensor(rec, key, a)
        rec.add(key + " shares storage with",
                tuple(f"input {k}" for k in range(j) if _storage_ptr(args[k]) == _storage_ptr(a)))

    # gradients
    diff = [(i, o) for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and _safe_requires_grad(o)]
    if diff:
        def backward():
            with torch.enable_grad():
                loss = sum((o * _loss_weight(i, o.shape)).sum() for i, o in diff)
                loss.backward()
        ok, _ = rec.attempt("backward", backward)
        if ok:
            for k, leaf in enumerate(leaves):
                g = leaf.grad
                rec.add(f"grad of leaf {k}", None if g is None else TensorValue(g.clone()))

    # mutate every output in place
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            with torch.set_grad_enabled(grad_enabled):
                rec.attempt(f"output {i}.add_(1)", lambda o=o: o.add_(1))
    for j, a in enumerate(args):
        _describe_tensor(rec, f"input {j} after mutating the outputs", a)
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            rec.add(f"output {i} after mutating the outputs", TensorValue(o.detach().clone()))
    return rec


@dataclass
class Mismatch:
    kind: str          # stable across programs: digits and values left out
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}\n    {self.detail}"


@dataclass
class Result:
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unsupported: str | None = None     # compiled raised "not supported yet" (when allowed)
    eager_raised: bool = False         # the program raises in eager (compiled must too)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def kind(self) -> str | None:
        return self.mismatches[0].kind if self.mismatches else None

    def report(self) -> str:
        if self.ok:
            lines = ["OK: compiled behaves like eager"]
        else:
            lines = [f"MISMATCH ({len(self.mismatches)}):"] + ["  " + str(m) for m in self.mismatches]
        if self.unsupported:
            lines.append("  unsupported (allowed): " + self.unsupported)
        lines += ["  note: " + n for n in self.notes]
        return "\n".join(lines)


def _normalize(text: str) -> str:
    """An exception message as a failure kind: first clause, no numbers or names."""
    text = re.split(r"; |\. |: \[", _first_line(text))[0]
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"'[^']*'", "'...'", text)
    text = re.sub(r"N(, N)+", "N...", text)     # shapes/strides of any rank
    return text[:140]


def _kind_key(key: str) -> str:
    return re.sub(r"\d+", "N", key)


def _values_equal(a: Any, b: Any) -> tuple[bool, str]:
    if isinstance(a, TensorValue) and isinstance(b, TensorValue):
        try:
            torch.testing.assert_close(b.value, a.value, equal_nan=True)
        except AssertionError as e:
            return False, " ".join(str(e).split())[:300]
        return True, ""
    if type(a) is not type(b):
        return False, ""
    return a == b, ""


def _compare_raised(key: str, ev: Any, cv: Any, result: Result, prefix: str) -> str:
    """Compare one attempted step; 'same', 'tolerated' or 'differs'."""
    if isinstance(ev, Raised) and isinstance(cv, Raised) and cv.type is ev.type:
        if _first_line(cv.message) != _first_line(ev.message):
            result.notes.append(f"{prefix}{key}: both raise; eager {ev!r}, compiled {cv!r}")
        return "same"
    if not isinstance(ev, Raised) and not isinstance(cv, Raised):
        return "same"
    if key == "backward" and isinstance(ev, Raised) and not isinstance(cv, Raised) and \
            VERSION_COUNTER_ERROR in ev.message:
        result.notes.append(f"{prefix}backward: eager raises {ev!r} (a saved value was mutated); "
                            "compiled succeeds: tolerated, gradients not compared")
        return "tolerated"
    e_what = f"raises {ev.type.__name__}" if isinstance(ev, Raised) else "ok"
    c_what = f"raises {cv.type.__name__}: {_normalize(cv.message)}" if isinstance(cv, Raised) else "ok"
    result.mismatches.append(Mismatch(prefix + f"{_kind_key(key)}: eager {e_what}, compiled {c_what}",
                                      f"eager: {ev!r}\n    compiled: {cv!r}"))
    return "differs"


NO_GRAD_VIEW_ERROR = "A view was created in no_grad mode"
MULTI_OUTPUT_VIEW_ERROR = "Such functions do not allow the output views to be modified inplace"


def _documented_difference(key: str, e: dict, c: dict) -> str | None:
    """Differences from eager that aotgrad documents (and torch's AOTAutograd shares)."""
    if key.startswith("output ") and key.endswith(".is_leaf"):
        out = key.split(".", 1)[0]
        ea, ca = e.get(out + ".add_(1)"), c.get(out + ".add_(1)")
        if isinstance(ea, Raised) and ("no_grad mode" in ea.message or (
                isinstance(ca, Raised) and NO_GRAD_VIEW_ERROR in ca.message)):
            # a view chain mixing no_grad and grad mode is rebuilt in one mode
            return "a view chain that mixes no_grad and grad mode is rebuilt under no_grad"
    if key.startswith("output ") and (key.endswith("._is_view()") or key.endswith("._base") or
                                      key.endswith(".add_(1)")):
        out = key.split(".", 1)[0]
        eb, cb = e.get(out + "._base"), c.get(out + "._base")
        if isinstance(eb, str) and eb.startswith("unnamed") and cb is None:
            # Note [Lone views] (aotgrad/analyze.py): a view of an intermediate the
            # user cannot see is returned as a plain tensor
            return "a view of an unreturned intermediate is returned as a plain tensor"
    ev = e.get(key)
    if key.endswith(".add_(1)") and isinstance(ev, Raised) and MULTI_OUTPUT_VIEW_ERROR in ev.message \
            and not isinstance(c.get(key), Raised):
        # a multi-output view (split, unbind) of an input whose metadata changed
        # is rebuilt with as_strided: eager's ban on modifying it in place is lost
        return "eager's in-place ban on a rebuilt multi-output view is not reproduced"
    if isinstance(ev, Raised) and any(m in ev.message for m in AUTOGRAD_LATE_ERRORS) and \
            not isinstance(c.get(key), Raised):
        # eager refuses to use a view whose base changed in place (lazily, when
        # its grad_fn is rebuilt); aotgrad rebuilds such views after the change,
        # with the values eager has, so it has nothing to refuse
        return "eager's lazy autograd error on a view changed in place is not reproduced"
    return None


def _compare_records(eager: Recorder, compiled: Recorder, result: Result, prefix: str) -> None:
    """Compare two records key by key (keys are unique; eager's order)."""
    e, c = dict(eager.entries), dict(compiled.entries)
    if isinstance(e.get("forward"), Raised) or isinstance(c.get("forward"), Raised):
        cf = c["forward"]
        later = [v for k, v in eager.entries if k != "forward" and isinstance(v, Raised)]
        if isinstance(cf, Raised) and not isinstance(e["forward"], Raised) and \
                any(m in cf.message for m in AUTOGRAD_LATE_ERRORS) and \
                any(v.type is cf.type and any(m in v.message for m in AUTOGRAD_LATE_ERRORS)
                    for v in later):
            # the joint graph is traced up front: an autograd error eager raises
            # when the backward (or a grad_fn) is reached comes at the first call
            result.notes.append(f"{prefix}forward: compiled raises {cf!r}, an error eager raises "
                                "later: tolerated")
            return
        _compare_raised("forward", e["forward"], c["forward"], result, prefix)
        return          # nothing after a failed forward is comparable
    skip_grads = False
    skip_after_mutation = False
    for key in list(e) + [k for k in c if k not in e]:
        if skip_grads and key.startswith("grad of leaf"):
            continue
        if skip_after_mutation and "after mutating the outputs" in key:
            continue
        if key not in e or key not in c:
            side, value = ("eager", e[key]) if key in e else ("compiled", c[key])
            result.mismatches.append(Mismatch(prefix + f"{_kind_key(key)}: only in the {side} run",
                                              f"{key} = {value!r} in the {side} run only"))
            skip_grads |= key == "backward"
            continue
        ev, cv = e[key], c[key]
        documented = _documented_difference(key, e, c)
        if documented is not None:
            if not _values_equal(ev, cv)[0] if not isinstance(ev, Raised) else True:
                result.notes.append(f"{prefix}{key}: {documented}: tolerated")
            skip_grads |= key == "backward"
            skip_after_mutation |= key.endswith(".add_(1)") and \
                (isinstance(ev, Raised) or isinstance(cv, Raised))
            continue
        if ev is OK or cv is OK or isinstance(ev, Raised) or isinstance(cv, Raised):
            if key == "forward" or key == "backward" or key.endswith(".add_(1)"):
                verdict = _compare_raised(key, ev, cv, result, prefix)
                skip_grads |= key == "backward" and verdict != "same"
                continue
        same, why = _values_equal(ev, cv)
        if not same:
            result.mismatches.append(Mismatch(
                prefix + f"{_kind_key(key)} differs",
                f"{key}: eager {ev!r}, compiled {cv!r}" + (f" ({why})" if why else "")))


def _is_unsupported(rec: Recorder) -> str | None:
    for key, value in rec.entries:
        if key == "forward" and isinstance(value, Raised) and value.type is NotImplementedError \
                and "not supported yet" in value.message:
            return _first_line(value.message)
    return None


def compare(fn: Callable, make_inputs: Callable, compiled: Callable | None = None, *,
            grad_enabled: bool = True, calls: int = 2, allow_unsupported: bool = False,
            impl: str = "aotgrad") -> Result:
    """Run ``fn`` eagerly and compiled on identical fresh inputs; compare everything.

    ``compiled`` defaults to ``aot_function(fn, nop)`` (``impl="torch"``:
    PyTorch's own); it is called ``calls`` times (the later calls take the
    cached path), each on fresh inputs, each compared with eager.
    """
    if compiled is None:
        compiled = make_compiled(fn, impl)
    result = Result()
    eager = observe(fn, make_inputs, grad_enabled)
    result.eager_raised = isinstance(dict(eager.entries)["forward"], Raised)
    for call in range(calls):
        prefix = "" if call == 0 else "cached call: "
        try:
            rec = observe(compiled, make_inputs, grad_enabled)
        except Exception as e:  # noqa: BLE001
            result.mismatches.append(Mismatch(prefix + f"harness: observing the compiled side "
                                              f"raised {type(e).__name__}", str(e)[:300]))
            return result
        unsupported = _is_unsupported(rec)
        if allow_unsupported and unsupported and _is_unsupported(eager) is None:
            result.unsupported = unsupported
            return result
        _compare_records(eager, rec, result, prefix)
        if result.mismatches:
            return result
    return result


def make_compiled(fn: Callable, impl: str = "aotgrad") -> Callable:
    if impl == "aotgrad":
        import aotgrad
        return aotgrad.aot_function(fn, aotgrad.nop)
    if impl == "aotgrad-budget0":  # recompute everything deterministic in the backward
        import functools

        import aotgrad
        partition = functools.partial(aotgrad.min_cut_rematerialization_partition,
                                      activation_memory_budget=0.0)
        return aotgrad.aot_function(fn, aotgrad.nop, partition_fn=partition)
    if impl == "torch":  # calibration only: PyTorch's own AOTAutograd as the compiled side
        from functorch.compile import aot_function, nop
        return aot_function(fn, nop)
    raise ValueError(f"unknown impl {impl!r}")


def check_program(program: Program, *, allow_unsupported: bool = False,
                  impl: str = "aotgrad") -> Result:
    f, make_inputs = program.load()
    return compare(f, make_inputs, grad_enabled=program.grad_enabled,
                   allow_unsupported=allow_unsupported, impl=impl)


# --------------------------------------------------------------------------
# Shrinking (the CLI's: one minimal reproducer per failure kind)
# --------------------------------------------------------------------------

def _uses(program: Program, name: str) -> bool:
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    return any(pattern.search(s.code) for s in program.steps) or name in program.outputs or \
        any(s.alias_of is not None and program.inputs[s.alias_of].name == name
            for s in program.inputs)


def _defines_outputs(p: Program) -> bool:
    defined = {i.name for i in p.inputs} | {m.group(1) for s in p.steps
                                             for m in [re.match(r"(\w+) = ", s.code)] if m}
    return all(o in defined for o in p.outputs)


def _candidates(p: Program):
    for cand in _all_candidates(p):
        if _defines_outputs(cand):
            yield cand


def _all_candidates(p: Program):
    for k in range(len(p.steps)):
        yield dataclasses.replace(p, steps=p.steps[:k] + p.steps[k + 1:])
    if len(p.outputs) > 1:
        for k in range(len(p.outputs)):
            yield dataclasses.replace(p, outputs=p.outputs[:k] + p.outputs[k + 1:])
    for k, out in enumerate(p.outputs):     # return an input instead: frees the steps behind it
        if out != p.inputs[0].name:
            yield dataclasses.replace(p, outputs=p.outputs[:k] + (p.inputs[0].name,) + p.outputs[k + 1:])
    for k, spec in enumerate(p.inputs):
        if len(p.inputs) > 1 and not _uses(p, spec.name):
            rest = tuple(s if s.alias_of is None or s.alias_of < k else
                         dataclasses.replace(s, alias_of=s.alias_of - 1)
                         for s in p.inputs[:k] + p.inputs[k + 1:])
            yield dataclasses.replace(p, inputs=rest)
    if not p.grad_enabled:
        yield dataclasses.replace(p, grad_enabled=True)
    for k, s in enumerate(p.steps):
        if s.no_grad:
            yield dataclasses.replace(p, steps=p.steps[:k] + (Step(s.code),) + p.steps[k + 1:])
    for k, spec in enumerate(p.inputs):
        new = None
        if spec.alias_of is not None:
            new = InputSpec(spec.name, spec.shape, spec.requires_grad, spec.clone)
        elif spec.requires_grad and any(s.alias_of == k for s in p.inputs):
            continue
        elif spec.requires_grad:
            new = dataclasses.replace(spec, requires_grad=False, clone=True)
        if new is not None:
            yield dataclasses.replace(p, inputs=p.inputs[:k] + (new,) + p.inputs[k + 1:])


def shrink(program: Program, kind: str, check: Callable[[Program], Result],
           budget: int = 150) -> Program:
    """Greedy: drop steps/outputs/inputs and flags while the failure kind stays."""
    best = program
    progress = True
    while progress and budget > 0:
        progress = False
        for cand in _candidates(best):
            if budget <= 0:
                break
            budget -= 1
            try:
                if check(cand).kind == kind:
                    best, progress = cand, True
                    break
            except Exception:  # noqa: BLE001 - a broken candidate is just not smaller
                continue
    return best


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _settings(count: int, *, seed: int | None, shrink_phase: bool):
    from hypothesis import HealthCheck, Phase, settings
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if shrink_phase:
        phases.append(Phase.shrink)
    return settings(max_examples=count, deadline=None, database=None,
                    derandomize=seed is not None, phases=phases, print_blob=False,
                    suppress_health_check=list(HealthCheck))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="examples to run (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="make the campaign deterministic")
    parser.add_argument("--allow-unsupported", action="store_true",
                        help="don't count compiled NotImplementedError('... not supported yet') "
                             "as a mismatch (fuzz the supported subset)")
    parser.add_argument("--no-shrink", action="store_true", help="print the smallest example "
                        "seen per kind without shrinking it further")
    parser.add_argument("--impl", choices=("aotgrad", "aotgrad-budget0", "torch"),
                        default="aotgrad",
                        help="the compiled side: aotgrad (default), aotgrad with the min-cut "
                             "partitioner at memory budget 0 (maximal recomputation), or "
                             "PyTorch's AOTAutograd (to calibrate the fuzzer)")
    parser.add_argument("--progress", type=int, default=25, help="print progress every N examples")
    parser.add_argument("--debug-assert", action="store_true",
                        help="run aotgrad under config.debug_assert: graph invariants, and every "
                             "fake result the tracer's memo rebuilds checked against the fake mode")
    args = parser.parse_args(argv)
    if args.debug_assert:
        import aotgrad
        aotgrad.config.debug_assert = True

    import warnings
    warnings.filterwarnings("ignore")
    from hypothesis import given
    from hypothesis import seed as hseed

    def check(p: Program) -> Result:
        return check_program(p, allow_unsupported=args.allow_unsupported, impl=args.impl)

    stats = {"run": 0, "mismatches": 0, "unsupported": 0, "eager_raises": 0}
    by_kind: dict[str, list] = {}       # kind -> [count, smallest program, result]
    start = time.time()

    @_settings(args.count, seed=args.seed, shrink_phase=False)
    @given(programs())
    def campaign(program: Program) -> None:
        stats["run"] += 1
        try:
            result = check(program)
        except Exception as e:  # noqa: BLE001 - a comparator crash is a finding too
            result = Result([Mismatch(f"harness crashed: {type(e).__name__}", str(e)[:300])])
        if result.unsupported:
            stats["unsupported"] += 1
        if result.eager_raised:
            stats["eager_raises"] += 1
        if not result.ok:
            stats["mismatches"] += 1
            entry = by_kind.setdefault(result.kind, [0, program, result])
            entry[0] += 1
            if program.size() < entry[1].size():
                entry[1], entry[2] = program, result
        if stats["run"] % args.progress == 0:
            print(f"[{stats['run']}/{args.count}] mismatches={stats['mismatches']} "
                  f"kinds={len(by_kind)} unsupported={stats['unsupported']} "
                  f"{time.time() - start:.0f}s", flush=True)

    if args.seed is not None:
        campaign = hseed(args.seed)(campaign)
    campaign()
    elapsed = time.time() - start

    print()
    print(f"== summary ({args.impl}) ==")
    print(f"examples run:     {stats['run']}")
    print(f"mismatches:       {stats['mismatches']}")
    if args.allow_unsupported:
        print(f"unsupported:      {stats['unsupported']} (allowed)")
    print(f"eager raised:     {stats['eager_raises']} (programs that raise in eager)")
    print(f"seconds:          {elapsed:.1f}")
    print(f"distinct kinds:   {len(by_kind)}")
    for kind, (count, _, _) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {count:5d}  {kind}")
    for n, (kind, (count, program, result)) in enumerate(
            sorted(by_kind.items(), key=lambda kv: -kv[1][0]), 1):
        if not args.no_shrink:
            program = shrink(program, kind, check)
            result = check(program)
        print()
        print(f"---- failure kind {n}/{len(by_kind)} ({count} examples): {kind}")
        print(program.reproducer(result.report()))
    return 1 if stats["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
