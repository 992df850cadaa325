"""The public entry points: aot_function, aot_module, aot_module_simplified.

``aot_function`` compiles lazily, on the first call, and keeps one compiled
program per *guard key* — the metadata of the call's inputs (shape, stride,
dtype, device, requires_grad of each tensor; the value of each constant; which
tensors are passed twice) and the grad mode.  A call with a new key compiles
again (see Note [Guard key]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from . import _torch, config, node_meta, saved_hooks, stateless, transforms
from ._torch import (any_autocast_enabled, autocast_state, forward_ad_level,
                     functorch_transforms_active, pytree, tensor_guard, top_saved_tensor_hooks)
from .codegen import Namespace, make_function
from .compile import Compiler, logged
from .partition import default_partition
from .pipeline import (CompileOptions, CompileReport, compile_call, static_weights,
                       compile_rebased)
from .rebase import AliasedMutatedInputs
from .runtime import MISS
from .values import GuardFailed
from .subclass import hashable, layout_key
from .objects import state_key
from .opened import Deferred, is_plain_object

from torch.nn.modules import module as _nn_module  # noqa: E402  (its global hook tables)


_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_VALUE_TYPES = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.storage_offset())


def guard_key(leaves: list, in_spec: Any, dynamic: bool, num_static: int = 0) -> tuple:
    # ``in_spec`` is the TreeSpec, or for flat tensor calls just their number
    """Note [Guard key]: everything about a call that the compiled program assumes.

    Tensors: shape (ndim when ``dynamic``), stride, dtype, device,
    requires_grad, and for a subclass its layout (types and flatten metadata
    of the subclass tree); constants: their value; plus which leaves are the same
    tensor object, the input tree structure, the grad mode, saved-tensor
    hooks, autocast and the default dtype.  Objects passed in: their state
    (Note [Objects passed in], objects.py).
    """
    parts: list = [torch.is_grad_enabled(), in_spec, saved_hooks.guard_part(), autocast_state(),
                   torch.get_default_dtype()]
    tensor_ids = []
    passed = []
    for k, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensor_ids.append(id(leaf))
            if dynamic and k >= num_static:   # Note [Static weight shapes] (pipeline.py)
                parts.append((leaf.dim(), leaf.dtype, leaf.device, leaf.requires_grad))
            else:
                parts.append(_tensor_key(leaf))
            if type(leaf) not in _PLAIN_TENSOR_TYPES:  # its subclass tree and metadata
                parts.append(layout_key(leaf))
        elif type(leaf) not in _VALUE_TYPES and is_plain_object(leaf):
            passed.append(leaf)  # Note [Objects passed in]: by state, below
            parts.append(type(leaf))
        elif type(leaf) is float:   # -0.0 == 0.0, but 1 / -0.0 is -inf
            parts.append((float, leaf, math.copysign(1.0, leaf)))
        else:
            parts.append((type(leaf), hashable(leaf)))
    if passed:
        parts.append(state_key(passed))
    if len(set(tensor_ids)) != len(tensor_ids):
        first: dict[int, int] = {}
        parts.append(tuple(first.setdefault(i, k) for k, i in enumerate(tensor_ids)))
    return tuple(parts)


def fast_guard(ns: Namespace, tensors: list, exprs: list[str], training: bool,
               offset_free: frozenset[int] = frozenset()) -> str | None:
    """Note [Fast path]: the guard key of a call of plain tensors ``tensors``
    (read by the expressions ``exprs``) as one boolean expression — a C++
    check of each tensor's metadata, storage offsets (but those in
    ``offset_free``: Note [Offsets nobody reads], runtime.py), distinctness
    and the global state — or None where the state is one the fast path leaves to
    ``guard_key`` (autocast on, saved-tensor hooks, no C++ check).  Saved
    tensor hooks and functorch transforms matter only to a ``training``
    program (Note [Guarded apply], runtime.py)."""
    if any(autocast_state()) or top_saved_tensor_hooks() is not None or \
            any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return None
    check = tensor_guard(tensors)
    if check is None:
        return None
    parts = [f"{ns.bind(torch.is_grad_enabled, 'grad_enabled')}()"
             if torch.is_grad_enabled() else f"not {ns.bind(torch.is_grad_enabled, 'grad_enabled')}()"]
    if tensors:
        parts.append(f"{ns.bind(check, 'tensor_check')}({', '.join(exprs)})")
    parts += [f"{e}.storage_offset() == {t.storage_offset()}"
              for k, (e, t) in enumerate(zip(exprs, tensors)) if k not in offset_free]
    if len(tensors) <= 6:
        parts += [f"{a} is not {b}" for k, a in enumerate(exprs) for b in exprs[k + 1:]]
    else:
        parts.append(f"len({{{', '.join(f'id({e})' for e in exprs)}}}) == {len(exprs)}")
    parts.append(f"not {ns.bind(any_autocast_enabled, 'any_autocast')}()")
    # factories and promotion with Python floats follow it
    parts.append(f"{ns.bind(torch.get_default_dtype, 'default_dtype')}() is "
                 f"{ns.bind(torch.get_default_dtype(), 'dtype')}")
    # Note [Under transforms] (transforms.py)
    parts.append(f"not {ns.bind(functorch_transforms_active, 'functorch_active')}()")
    parts.append(f"{ns.bind(forward_ad_level, 'forward_ad_level')}() < 0")
    if training:
        parts.append(f"{ns.bind(top_saved_tensor_hooks, 'top_hooks')}() is None")
    return " and ".join(parts)


def _always_miss(args: tuple) -> Any:
    return MISS


def _made_at_first_use(make: Callable[[], Callable[[tuple], Any]], by_key: dict, key: tuple,
                       owner: Any) -> Callable[[tuple], Any]:
    """Note [Fast path]: a stand-in for the fast function ``make()`` returns,
    making it at its first call and putting it where the stand-in was."""
    def first_use(args: tuple) -> Any:
        fast = by_key[key] = make()
        if owner._fast is first_use:
            owner._fast = fast
        return fast(args)

    return first_use


class AOTFunction:
    """The callable ``aot_function`` returns (same signature as the user's fn).

    Note [Fast path]: a call of tensors only, with the metadata of the last
    call that compiled or hit, runs one generated function: the guard of
    ``fast_guard`` followed by the program's generated runtime (Note
    [Generated runtime], runtime.py) — no guard key is built, no pytree
    walked.  The function returns ``MISS`` when its guard fails or the call's
    mutated inputs alias (Note [Aliased mutated inputs]); the call then takes
    the general path below, which builds the guard key and, when the call was
    one of plain tensors, makes the fast function for its program (one per
    key, kept).  Guards the key holds and the fast function leaves to the
    general path: autocast on, saved-tensor hooks, tensor subclasses,
    dynamic shapes.  The fast function's guard is written at the call that
    makes it, but its source is made and compiled when it first runs: a
    program called once (an export, a one-off) never pays for that, and the
    first call, which compiles the program, is not made longer by it (for a
    large module, a good part of what the first call compiles)."""

    def __init__(self, fn: Callable, options: CompileOptions):
        self.fn = fn
        self.options = options
        self._compiled: dict[tuple, Callable[[list], Any]] = {}
        self._shape_variants: dict[tuple, list[Callable[[list], Any]]] = {}
        self._flat_specs: dict[int, Any] = {}
        self._fast: Callable[[tuple], Any] = _always_miss
        self._fast_by_key: dict[tuple, Callable[[tuple], Any]] = {}
        self.last_report: CompileReport | None = None
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and (out := self._fast(args)) is not MISS:
            return out
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        flat = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        run, leaves, in_spec, key = self.lookup(args, kwargs, flat)
        if flat:
            self._fast = self.fast_function(key, run, list(args),
                                            [f"args[{k}]" for k in range(len(args))],
                                            f"len(args) == {len(args)}", owner=self)
        return self.run(run, leaves, in_spec, key)

    def lookup(self, args: tuple, kwargs: dict, flat: bool, lift: bool = True) -> tuple:
        """``(run, leaves, in_spec, key)`` of a call: its compiled program
        (compiled now if new), flat leaves, input spec and guard key; under a
        torch.func transform or with dual tensors (unless not ``lift``), the
        program lifted for them (Note [Under transforms], transforms.py)."""
        if flat:
            # flat tensor arguments need no pytree walk; the spec is the same
            # for every call with this many arguments
            leaves = list(args)
            in_spec = self._flat_specs.get(len(args))
            if in_spec is None:
                in_spec = self._flat_specs[len(args)] = pytree.tree_flatten((args, {}))[1]
        else:
            leaves, in_spec = pytree.tree_flatten((args, kwargs))
        if lift and transforms.needed(leaves):
            key = transforms.lifted_key(leaves, in_spec, flat)
            run = self._compiled.get(key)
            if run is None:
                run = self._compiled[key] = transforms.Lifted(self, leaves, in_spec, flat)
            return run, leaves, in_spec, key
        key = guard_key(leaves, len(args) if flat else in_spec, self.options.dynamic,
                        static_weights(self.options))
        run = self._compiled.get(key)
        if run is None:
            run = self._compile(leaves, in_spec, key)
        return run, leaves, in_spec, key

    def run(self, run: Callable[[list], Any], leaves: list, in_spec: Any, key: tuple) -> Any:
        try:
            out = run(leaves)
        except GuardFailed:  # Note [Shape guards] (pipeline.py), Note [Values read while tracing]
            out = self._call_shape_variant(key, leaves, in_spec)
        except AliasedMutatedInputs as aliased:  # Note [Aliased mutated inputs]
            out = self._call_aliased(key, leaves, in_spec, aliased)
        # Note [Objects passed in] (objects.py): built with the call's objects
        return out.finish(leaves) if type(out) is Deferred else out

    def _call_aliased(self, key: tuple, leaves: list, in_spec: Any,
                      aliased: AliasedMutatedInputs) -> Any:
        """The compilation of ``key`` for the call's aliased mutated inputs."""
        alias_key = (key, aliased.groups)
        run = self._compiled.get(alias_key)
        if run is None:
            run = self._compile(leaves, in_spec, alias_key, aliased)
        return run(leaves)

    def fast_function(self, key: tuple, run: Callable[[list], Any], leaves: list,
                      exprs: list[str], extra_guard: str, namespace: dict | None = None, *,
                      owner: Any) -> Callable[[tuple], Any]:
        """Note [Fast path]: the generated function for calls like this one,
        whose leaf k is the expression ``exprs[k]`` of the call's ``args``
        (made once per key; ``_always_miss`` where there can be none).  Until
        it first runs it is a stand-in that makes it, then puts it in
        ``owner._fast`` (where the caller keeps it)."""
        fast = self._fast_by_key.get(key)
        if fast is not None:
            return fast
        program = getattr(run, "program", None)
        guard = None
        if program is not None and not self.options.dynamic:
            ns = Namespace("guard")
            ns.values.update(namespace or {})
            slots, graph_leaf = run.leaf_slot, run.graph_leaf
            guard = fast_guard(ns, [leaves[j] for j in graph_leaf],
                               [f"i{k}" for k in range(len(graph_leaf))], program.training,
                               program.offset_free)
            if guard is not None:
                # a tensor passed twice is the same object again; constants
                # (exprs None) are fixed by the caller's own guard
                same = [f"{exprs[j]} is {exprs[graph_leaf[s]]}" for j, s in enumerate(slots)
                        if s >= 0 and graph_leaf[s] != j]
                guard = " and ".join([guard, *same])
        if guard is None:
            fast = _always_miss
        else:
            fast = _made_at_first_use(
                lambda: program.function("args", [exprs[j] for j in graph_leaf], guard,
                                         ns.values, name="fast_call", pre_guard=extra_guard),
                self._fast_by_key, key, owner)
        self._fast_by_key[key] = fast
        return fast

    def _call_shape_variant(self, key: tuple, leaves: list, in_spec: Any) -> Any:
        """The first compilation for ``key`` whose shape guards hold, else a new one."""
        variants = self._shape_variants.setdefault(key, [])
        for k, run in enumerate(variants):
            try:
                return run(leaves)
            except GuardFailed:
                continue
            except AliasedMutatedInputs as aliased:   # this variant's sizes, other aliasing
                return self._call_aliased((key, "shapes", k), leaves, in_spec, aliased)
        variant = (key, "shapes", len(variants))
        run = self._compile(leaves, in_spec, variant)
        variants.append(run)
        try:
            return run(leaves)
        except AliasedMutatedInputs as aliased:
            return self._call_aliased(variant, leaves, in_spec, aliased)

    def _compile(self, leaves: list, in_spec: Any, key: tuple,
                 aliased: AliasedMutatedInputs | None = None) -> Callable[[list], Any]:
        if len(self._compiled) >= config.cache_size_limit:
            raise RuntimeError(
                f"aotgrad: {self.__name__} was compiled for {len(self._compiled)} different "
                "input signatures (shapes/dtypes/requires_grad), the limit "
                "(aotgrad.config.cache_size_limit). Use dynamic=True for varying shapes, or "
                "raise the limit.")
        report = CompileReport()
        if aliased is None:
            run = compile_call(self.fn, self.options, leaves, in_spec, report)
        else:
            run = compile_rebased(self.fn, self.options, leaves, in_spec, aliased, report)
        self.last_report = report
        self._compiled[key] = run
        return run


