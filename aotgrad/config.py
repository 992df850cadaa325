"""Options of aotgrad.

Every option is a plain module attribute, read at the moment it matters, so
all the ways of changing one work::

    aotgrad.config.debug_assert = True                  # for the process
    with aotgrad.config.patch(debug_assert=True): ...   # for a block
    @aotgrad.config.patch({"debug_assert": True})       # for a function
    unittest.mock.patch("aotgrad.config.debug_assert", True)

The module accepts every option name of the functorch config of torch
2.13), with torch's default, so code written for PyTorch's AOTAutograd runs
unchanged; the README's table says, per option, whether aotgrad honours it
and why not when it does not.  A name that is no option raises
``AttributeError`` (with the nearest option names), whether patched or
assigned: Note [Options are closed].

``snapshot()`` returns every option's value; ``cache_key_options()`` the
ones the compile cache keys on (Note [Options outside the cache key]).
Torch-style helpers: ``save_config``/``load_config``, ``get_config_copy``,
``shallow_copy_dict``/``to_dict``, ``codegen_config``, ``get_hash``,
``get_type``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import os
import pickle
import sys
import types
from typing import Any, Callable

# ---------------------------------------------------------------- aotgrad's own options

# The runtime checks its assumptions on every call, and the stages check
# their graphs (Note [Graph invariants]).  Slower; meant for tests and debugging.
debug_assert: bool = False

# Outputs that alias inputs or intermediates are rebuilt by replaying the view
# ops that made them; when False (or when replay is impossible) by as_strided.
view_replay_for_aliased_outputs: bool = True

# Autocast state the backward graph is traced under: "same_as_forward",
# "off", or a list of keyword dicts for torch.amp.autocast.
backward_pass_autocast: Any = "same_as_forward"

# Look up and store compiled graphs in AOTAutogradCache (aot_module_simplified).
# torch's default is True; aotgrad's is False (README: the option table).
enable_autograd_cache: bool = False

# Folder of the on-disk cache; None means ~/.cache/aotgrad (or $AOTGRAD_CACHE_DIR).
cache_dir: str | None = None

# Fraction of the saved-activation bytes of the plain min-cut partition that
# min_cut_rematerialization_partition may keep (1.0: no budget; Note [Memory
# budget] in partition/budget.py).
activation_memory_budget: float = 1.0

# aotgrad's own: a budget for the estimated peak of the whole training step,
# in bytes (an int, or "6GiB", "512MB") or a fraction in (0, 1] of the plain
# min-cut plan's peak; the min-cut partitioner then saves, recomputes (per use
# when that lowers the peak) or, on a device, offloads to CPU memory so that
# the peak fits (Note [Peak budget] in partition/planner.py).  None: no budget.
memory_budget: Any = None

# Most compiled variants aot_function keeps per function (the guard cache);
# beyond this a call with new input metadata raises instead of recompiling.
cache_size_limit: int = 64

# ---------------------------------------------------------------- partitioning (partition/)

# Common-subexpression elimination of the joint graph before the min-cut
# partitioner chooses what to save (never random or effectful ops).
cse: bool = True

# Graph inputs that are parameters or buffers cost nothing to save (they
# stay alive anyway); when False they are priced by their bytes.
treat_parameters_as_free_to_save: bool = True

# Views are never saved: the backward recomputes them from their base.
recompute_views: bool = False

# The min-cut's restrictions on what the backward may recompute for free
# (Note [Recompute bans] in bans.py).  The allowlist: only ops of the cheap
# tables; when False, a denylist: anything but costly, random or custom ops.
ban_recompute_not_in_allowlist: bool = True
# Reductions (an output much smaller than the inputs) are saved, not recomputed.
ban_recompute_reductions: bool = True
# A value the backward must materialize anyway (a costly op reads it there) is saved.
ban_recompute_materialized_backward: bool = True
# A cheap op is not recomputed when its input is also read, earlier, by a
# costly forward op (the two could not be fused together).
ban_recompute_used_far_apart: bool = True
# Chains of more than 100 cheap ops are cut (recomputing one whole would be long).
ban_recompute_long_fusible_chains: bool = True
# All the bans above off but the one on reductions.
aggressive_recomputation: bool = False
# Forward nodes farther than this from the backward are not recomputed.
max_dist_from_bw: int = 1000
# Custom (non-aten, non-prims) ops may be recomputed (denylist mode, memory budget).
is_non_builtin_to_include: bool = False
# Collectives may be recomputed under a memory budget (unsafe: ranks may disagree).
unsafe_allow_optimization_of_collectives: bool = False

# How the memory budget prices recomputation: "flops" (aotgrad's roofline
# estimate), "profile" (time each op), "testing" (1 per op) or a callable
# node -> cost.
activation_memory_budget_runtime_estimator: Any = "flops"
# The knapsack solver torch uses for the budget; aotgrad solves it as a
# parametric min-cut instead (accepted, not used).
activation_memory_budget_solver: Any = "dp"
# An SVG of torch's budget pareto curve, and its folder (accepted, not used).
visualize_memory_budget_pareto: bool = os.environ.get("PARTITIONER_MEMORY_BUDGET_PARETO", "0") == "1"
memory_budget_pareto_dir: str | None = os.environ.get("PARTITIONER_MEMORY_BUDGET_PARETO_DIR")
# Log the partitioner's decisions (accepted, not used: see `aotgrad explain`).
debug_partitioner: bool = os.environ.get("AOT_PARTITIONER_DEBUG", "0") != "0"
# Size of script objects in node values (accepted: aotgrad never saves them).
unsafe_treat_script_objects_as_zero_size: bool = False
# Partition the same way on all ranks by exchanging decisions (accepted, not used).
_sync_decision_cross_ranks: bool = False
# torch's graphs with forward, loss and backward in one: not aotgrad's.
remat_using_tags_for_fwd_loss_bwd_graph: bool = True

# A callable (joint_gm, joint_inputs) -> joint_gm run on the joint graph
# before partitioning.
joint_custom_pass: Callable | None = None

# The backward may recompute random ops: the forward saves the RNG state
# before each, and the backward replays it (Note [Replayed random ops]).
functionalize_rng_ops: bool = False
# torch's CUDA-graph-safe variant of the above (accepted, not used).
graphsafe_rng_functionalization: bool = True

# Activation offloading, torch's way (accepted, not used: MemoryPolicy(offload=)).
enable_activation_offloading: bool = False
activation_offload_separate_stream: bool = False
activation_offload_sink_wait: bool = False
activation_reload_prefetch: bool = False
activation_offload_cpu_gpu_bw: float = 50.0

# ---------------------------------------------------------------- saved-tensor hooks (saved_hooks.py)

# Which saved tensors the inlined saved-tensor hooks apply to: "donated" (the
# forward's own intermediates: not inputs, outputs or gradients), "no_static"
# (all but parameters and buffers), "all".
saved_tensors_hooks_filtering_mode: str = "donated"

# ---------------------------------------------------------------- the compile cache (cache.py)

# A cache bypass raises instead of being counted.
strict_autograd_cache: bool = False
# Programs calling custom autograd.Functions may be cached.
autograd_cache_allow_custom_autograd_functions: bool = False
# The key ignores the names of the graph's inputs (dynamo names them after
# the user's variables).
autograd_cache_normalize_inputs: bool = True
# torch's bundled, remote, forced and key-less caches (accepted, not used).
bundled_autograd_cache: bool = False
bypass_autograd_cache_key: bool = False
force_autograd_cache: bool = False
enable_remote_autograd_cache: bool | None = (
    True if os.environ.get("TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE") == "1" else
    False if os.environ.get("TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE") == "0" else None)

# ---------------------------------------------------------------- tracing and runtime (accepted)

# Buffers the backward may overwrite (it is then single use).
donated_buffer: bool = True
# Tangents are traced with their outputs' strides, and gradients given so
# (else: contiguous in the output's memory format): Note [Tangent strides].
guess_tangent_strides_as_outputs: bool = True
# The effect token of an exported graph is made in the graph, not an input
# and output of it: Note [Effect tokens in export].
unlift_effect_tokens: bool = False
# Custom ops returning views of their inputs: check at first call, and raise.
check_custom_op_aliasing: bool = True
error_on_custom_op_aliasing: bool = (
    os.environ["TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING"] == "1"
    if "TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING" in os.environ else bool(os.environ.get("CI")))
# Options read by torch's own fake tensors, make_fx and inductor.
fake_tensor_allow_meta: bool = os.environ.get("FAKE_ALLOW_META", "1") != "0"
fake_tensor_allow_unsafe_data_ptr_access: bool = True
fake_tensor_crossref: Any = False
fake_tensor_propagate_real_tensors: bool = False
fake_tensor_prefer_device_type: str | None = None
generate_fake_kernels_from_real_mismatches: bool = False
custom_op_default_layout_constraint: str = "needs_exact_strides"
decompose_custom_triton_ops: bool = True
selective_decompose: bool = False
enable_complex_wrapper: bool = False
static_weight_shapes: bool = True
disable_guess_zero_tangent_for_mutated_input_subclass: bool = False
force_non_lazy_backward_lowering: bool = False
torch_compile_graph_format: str = os.environ.get("TORCH_COMPILE_GRAPH_FORMAT", "svg")
_test_disable_functionalization: bool = True

# ---------------------------------------------------------------- the option table

_module = sys.modules[__name__]
_HELPERS = frozenset({"snapshot", "cache_key_options", "resolved_cache_dir", "patch",
                      "save_config", "save_config_portable", "load_config", "get_config_copy",
                      "get_serializable_config_copy", "shallow_copy_dict", "to_dict",
                      "codegen_config", "get_hash", "get_type", "is_option"})

#: Every option, in the order above.
_OPTIONS: tuple[str, ...] = tuple(
    name for name, value in vars(_module).items()
    if not name.startswith("__") and name not in ("annotations", "Any", "Callable", "_module",
                                                  "_HELPERS")
    and not isinstance(value, types.ModuleType))
_OPTION_SET = frozenset(_OPTIONS)
_DEFAULTS: dict[str, Any] = {name: getattr(_module, name) for name in _OPTIONS}

#: Callables have no stable value to save or hash (as torch's config says too).
_SAVE_IGNORED = ("joint_custom_pass", "activation_memory_budget_runtime_estimator",
                 "activation_memory_budget_solver")

# Note [Options outside the cache key]: the compile cache keys on every
# option but these, which cannot change what is compiled: where the cache
# lives and whether it is consulted (enable_autograd_cache, cache_dir,
# strict_autograd_cache, autograd_cache_*, the torch-only cache options),
# how many variants aot_function keeps (cache_size_limit), and debug output
# (debug_partitioner, pareto plots, the graph format).  Callables among the
# options (joint_custom_pass, a callable runtime estimator) have no stable
# value: the cache is bypassed while one is set (cache.cache_key).
_NOT_IN_KEY = frozenset({
    "enable_autograd_cache", "cache_dir", "strict_autograd_cache",
    "autograd_cache_allow_custom_autograd_functions", "autograd_cache_normalize_inputs",
    "bundled_autograd_cache", "bypass_autograd_cache_key", "force_autograd_cache",
    "enable_remote_autograd_cache", "cache_size_limit", "debug_partitioner",
    "visualize_memory_budget_pareto", "memory_budget_pareto_dir", "torch_compile_graph_format",
})


def is_option(name: str) -> bool:
    return name in _OPTION_SET


def _unknown(name: str) -> AttributeError:
    close = difflib.get_close_matches(name, _OPTIONS, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        " (the README lists them all)"
    return AttributeError(f"aotgrad.config has no option {name!r}{hint}")


class _ConfigModule(types.ModuleType):
    """Note [Options are closed]: the module's class refuses to set a name
    that is no option, so a misspelt assignment fails as loudly as a
    misspelt ``patch``.  Setting a known option is a plain attribute write
    (``mock.patch`` works), reading one a plain module lookup (no cost).
    The helpers (``mock.patch("aotgrad.config.snapshot")``) and
    dunder names stay writable."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTION_SET or name in self.__dict__ or name.startswith("__"):
            super().__setattr__(name, value)
            return
        raise _unknown(name)

    def __getattr__(self, name: str) -> Any:  # only for names that do not exist
        if name.startswith("__"):
            raise AttributeError(name)
        raise _unknown(name)

    def __delattr__(self, name: str) -> None:
        if name in _OPTION_SET:
            raise AttributeError(f"aotgrad.config: option {name!r} cannot be deleted")
        super().__delattr__(name)


