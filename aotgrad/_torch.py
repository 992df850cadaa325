"""The one module of aotgrad that reaches into PyTorch's private internals.

Every import of a private torch module (``torch._subclasses``,
``torch.fx.experimental.proxy_tensor``, ``torch._C._functionalize_*`` ...)
goes through here, so that differences between the torch versions we support
(2.11 to 2.13) live in one place.  The rest of the package imports names from
this module and never from ``torch._*`` directly.

PyTorch's own AOTAutograd (``torch._functorch.aot_autograd`` and friends) is
never imported, here or anywhere else in the package.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.utils._pytree as pytree  # noqa: F401  (re-exported)
from torch._decomp import core_aten_decompositions, get_decompositions  # noqa: F401
from torch._dispatch.python import enable_python_dispatcher  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: F401
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: F401
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: F401
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: F401
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

TORCH_VERSION = torch.__version__

aten = torch.ops.aten

# Types that stand for symbolic sizes (SymInt, SymFloat, SymBool).
sym_types = (torch.SymInt, torch.SymFloat, torch.SymBool)


def detect_fake_mode(values) -> FakeTensorMode | None:
    """The fake mode of the first fake tensor among ``values`` (a flat list)."""
    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    from torch._guards import detect_fake_mode as _detect

    return _detect(values)


def is_wrapper_subclass(t: Any) -> bool:
    """A tensor subclass that flattens into inner tensors (TwoTensor, DTensor ...)."""
    return is_traceable_wrapper_subclass(t) and not isinstance(t, (FakeTensor, FunctionalTensor))


def new_fake_mode(dynamic: bool) -> FakeTensorMode:
    """A fresh fake mode; with ``dynamic`` its sizes are symbolic."""
    if dynamic:
        return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=False,
                              allow_non_fake_inputs=False)
    return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)


def fake_from_real(mode: FakeTensorMode, t: torch.Tensor, static: bool) -> torch.Tensor:
    return mode.from_tensor(t, static_shapes=static)


# ---------------------------------------------------------------- functionalization

def functional_mode() -> FunctionalTensorMode:
    """The functionalization mode used by analysis and tracing.

    Views stay views (``aten.view``, not ``view_copy``), so graphs read like
    the user's program; mutations become their functional variants.
    """
    return FunctionalTensorMode(pre_dispatch=False, export=False, _allow_token_discovery=True)


def to_functional(t: Any) -> Any:
    """Wrap a tensor for functionalization (must run inside functional_mode)."""
    if isinstance(t, torch.Tensor):
        return FunctionalTensor.to_functional(t)
    return t


def from_functional(t: Any) -> Any:
    """Unwrap a functional tensor, applying pending updates first."""
    if isinstance(t, FunctionalTensor):
        torch._sync(t)
        return torch._from_functional_tensor(t.elem)
    return t


def is_functional(t: Any) -> bool:
    return isinstance(t, FunctionalTensor)


def sync(t: FunctionalTensor) -> None:
    torch._sync(t)


def has_data_mutation(t: FunctionalTensor) -> bool:
    torch._sync(t)
    return torch._functionalize_has_data_mutation(t.elem)


def has_metadata_mutation(t: FunctionalTensor) -> bool:
    return torch._functionalize_has_metadata_mutation(t.elem)


def was_storage_changed(t: FunctionalTensor) -> bool:
    return torch._functionalize_was_storage_changed(t.elem)


def mutations_hidden_from_autograd(t: FunctionalTensor) -> bool:
    return torch._functionalize_are_all_mutations_hidden_from_autograd(t.elem)


def mutations_under_no_grad(t: FunctionalTensor) -> bool:
    return torch._functionalize_are_all_mutations_under_no_grad_or_inference_mode(t.elem)


def storage_of(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


@contextlib.contextmanager
def tracing_context(fake_mode: FakeTensorMode):
    """Enter fake mode and the Python dispatcher (for symbolic decompositions)."""
    with fake_mode, enable_python_dispatcher():
        yield


def is_sym_node(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), sym_types)


# ---------------------------------------------------------------- inductor / dynamo

def inductor_compile(gm: torch.fx.GraphModule, example_inputs, *, is_backward: bool = False):
    """Compile an ATen graph with inductor's graph compiler (not its AOT path)."""
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs, is_backward=is_backward)


def dynamo_fake_mode(example_inputs) -> FakeTensorMode | None:
    """The fake mode dynamo traced with, if it handed us fake tensors."""
    return detect_fake_mode(list(example_inputs))