def aot_function(fn: Callable, fw_compiler: Compiler, bw_compiler: Compiler | None = None,
                 partition_fn: Callable = default_partition,
                 decompositions: Mapping | None = None, num_params_buffers: int = 0,
                 keep_inference_input_mutations: bool = False,
                 inference_compiler: Compiler | None = None, *, dynamic: bool = False,
                 enable_log: bool = True,
                 disable_functionalization: bool = False) -> AOTFunction:
    """Compile ``fn`` ahead of time into a forward and a backward graph.

    ``fw_compiler`` / ``bw_compiler`` / ``inference_compiler`` take
    ``(fx.GraphModule, example_inputs)`` and return a callable;
    ``bw_compiler`` and ``inference_compiler`` default to ``fw_compiler``.
    Compilation happens on the first call, again for inputs with new metadata.
    ``enable_log``: each graph is logged, before its compiler sees it, to the
    ``aotgrad.graphs`` logger at DEBUG level (``logging.getLogger(
    "aotgrad.graphs").setLevel(logging.DEBUG)`` shows them).
    ``disable_functionalization`` is accepted for compatibility and ignored:
    aotgrad always functionalizes (it is how mutations stay exact), which
    computes the same values.
    """
    del disable_functionalization
    if enable_log:
        fw_compiler = logged(fw_compiler)
        bw_compiler = logged(bw_compiler) if bw_compiler is not None else None
        inference_compiler = logged(inference_compiler) if inference_compiler is not None \
            else None
    options = CompileOptions(fw_compiler, bw_compiler, partition_fn, decompositions,
                             num_params_buffers, keep_inference_input_mutations,
                             inference_compiler, dynamic,
                             compile_function=AOTFunction)  # Note [Higher-order backward]
    return AOTFunction(fn, options)