_module.__class__ = _ConfigModule

# ---------------------------------------------------------------- helpers


def snapshot() -> dict[str, Any]:
    """The current value of every option."""
    return {name: getattr(_module, name) for name in _OPTIONS}


def cache_key_options() -> dict[str, Any]:
    """The options the compile cache keys on (Note [Options outside the cache key])."""
    return {name: getattr(_module, name) for name in _OPTIONS if name not in _NOT_IN_KEY}


def resolved_cache_dir() -> str:
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("AOTGRAD_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aotgrad")


def shallow_copy_dict() -> dict[str, Any]:
    """Every option's value (torch's name for ``snapshot``)."""
    return snapshot()


to_dict = shallow_copy_dict


def get_config_copy() -> dict[str, Any]:
    """Every option's value, deep-copied (callables as they are)."""
    return {k: v if callable(v) else copy.deepcopy(v) for k, v in snapshot().items()}


def get_serializable_config_copy() -> dict[str, Any]:
    """``get_config_copy`` without the options that hold callables."""
    return {k: v for k, v in get_config_copy().items() if k not in _SAVE_IGNORED}


def save_config() -> bytes:
    """The options as a pickle, for ``load_config`` (callables left out)."""
    return pickle.dumps(get_serializable_config_copy(), protocol=2)


