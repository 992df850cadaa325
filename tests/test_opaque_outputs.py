"""Outputs of types pytree does not know, holding tensors (issue 17):
Note [Opened output objects] (aotgrad/opened.py).  Every test compares with
eager: values, gradients, a new object per call, real tensors inside."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from aotgrad import aot_function, aot_module, nop
from helpers import tiny_llama


@dataclasses.dataclass
class Pair:                      # an unregistered dataclass
    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0


class Plain:                     # a plain class
    def __init__(self, **state):
        self.__dict__.update(state)


class Slotted:
    __slots__ = ("t", "__n", "unset")

    def __init__(self, t, n):
        self.t = t
        self.__n = n

    @property
    def n(self):
        return self.__n


class Layer:                     # the shape of transformers' DynamicLayer
    def __init__(self):
        self.keys = self.values = None
        self.is_initialized = False

    def update(self, k, v):
        if not self.is_initialized:
            self.keys, self.values = k[:, :0], v[:, :0]
            self.device, self.is_initialized = k.device, True
        self.keys = torch.cat([self.keys, k], dim=1)
        self.values = torch.cat([self.values, v], dim=1)


class Cache:                     # ... and DynamicCache
    def __init__(self, n):
        self.layers = [Layer() for _ in range(n)]
        self.layer_class = Layer
        self.offloading = False


class Config:                    # a config: exists before the call, holds no tensor
    def __init__(self):
        self.hidden = 4
        self.names = ["a", "b"]


def _tensors(obj, seen=None):
    """Every tensor inside ``obj`` (by attribute, item), in a fixed order."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif isinstance(obj, (type, torch.nn.Module)):
        items = []
    else:
        slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())]
        items = list(getattr(obj, "__dict__", {}).values()) + \
            [getattr(obj, s) for s in slots if hasattr(obj, s)]
    return [t for o in items for t in _tensors(o, seen)]


def _compare(f, make_inputs, compiled=None, *, check_grads=True):
    """Runs ``f`` eagerly and compiled (twice); compares values, types, grads."""
    compiled = compiled or aot_function(f, nop)
    results = []
    for fn in (f, compiled):
        args = make_inputs()
        out = fn(*args)
        ts = _tensors(out)
        loss = sum((t * (k + 1)).sum() for k, t in enumerate(ts) if t.requires_grad)
        if check_grads:
            loss.backward()
        results.append((out, ts, [a.grad for a in args if isinstance(a, torch.Tensor)]))
    (eo, ets, egs), (co, cts, cgs) = results
    assert type(co) is type(eo)
    assert len(cts) == len(ets) > 0
    for c, e in zip(cts, ets):
        assert type(c) is torch.Tensor  # no FakeTensor / FunctionalTensor
        torch.testing.assert_close(c, e)
        assert c.requires_grad == e.requires_grad
    if check_grads:
        for c, e in zip(cgs, egs):
            torch.testing.assert_close(c, e)
    again = compiled(*make_inputs())
    assert again is not co
    return eo, co, again


def _x():
    return (torch.arange(1.0, 7.0).reshape(2, 3).clone().requires_grad_(),)


def test_dataclass():
    eo, co, again = _compare(lambda x: Pair(x * 2, x.sin(), scale=0.5), _x)
    assert co.scale == 0.5 and again.a is not co.a
    assert dataclasses.is_dataclass(co)


def test_plain_object_and_slots():
    def f(x):
        return Plain(t=x.cos(), s=Slotted(x * 3, n=7), tag="plain", d={"k": x.exp()})

    eo, co, again = _compare(f, _x)
    assert co.tag == "plain" and co.s.n == 7 and not hasattr(co.s, "unset")
    assert co.d is not again.d and co.s is not again.s
    torch.testing.assert_close(co.s.t, eo.s.t)


def test_nested_like_a_dynamic_cache():
    def f(x):
        cache = Cache(2)
        h = x
        for layer in cache.layers:
            h = h.sin()
            layer.update(h * 2, h * 3)
        return {"logits": h.sum(-1), "cache": cache}

    eo, co, again = _compare(f, _x)
    c, c2 = co["cache"], again["cache"]
    assert c.layer_class is Layer and c.offloading is False
    assert c is not c2 and c.layers is not c2.layers and c.layers[0] is not c2.layers[0]
    assert all(layer.is_initialized and layer.device == torch.device("cpu")
               for layer in c.layers)


