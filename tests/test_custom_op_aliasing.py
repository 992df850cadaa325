"""Note [Custom ops returning aliases] (check.py): config.check_custom_op_aliasing
and config.error_on_custom_op_aliasing, against PyTorch's AOTAutograd."""

import warnings

import pytest
import torch

import aotgrad
from aotgrad import aot_function, nop

_lib = torch.library.Library("aotgrad_test_alias", "DEF")
_lib.define("alias(Tensor x) -> Tensor")
_lib.impl("alias", lambda x: x.view(-1), "CompositeExplicitAutograd")   # breaks its schema
_lib.define("fresh(Tensor x) -> Tensor")
_lib.impl("fresh", lambda x: x.view(-1).clone(), "CompositeExplicitAutograd")
for _name in ("alias", "fresh"):
    torch.library.register_fake(f"aotgrad_test_alias::{_name}", lambda x: x.new_empty(x.numel()))
ALIAS, FRESH = torch.ops.aotgrad_test_alias.alias.default, torch.ops.aotgrad_test_alias.fresh.default


def _warnings(fn, calls=2):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(calls):
            fn(torch.ones(2, 2))
    return [str(w.message) for w in seen if "aotgrad: the custom op" in str(w.message)]


@pytest.mark.parametrize("how", ["aot_function", "torch.compile"])
def test_an_aliasing_custom_op_warns_at_the_first_call(how):
    make = (lambda f: aot_function(f, nop)) if how == "aot_function" else \
        (lambda f: torch.compile(f, backend=aotgrad.backends.aot_eager))
    torch._dynamo.reset()
    with aotgrad.config.patch(error_on_custom_op_aliasing=False):
        seen = _warnings(make(lambda x: ALIAS(x) * 2))
        assert len(seen) == 1 and "aotgrad_test_alias::alias" in seen[0]
        assert _warnings(make(lambda x: FRESH(x) * 2)) == []
        with aotgrad.config.patch(check_custom_op_aliasing=False):
            assert _warnings(make(lambda x: ALIAS(x) * 3)) == []


def test_the_error_form_raises_as_torch_does():
    import functorch.compile as reference
    import torch._functorch.config as reference_config

    f = lambda x: ALIAS(x) + 1   # noqa: E731
    with reference_config.patch(error_on_custom_op_aliasing=True), \
            pytest.raises(RuntimeError, match="alias"):
        reference.aot_function(f, reference.nop)(torch.ones(2, 2))
    with aotgrad.config.patch(error_on_custom_op_aliasing=True), \
            pytest.raises(RuntimeError, match="returned output 0 aliasing one of its inputs"):
        aot_function(f, nop)(torch.ones(2, 2))
    torch.testing.assert_close(aot_function(lambda x: FRESH(x) + 1, nop)(torch.ones(2, 2)),
                               torch.full((4,), 2.0))