class AOTModule(nn.Module):
    """The module ``aot_module`` returns: parameters and buffers become inputs.

    Its fast path (Note [Fast path]) reads each parameter and buffer from its
    owner's ``_parameters`` / ``_buffers`` and guards the module tree: every
    submodule still where it was, in the same train/eval mode, with as many
    parameters, buffers and children."""

    def __init__(self, mod: nn.Module, compiled: AOTFunction):
        super().__init__()
        self.orig_module = mod
        self._compiled = compiled
        self._submodules = list(mod.modules())
        self._fast: Callable[[tuple], Any] = _always_miss

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Note [Fast path]: with no hooks to run, nn.Module's call machinery
        # would only call forward
        if not kwargs and module_call_is_plain(self) and (out := self._fast(args)) is not MISS:
            return out
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and (out := self._fast(args)) is not MISS:
            return out
        params = dict(self.orig_module.named_parameters(remove_duplicate=False))
        buffers = dict(self.orig_module.named_buffers(remove_duplicate=False))
        # train/eval changes what the module computes, and so do the hooks
        # module(...) runs (traced in): part of the guard key
        modes = (*(m.training for m in self._submodules), _hooks_key(self.orig_module))
        compiled = self._compiled
        run, leaves, in_spec, key = compiled.lookup((params, buffers, modes, *args), kwargs,
                                                    False)
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            fast = compiled._fast_by_key.get(key)  # made once per key
            if fast is None:
                ns = Namespace("mod")
                exprs, guard = _module_reads(self.orig_module, ns)
                exprs += [None] * len(modes)
                exprs += [f"args[{k}]" for k in range(len(args))]
                fast = compiled.fast_function(
                    key, run, leaves, exprs, f"len(args) == {len(args)} and {guard}", ns.values,
                    owner=self)
            self._fast = fast
        return compiled.run(run, leaves, in_spec, key)


