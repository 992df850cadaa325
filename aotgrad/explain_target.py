"""What ``aotgrad explain`` explains: the target (``MODULE:FACTORY`` or the
built-in transformer), a ``MemoryPolicy`` named ``MODULE:NAME``, a
partitioner by name; ``ExplainError`` for what the user got wrong."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .partition import MemoryPolicy, default_partition

PARTITIONERS = ("default", "mincut")
BUILTIN = "aotgrad.models:make_training_step"


class ExplainError(Exception):
    """A problem with what the user asked for (bad target, missing partitioner)."""


@dataclass
class Target:
    obj: Any                      # an nn.Module or a callable
    inputs: tuple                 # example positional arguments
    name: str
    description: str


def load_target(spec: str | None) -> Target:
    """Resolve ``MODULE:FACTORY`` (or the built-in transformer when ``spec`` is None).

    ``MODULE`` is a dotted module name, importable from the current directory
    (as with ``python -m``), or a path to a ``.py`` file; ``FACTORY`` names a
    callable in it (dotted for nested attributes) returning
    ``(model_or_fn, example_inputs)``.
    """
    if spec is None:
        from .models import TransformerConfig, make_training_step

        obj, inputs = make_training_step()
        return Target(obj, inputs, BUILTIN,
                      f"built-in transformer training step ({TransformerConfig().describe()})")
    factory = _resolve(spec, "target", "FACTORY")
    if not callable(factory):
        raise ExplainError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        made = factory()
    except Exception as e:
        raise ExplainError(f"calling {spec}() raised {type(e).__name__}: {e}") from e
    return Target(*_check_made(made, spec), spec, f"{spec}()")


def _resolve(spec: str, what: str, attr_name: str) -> Any:
    """The object ``MODULE:ATTR`` names (ATTR dotted for nested attributes)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExplainError(f"{what} {spec!r} is not of the form MODULE:{attr_name} "
                           "(e.g. mypkg.models:make)")
    module = _import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_"))
            hint = f"; names there: {', '.join(names[:12])}" if names else ""
            raise ExplainError(f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


def load_policy(spec: str) -> MemoryPolicy:
    """The ``MemoryPolicy`` that ``MODULE:NAME`` names (or a function returning one)."""
    obj = _resolve(spec, "policy", "NAME")
    if not isinstance(obj, MemoryPolicy) and callable(obj):
        try:
            obj = obj()
        except Exception as e:
            raise ExplainError(f"calling {spec}() raised {type(e).__name__}: {e}") from e
    if not isinstance(obj, MemoryPolicy):
        raise ExplainError(f"{spec} is a {type(obj).__name__}, not an aotgrad.MemoryPolicy "
                           "(or a function returning one)")
    return obj


def _import_module(name: str):
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise ExplainError(f"no such file: {name}")
        mod_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(mod_name, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(mod_name, module)  # dataclasses and pickle look modules up
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ExplainError(f"running {name} raised {type(e).__name__}: {e}") from e
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the console script does not
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ExplainError(f"cannot import module {name!r}: {e}. Run from the directory "
                               "that contains it, or install it") from e
        raise ExplainError(f"importing {name!r} failed: {e}") from e
    except Exception as e:
        raise ExplainError(f"importing {name!r} raised {type(e).__name__}: {e}") from e


def _check_made(made: Any, spec: str) -> tuple[Any, tuple]:
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ExplainError(f"{spec}() must return (model_or_fn, example_inputs), "
                           f"got {type(made).__name__}")
    obj, inputs = made
    if not callable(obj):
        raise ExplainError(f"{spec}() returned a {type(obj).__name__} to compile, not a "
                           "module or function")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise ExplainError(f"{spec}() must return example_inputs as a tuple or list of "
                           f"arguments, got {type(inputs).__name__}")
    return obj, tuple(inputs)


def resolve_partitioner(name: str) -> Callable:
    if name == "default":
        return default_partition
    if name == "mincut":
        from .partition import min_cut_rematerialization_partition

        return min_cut_rematerialization_partition
    raise ExplainError(f"unknown partitioner {name!r}; choose one of {', '.join(PARTITIONERS)}")