def save_config_portable(*, ignore_private_configs: bool = True) -> dict[str, Any]:
    """The options that differ from their defaults (callables and, by
    default, private options left out)."""
    return {k: v for k, v in get_serializable_config_copy().items()
            if v != _DEFAULTS[k] and not (ignore_private_configs and k.startswith("_"))}


def load_config(saved: bytes | dict[str, Any]) -> None:
    """Set the options ``save_config`` (or ``shallow_copy_dict``) returned.
    Unknown names raise (Note [Options are closed])."""
    values = saved if isinstance(saved, dict) else pickle.loads(saved)
    for name in values:
        if name not in _OPTION_SET:
            raise _unknown(name)
    for name, value in values.items():
        setattr(_module, name, value)


def codegen_config() -> str:
    """Python statements that set the options differing from their defaults."""
    return "\n".join(f"aotgrad.config.{k} = {v!r}" for k, v in snapshot().items()
                     if k not in _SAVE_IGNORED and v != _DEFAULTS[k])


def get_hash() -> bytes:
    """A digest of the options the compile cache keys on."""
    items = sorted((k, repr(v)) for k, v in cache_key_options().items())
    return hashlib.sha256(repr(items).encode()).digest()


def get_type(name: str) -> type:
    """The type of an option's default value."""
    if name not in _OPTION_SET:
        raise _unknown(name)
    return type(_DEFAULTS[name])


class _Patch(contextlib.ContextDecorator):
    def __init__(self, changes: dict[str, Any]):
        for name in changes:
            if name not in _OPTION_SET:
                raise _unknown(name)
        self.changes = changes
        self.saved: list[dict[str, Any]] = []

    def __enter__(self):
        self.saved.append({name: getattr(_module, name) for name in self.changes})
        for name, value in self.changes.items():
            setattr(_module, name, value)
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.pop().items():
            setattr(_module, name, value)
        return False


def patch(arg: dict[str, Any] | str | None = None, value: Any = None, /, **kwargs: Any) -> _Patch:
    """Change options for a ``with`` block or a decorated function.

    ``patch(name=value, ...)``, ``patch({"name": value})`` or ``patch("name", value)``.
    """
    changes: dict[str, Any] = {}
    if isinstance(arg, dict):
        changes.update(arg)
    elif isinstance(arg, str):
        changes[arg] = value
    elif arg is not None:
        raise TypeError("aotgrad.config.patch takes a dict, a name and a value, or keywords")
    changes.update(kwargs)
    return _Patch(changes)