def _module_reads(root: nn.Module, ns: Namespace) -> tuple[list[str], str]:
    """Expressions reading ``root``'s parameters then buffers, in the order of
    ``named_parameters`` / ``named_buffers`` (remove_duplicate=False), and a
    guard that the module tree is as now."""
    root_name = ns.bind(root, "root")
    names = {"": root_name}
    checks = []
    params, buffers = [], []
    for path, m in root.named_modules(remove_duplicate=False):
        if path:
            parent, _, attr = path.rpartition(".")
            names[path] = ns.bind(m, "m")
            checks.append(f"{names[parent]}._modules[{attr!r}] is {names[path]}")
        me = names[path]
        checks.append(f"{me}.training is {m.training}")
        if not path:   # the hooks module(...) runs: traced in (_hooks_key)
            checks += [f"{'not ' if not getattr(m, d) else ''}{me}.{d}" +
                       (f" and tuple({me}.{d}) == {tuple(getattr(m, d))!r}" if getattr(m, d)
                        else "") for d in _HOOKS]
            mod = ns.bind(_nn_module, "nn_module")
            checks += [f"not {mod}.{d}" if not getattr(_nn_module, d) else
                       f"tuple({mod}.{d}) == {tuple(getattr(_nn_module, d))!r}"
                       for d in _GLOBAL_HOOKS]
        checks += [f"len({me}.{d}) == {len(getattr(m, d))}"
                   for d in ("_parameters", "_buffers", "_modules")]
        for store, out in (("_parameters", params), ("_buffers", buffers)):
            for name, value in getattr(m, store).items():
                if value is None:
                    checks.append(f"{me}.{store}[{name!r}] is None")
                else:
                    out.append(f"{me}.{store}.get({name!r})")  # None: the tensor check fails
    return params + buffers, " and ".join(checks)


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = tuple(f"_global{d}" for d in _HOOKS)


