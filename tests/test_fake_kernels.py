"""aotgrad's own fake kernels, for its traces only: Note [Own fake kernels]
(aotgrad/fakes.py).  ``aten._grouped_mm`` on CPU: torch's meta kernel demands
bfloat16 and gives other strides than the CPU kernel; aotgrad's kernel gives
the CPU kernel's result, and leaves the user's own fake tensors alone."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import aotgrad
from aotgrad import _torch, aot_function, aot_module, nop


def _offs(*ends):
    return torch.tensor(ends, dtype=torch.int32)


def _layouts(n=8, dtype=torch.float32):
    """(a, b, offs) for the op's four layouts; ``n``: the output's last dim."""
    cases = [
        (torch.randn(10, 8), torch.randn(3, n, 8).transpose(-2, -1), _offs(3, 7, 10)),  # 2d x 3d
        (torch.randn(12, n).t(), torch.randn(8, 12).t(), _offs(4, 8, 12)),            # 2d x 2d
        (torch.randn(3, 5, 8), torch.randn(3, n, 8).transpose(-2, -1), None),          # 3d x 3d
        (torch.randn(3, 5, 8), torch.randn(4 * n // 2, 8).t(), _offs(n, n + 4, 2 * n)),  # 3d x 2d
    ]
    return [(a.to(dtype), b.to(dtype), o) for a, b, o in cases]


def _grouped(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def _user_fake_outcome():
    """What a fake mode of the user's own gives for a float32 grouped mm."""
    a, b, o = _layouts()[0]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            out = _grouped(mode.from_tensor(a), mode.from_tensor(b), mode.from_tensor(o))
        return ("ok", tuple(out.shape), out.stride())
    except Exception as e:  # noqa: BLE001 (torch's own error: kept as it is)
        return (type(e), str(e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 6])
def test_the_fake_kernel_gives_the_real_kernels_result(dtype, n):
    for a, b, o in _layouts(n, dtype):
        try:
            real = _grouped(a, b, o)
        except RuntimeError as e:
            assert "multiple of 16 bytes" in str(e)  # the CPU kernel's own alignment check
            continue
        mode = _torch.new_fake_mode(False)
        with _torch.tracing_context(mode):
            fake = _grouped(*(None if t is None else mode.from_tensor(t) for t in (a, b, o)))
        assert (fake.shape, fake.stride(), fake.dtype, fake.storage_offset()) == \
            (real.shape, real.stride(), real.dtype, real.storage_offset())
        assert fake.untyped_storage().nbytes() == real.untyped_storage().nbytes()
        assert "dispatch" not in vars(mode)   # the mode is as before once the trace is done


@pytest.mark.parametrize("layout", range(4))
def test_forward_and_backward_vs_eager(layout):
    before = _user_fake_outcome()
    a, b, o = _layouts()[layout]

    def f(a, b, offs):
        return (_grouped(a, b, offs) * 2).sum(-1)

    compiled = aot_function(f, nop)
    results = []
    for fn in (f, compiled):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = fn(a1, b1, o)
        out.sum().backward()
        results.append((out, a1.grad, b1.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert _user_fake_outcome() == before   # the user's fake tensors: torch's kernel still


def test_padded_output_strides_and_dynamic_sizes():
    a, b, o = _layouts(6)[0]
    for compiled in (aot_function(_grouped, nop), aot_function(_grouped, nop, dynamic=True)):
        for m in (10, 14):
            a1 = torch.randn(m, 8, requires_grad=True)
            got, want = compiled(a1, b, _offs(3, 7, m)), _grouped(a1, b, _offs(3, 7, m))
            assert torch.equal(got, want) and got.stride() == want.stride() == (8, 1)


def _moe_step(name, config_cls, model_cls, **kw):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = getattr(transformers, config_cls)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(input_ids=ids, labels=ids)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (want, want_grads), (got, got_grads) = step(model), step(aot_module(model, nop))
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    assert set(got_grads) == set(want_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, msg=lambda m: f"{name}: grad of {n}: {m}")


def test_mixtral_training_step():
    _moe_step("mixtral", "MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
              num_experts_per_tok=2)


def test_qwen2_moe_training_step():
    _moe_step("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=32)


def test_own_kernels_only_while_aotgrad_traces():
    assert torch.ops.aten._grouped_mm.default in aotgrad._torch.FAKE_KERNELS
    mode = FakeTensorMode()
    with _torch.tracing_context(mode):
        assert "dispatch" in vars(mode)
        with _torch.tracing_context(mode):   # nested: one override
            pass
        assert "dispatch" in vars(mode)
    assert "dispatch" not in vars(mode)


def test_a_view_eager_refuses_is_refused():
    # Note [Own fake kernels]: torch's fake rule of view lets (2, 1, 3) with
    # strides (0, 3, 1) become (1, 6) (strides (0, 0)); eager raises
    def refused(a):
        a.reshape(1, 3).expand(2, 1, 3).view(1, 6)
        return (a * 2,)

    def allowed(a):
        return (a.reshape(1, 3).expand(2, 1, 3).view(2, 3) * 2,)

    x = torch.randn(3)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        refused(x)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        aotgrad.aot_function(refused, aotgrad.nop)(x)
    torch.testing.assert_close(aotgrad.aot_function(allowed, aotgrad.nop)(x), allowed(x))
