"""Options of aotgrad.

Every option is a plain module attribute, read at the moment it matters, so
all three ways of changing one work::

    aotgrad.config.debug_assert = True                  # for the process
    with aotgrad.config.patch(debug_assert=True): ...   # for a block
    @aotgrad.config.patch({"debug_assert": True})       # for a function
    unittest.mock.patch("aotgrad.config.debug_assert", True)

``snapshot()`` returns every option's value (the compile cache keys on it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

# When on, the runtime checks its assumptions on every call: the compiled
# forward returns as many values as the analysis predicted, with the predicted
# shapes and dtypes.  Slower; meant for tests and debugging.
debug_assert: bool = False

# Regenerate outputs that alias inputs or intermediates by replaying the view
# ops that made them (when False, or when replay is impossible: as_strided).
view_replay_for_aliased_outputs: bool = True

# Autocast state the backward graph is traced under: "same_as_forward",
# "off", or a list of keyword dicts for torch.amp.autocast.
backward_pass_autocast: Any = "same_as_forward"

# Look up and store compiled graphs in AOTAutogradCache (aot_module_simplified).
enable_autograd_cache: bool = False

# Folder of the on-disk cache; None means ~/.cache/aotgrad (or $AOTGRAD_CACHE_DIR).
cache_dir: str | None = None

# Fraction of the saved-activation bytes of the runtime-optimal partition (the
# default partition: nothing recomputed) that min_cut_rematerialization_partition
# may keep (1.0: no budget; Note [Memory budget] in budget.py).
activation_memory_budget: float = 1.0

# Most compiled variants aot_function keeps per function (the guard cache);
# beyond this a call with new input metadata raises instead of recompiling.
cache_size_limit: int = 64

_OPTIONS = ("debug_assert", "view_replay_for_aliased_outputs", "backward_pass_autocast",
            "enable_autograd_cache", "cache_dir", "activation_memory_budget",
            "cache_size_limit")

_module = sys.modules[__name__]


def snapshot() -> dict[str, Any]:
    """The current value of every option."""
    return {name: getattr(_module, name) for name in _OPTIONS}


def resolved_cache_dir() -> str:
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("AOTGRAD_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aotgrad")


class _Patch(contextlib.ContextDecorator):
    def __init__(self, changes: dict[str, Any]):
        for name in changes:
            if name not in _OPTIONS:
                raise AttributeError(
                    f"aotgrad.config has no option {name!r}; options are: {', '.join(_OPTIONS)}")
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