def _hooks_key(mod: nn.Module) -> str:
    """The hooks ``mod(...)`` runs, its own and the global ones, by handle id:
    a hook registered or removed after compiling changes what the call does
    (it was traced in and stayed after ``remove()``)."""
    return repr([tuple(getattr(mod, d)) for d in _HOOKS] +
                [tuple(getattr(_nn_module, d)) for d in _GLOBAL_HOOKS])


def _functional_call(mod: nn.Module) -> Callable:
    def call(params: dict, buffers: dict, _modes: tuple, *args: Any, **kwargs: Any) -> Any:
        return stateless.functional_call(mod, (params, buffers), args, kwargs)

    call.__name__ = type(mod).__name__
    call.aotgrad_leading_args = 3  # type: ignore[attr-defined]  # params, buffers, modes
    return call


def aot_module(mod: nn.Module, *args: Any, **kwargs: Any) -> AOTModule:
    """``aot_function`` for a module: its parameters, then buffers, are lifted to
    the first graph inputs.  Takes ``aot_function``'s arguments after ``mod``."""
    num = sum(1 for _ in mod.named_parameters(remove_duplicate=False)) + \
        sum(1 for _ in mod.named_buffers(remove_duplicate=False))
    kwargs["num_params_buffers"] = num
    return AOTModule(mod, aot_function(_functional_call(mod), *args, **kwargs))