def test_sharing_and_cycles_are_kept():
    def f(x):
        t = x * 2
        a = Plain(t=t)
        a.me = a
        a.same = t
        return a, [a, t]

    compiled = aot_function(f, nop)
    a, (a2, t) = compiled(*_x())
    assert a.me is a and a2 is a and a.t is a.same is t
    assert type(t) is torch.Tensor


def test_an_alias_of_an_input():
    def f(x):
        return Plain(view=x[0], same=x, fresh=x + 1)

    compiled = aot_function(f, nop)
    x = _x()[0]
    got, want = compiled(x), f(x)
    assert got.same is x
    assert got.view._base is x and want.view._base is x
    torch.testing.assert_close(got.view, want.view)
    (got.view * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[2.0] * 3, [0.0] * 3]))


def test_a_mutated_input():
    def f(x, buf):
        buf.add_(1)
        return Plain(buf=buf, out=x * buf)

    make = lambda: (_x()[0], torch.ones(2, 3))  # noqa: E731
    compiled = aot_function(f, nop)
    (x, buf), (x2, buf2) = make(), make()
    got, want = compiled(x, buf), f(x2, buf2)
    assert got.buf is buf
    torch.testing.assert_close(buf, buf2)
    torch.testing.assert_close(got.out, want.out)


def test_dynamic_shapes_with_a_symint_attribute():
    def f(x):
        return Plain(n=x.shape[0], shape=x.shape, t=x * x.shape[0])

    compiled = aot_function(f, nop, dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 2, requires_grad=True)
        got, want = compiled(x), f(x)
        assert type(got.n) is int and got.n == n and got.shape == (n, 2)
        assert type(got.shape) is torch.Size
        assert type(got.t) is torch.Tensor
        torch.testing.assert_close(got.t, want.t)
        got.t.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((n, 2), float(n)))


def test_objects_holding_no_tensor():
    config = Config()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.config = config

        def forward(self, x):
            # made by the program, no tensor: a new one per call, as in eager
            return self.lin(x), Plain(config=self.config, seen=[1], mod=self.lin)

    m = M()
    compiled = aot_module(m, nop)
    x = torch.randn(2, 3)
    (y1, o1), (y2, o2) = compiled(x), compiled(x)
    assert o1 is not o2 and o1.seen is not o2.seen
    assert o1.config is config and o1.mod is m.lin  # shared ones stay themselves
    torch.testing.assert_close(y1, m(x)[0])


class _Dict(dict):
    pass


@pytest.mark.parametrize("make, where", [
    (lambda t: Plain(p=functools.partial(torch.add, t)), "Plain.p (functools.partial)"),
    (lambda t: Plain(d=_Dict(t=t)), "Plain.d"),
    (lambda t: Plain(g=(u for u in [t])), "Plain.g (builtins.generator)"),
    (lambda t: Plain(f=lambda: t), "a function that captures tensors"),
])
def test_what_cannot_be_opened_raises(make, where):
    with pytest.raises(RuntimeError, match="in output, which is not a known type") as info:
        aot_function(lambda x: make(x * 2), nop)(torch.randn(3, requires_grad=True))
    assert where in str(info.value)


def test_a_module_made_by_the_program_raises():
    def f(x):
        lin = torch.nn.Linear(3, 3)
        return Plain(y=lin(x), lin=lin)

    with pytest.raises(RuntimeError, match="Plain.lin .*the program made this module"):
        aot_function(f, nop)(torch.randn(2, 3, requires_grad=True))


def test_a_shared_object_holding_tensors_raises():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.holder = Plain()

        def forward(self, x):
            self.holder.t = self.lin(x)
            return self.holder

    with pytest.raises(RuntimeError, match="also referred to from outside the output"):
        aot_module(M(), nop)(torch.randn(2, 3))


def test_transformers_cache():
    pytest.importorskip("transformers", reason="transformers is not installed")
    model, ids, compiled = tiny_llama()

    def run(fn):
        model.zero_grad()
        out = fn(input_ids=ids, labels=ids, use_cache=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = run(model), run(compiled)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    cache, want_cache = got["cache"], want["cache"]
    assert type(cache) is type(want_cache) and len(cache.layers) == len(want_cache.layers) == 2
    for layer, want_layer in zip(cache.layers, want_cache.layers):
        for t, w in ((layer.keys, want_layer.keys), (layer.values, want_layer.values)):
            assert type(t) is torch.Tensor
            torch.testing.assert_close(t, w)
    assert cache.get_seq_length() == want_cache.get_seq_length() == 8
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g)
    again = compiled(input_ids=ids, labels=ids, use_cache=True)["cache"]
    assert again is not cache and again.layers[0] is not cache.layers[0]