def aot_module_simplified(mod: nn.Module | Callable, example_inputs: list,
                          fw_compiler: Compiler, bw_compiler: Compiler | None = None,
                          partition_fn: Callable = default_partition,
                          decompositions: Mapping | None = None,
                          keep_inference_input_mutations: bool = False,
                          inference_compiler: Compiler | None = None,
                          compiler_config_extra: Any = None,
                          ignore_shape_env: bool = False,
                          disable_functionalization: bool = False,
                          pre_grad_passes: Callable | None = None,
                          compile_region_name: str | None = None, *,
                          _caller_guards: bool = False) -> Callable:
    """Compile now, for flat tensor inputs like ``example_inputs`` (maybe fake).

    The result takes the same flat list of tensors as positional arguments and
    returns a flat tuple/list as ``mod`` does.  It does no guarding of its own:
    the caller (torch.compile) guards.  Parameters and buffers of ``mod`` are
    lifted to graph inputs ahead of the user inputs.

    Torch's other keywords: ``pre_grad_passes(gm, example_inputs) -> gm`` runs
    on ``mod`` first.  ``compiler_config_extra``, ``ignore_shape_env`` and
    ``compile_region_name`` are accepted and change nothing here (torch keeps
    them with its cache entries' compiler settings, and aotgrad traces with
    the example inputs' own fake mode); ``disable_functionalization`` is
    ignored as in ``aot_function``.  Any other keyword is a TypeError.
    """
    del compiler_config_extra, ignore_shape_env, disable_functionalization, compile_region_name
    for i, x in enumerate(example_inputs):
        if isinstance(x, (list, tuple, dict)):
            raise TypeError(
                f"aot_module_simplified takes flat example inputs (tensors, SymInts, scalars); "
                f"example input {i} is a {type(x).__name__} (aotgrad.backends flatten "
                f"dynamo's list inputs first: Note [Nested graph inputs], graph_inputs.py)")
    if pre_grad_passes is not None:
        mod = pre_grad_passes(mod, list(example_inputs))
    options = CompileOptions(fw_compiler, bw_compiler, partition_fn, decompositions, 0,
                             keep_inference_input_mutations, inference_compiler, False,
                             compile_function=AOTFunction)  # Note [Higher-order backward]
    return compile_simplified(mod, list(example_inputs), options, caller_guards=_caller_guards)


def compile_simplified(mod: nn.Module | Callable, example_inputs: list,
                       options: CompileOptions, report: CompileReport | None = None, *,
                       caller_guards: bool = False) -> Callable:
    """The work of ``aot_module_simplified``.  ``caller_guards``: the caller
    (dynamo, for the backends) guards grad mode, ``requires_grad`` and inputs
    passed twice itself (Note [Calls unlike the example])."""
    from .cache import compile_with_cache

    named = []
    if isinstance(mod, nn.Module):
        named = list(mod.named_parameters(remove_duplicate=False)) + \
            list(mod.named_buffers(remove_duplicate=False))
    names = [n for n, _ in named]
    lifted = [t for _, t in named]
    num = len(lifted)

    # Note [Node metadata] (node_meta.py): dynamo's graph, run node by node
    with_meta = num == 0 and isinstance(mod, torch.fx.GraphModule) and node_meta.has_user_meta(mod)

    def flat_fn(*all_inputs: Any) -> Any:
        if num == 0:
            return node_meta.run_preserving(mod, all_inputs) if with_meta else mod(*all_inputs)
        state = dict(zip(names, all_inputs[:num]))
        return stateless.functional_call(mod, (state,), tuple(all_inputs[num:]))

    leaves = lifted + list(example_inputs)
    in_spec = pytree.tree_flatten((tuple(leaves), {}))[1]
    options = dataclasses.replace(options, num_params_buffers=num)
    with _torch.fx_traceback.preserve_node_meta() if with_meta else contextlib.nullcontext():
        run = compile_with_cache(flat_fn, mod, options, leaves, in_spec,
                                 report if report is not None else CompileReport())

    like_example = _call_check(example_inputs, torch.is_grad_enabled(), caller_guards)
    guarded: list[AOTFunction] = []  # Note [Calls unlike the example]: made when first needed

    def general(leaves: list) -> Any:
        if not guarded:
            guarded.append(AOTFunction(flat_fn, options))
        return guarded[0](*leaves)

    def forward(*runtime_args: Any) -> Any:
        leaves = [*lifted, *runtime_args]
        if not like_example(runtime_args):
            return general(leaves)
        try:
            out = run(leaves)
        except (AliasedMutatedInputs, GuardFailed):  # Note [Aliased mutated inputs],
            return general(leaves)                   # Note [Values read while tracing]
        # Note [Objects passed in] (objects.py): built with the call's objects
        return out.finish(leaves) if type(out) is Deferred else out

    if isinstance(mod, nn.Module):
        forward.zero_grad = mod.zero_grad  # type: ignore[attr-defined]
        forward.named_parameters = mod.named_parameters  # type: ignore[attr-defined]
        forward.named_buffers = mod.named_buffers  # type: ignore[attr-defined]
    return forward


# Note [Calls unlike the example]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``aot_module_simplified`` compiles for its example inputs and does not
# guard: its caller does (dynamo guards grad mode, ``requires_grad`` and
# inputs passed twice).  A direct caller may not, and some differences give
# silently wrong results: an example passing one tensor twice is traced with
# one graph input, so a call passing two tensors there would read only the
# first; a tensor requiring grad where the example's did not would get no
# gradient.  So, unless the caller guards, each call is checked against the
# example (number of arguments, the repeated tensors, grad mode and each
# ``requires_grad``: one generated expression); a call unlike it, or whose
# mutated inputs alias other inputs (Note [Aliased mutated inputs], where the
# symbolic sizes of a dynamic trace are plain ints now), goes to an
# ``aot_function`` of the same program, which guards every call and compiles
# a program per kind of call.


def _call_check(example_inputs: list, grad_enabled: bool,
                caller_guards: bool) -> Callable[[tuple], bool]:
    """Note [Calls unlike the example]: ``check(args)``, true when a call's
    arguments are like ``example_inputs`` in what the caller does not guard."""
    n = len(example_inputs)
    parts = [f"len(args) == {n}"]
    if not caller_guards:
        ns = Namespace("check")
        first: dict[int, int] = {}
        for k, x in enumerate(example_inputs):
            if isinstance(x, torch.Tensor):
                j = first.setdefault(id(x), k)
                if j != k:
                    parts.append(f"args[{k}] is args[{j}]")
        grad = f"{ns.bind(torch.is_grad_enabled, 'grad_enabled')}()"
        parts.append(grad if grad_enabled else f"not {grad}")
        if grad_enabled:
            parts += [f"args[{k}].requires_grad is {x.requires_grad}"
                      for k, x in enumerate(example_inputs)
                      if isinstance(x, torch.Tensor) and first[id(x)] == k]
    else:
        ns = Namespace("check")
    source = f"def check(args):\n    return {' and '.join(parts)}\n"
    return make_function(source, "check", dict(ns.values))


# the names functorch users know
compiled_function = aot_function
compiled_module = aot_module



def module_call_is_plain(module: torch.nn.Module) -> bool:
    """Would ``module(...)`` just call ``module.forward``: no forward or
    backward hooks (its own or global), no ``module.compile()``, no JIT trace?"""
    m = _nn_module
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or
                module._backward_pre_hooks or m._global_forward_hooks or
                m._global_forward_pre_hooks or m._global_backward_hooks or
                m._global_backward_pre_hooks or module._compiled_call_impl is not None or
                torch._C._get_tracing_state())
