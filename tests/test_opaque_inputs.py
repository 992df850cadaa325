"""Arguments of types pytree does not know (issue 17): Note [Objects passed in]
(aotgrad/objects.py).  What the program writes into them is replayed on every
call, as eager does it, or refused with the argument's name; the user's
objects never keep a trace's tensors."""

from __future__ import annotations

import collections
import queue

import pytest
import torch

from aotgrad import aot_function, aot_module, nop
from helpers import tiny_llama


class Box:                       # a plain class holding a list
    def __init__(self, items=None):
        self.items = [] if items is None else items


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
        return self.keys, self.values


class Cache:                     # ... and DynamicCache: layers made on first use
    def __init__(self):
        self.layers = []
        self.layer_class = Layer

    def update(self, k, v, idx):
        while len(self.layers) <= idx:
            self.layers.append(self.layer_class())
        return self.layers[idx].update(k, v)


def _fake_free(obj, seen=None):
    """No FakeTensor / FunctionalTensor anywhere inside ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return True
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return type(obj) in (torch.Tensor, torch.nn.Parameter)
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, collections.deque)):
        items = list(obj)
    elif isinstance(obj, (type, torch.nn.Module, str, int, float, bool, type(None), torch.device)):
        items = []
    else:
        items = list(getattr(obj, "__dict__", {}).values())
    return all(_fake_free(o, seen) for o in items)


def _x():
    return torch.arange(1.0, 7.0).reshape(2, 3).requires_grad_()


def test_a_list_the_program_appends_to():
    def f(x, box):
        y = x * 2
        box.items.append(y)
        box.seen = len(box.items)
        return y.sin()

    compiled = aot_function(f, nop)
    results = []
    for fn in (f, compiled):
        x, box = _x(), Box()
        items = box.items
        out = fn(x, box)
        assert box.items is items and len(items) == 1 and box.seen == 1
        (out.sum() + (box.items[0] ** 2).sum()).backward()
        results.append((out, box.items[0], x.grad))
    for got, want in zip(*results):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want)
    assert results[1][1].requires_grad and results[1][1].grad_fn is not None
    # a new empty box: the same compilation, a new tensor in it
    box2 = Box()
    compiled(_x(), box2)
    assert len(compiled._compiled) == 1 and len(box2.items) == 1
    assert box2.items[0] is not results[1][1] and _fake_free(box2)


def _uses_what_it_holds(x, box):
    box.items.append(x * box.items[0])
    return x + 1


def test_a_filled_object_is_refused():
    t = torch.ones(2, 3)
    box = Box([t])
    with pytest.raises(RuntimeError, match=r"the argument args\[1\] \(.*Box\) holds a tensor at "
                                           r"args\[1\]\.items\[0\], and the program computes "
                                           r"with a tensor that is not one of its inputs.*Pass "
                                           r"the tensors as arguments"):
        aot_function(_uses_what_it_holds, nop)(_x(), box)
    assert box.items[0] is t and _fake_free(box)


def test_an_object_holding_tensors_the_program_only_carries():
    mesh = Box([torch.arange(4)])     # a DeviceMesh, say: its tensor is no input

    def f(x, mesh):
        return x * len(mesh.items), mesh

    compiled = aot_function(f, nop)
    out, got = compiled(_x(), mesh)
    assert got is mesh and len(mesh.items) == 1
    torch.testing.assert_close(out, f(_x(), mesh)[0])

    def g(x, box):            # writes next to them, moves them: replayed with the call's own
        box.items.append(x * 2)
        box.first = box.items.pop(0)
        return x + 1

    compiled = aot_function(g, nop)
    for _ in range(2):
        held = torch.ones(1)
        box, want = Box([held]), Box([held])
        x = _x()
        torch.testing.assert_close(compiled(x, box), g(x, want))
        assert box.first is held and len(box.items) == 1 and type(box.items[0]) is torch.Tensor
        torch.testing.assert_close(box.items[0], want.items[0])
    assert len(compiled._compiled) == 1


def test_an_object_filled_by_the_last_call_is_refused():
    def f(x, box):
        box.items.append(x.cos())
        return x * 2

    compiled = aot_function(f, nop)
    box = Box()
    compiled(_x(), box)
    kept = list(box.items)
    compiled(_x(), box)   # the program does not compute with them: eager's two items
    assert len(box.items) == 2 and box.items[0] is kept[0] and _fake_free(box)


def test_layers_made_by_the_program_like_a_dynamic_cache():
    def f(x, cache):
        h = x
        for i in range(2):
            h = h.sin()
            k, v = cache.update(h * 2, h * 3, i)
            h = h + k.sum() + v.mean()
        return {"out": h, "cache": cache}

    compiled = aot_function(f, nop)
    runs = []
    for fn in (f, compiled, compiled):
        x, cache = _x(), Cache()
        layers = cache.layers
        out = fn(x, cache)
        assert out["cache"] is cache and cache.layers is layers and len(layers) == 2
        loss = out["out"].sum() + sum((layer.keys * layer.values).sum() for layer in layers)
        loss.backward()
        runs.append((cache, out["out"], x.grad))
    (ec, eo, eg), (cc, co, cg), (c2, _, _) = runs
    torch.testing.assert_close(co, eo)
    torch.testing.assert_close(cg, eg)
    for got, want in zip(cc.layers, ec.layers):
        assert type(got) is Layer and got.__dict__.keys() == want.__dict__.keys()
        assert got.is_initialized and got.device == torch.device("cpu")
        torch.testing.assert_close(got.keys, want.keys)
        torch.testing.assert_close(got.values, want.values)
        assert type(got.keys) is torch.Tensor and got.keys.requires_grad
    assert c2.layers[0] is not cc.layers[0] and len(compiled._compiled) == 1


def test_state_without_tensors_is_replayed_and_guarded():
    class Counter:
        def __init__(self):
            self.n = 0
            self.log = []

    def f(x, c):
        c.n += 1
        c.log.append(c.n)
        return x * c.n

    compiled = aot_function(f, nop)
    c, e = Counter(), Counter()
    for _ in range(3):
        x = _x()
        torch.testing.assert_close(compiled(x, c), f(x, e))
        assert c.n == e.n and c.log == e.log
    fresh = Counter()
    compiled(_x(), fresh)  # the state of the first call: no new compilation
    assert fresh.n == 1 and len(compiled._compiled) == 3


def test_the_object_returned_is_the_callers():
    def f(x, box):
        box.items.append(x + 1)
        return x * 2, box, box.items

    compiled = aot_function(f, nop)
    for _ in range(2):
        box = Box()
        _, got_box, got_items = compiled(_x(), box)
        assert got_box is box and got_items is box.items and len(box.items) == 1


def test_a_deque_and_an_opaque_object():
    def f(x, box):
        box.items.append(x.exp())
        return x * 2

    compiled = aot_function(f, nop)
    d = collections.deque()
    want = collections.deque()
    x = _x()
    compiled(x, Box(d))
    f(x, Box(want))
    assert len(d) == 1 and type(d[0]) is torch.Tensor
    torch.testing.assert_close(d[0], want[0])

    q = queue.SimpleQueue()   # a C object: its state cannot be read nor restored

    def g(x, box):
        box.items.put(x * 2)
        return x + 1

    with pytest.raises(RuntimeError, match="put a tensor into an object passed in.*SimpleQueue"):
        aot_function(g, nop)(_x(), Box(q))


def _reads_a_value(x, box):
    box.items.append(x * 2)
    if x.sum() > 0:              # data-dependent: the first trace stops here
        return x + 1
    return x - 1


def test_a_trace_that_fails_leaves_the_object_without_trace_tensors():
    box = Box()
    try:
        aot_function(_reads_a_value, nop)(_x(), box)
    except Exception:
        pass
    assert _fake_free(box)


def test_a_trace_that_fails_leaves_the_object_as_it_was():
    box, want = Box(), Box()
    x = _x()
    got = aot_function(_reads_a_value, nop)(x, box)
    torch.testing.assert_close(got, _reads_a_value(x, want))
    assert len(box.items) == len(want.items) == 1
    t = torch.ones(2, 3)
    box = Box([t])
    with pytest.raises(RuntimeError, match="computes with a tensor that is not one of its"):
        aot_function(_uses_what_it_holds, nop)(_x(), box)
    assert box.items == [t]


def test_a_module_writing_into_a_cache_passed_by_keyword():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, cache=None):
            k, v = cache.update(self.lin(x), x * 2, 0)
            return (k * v).sum()

    m = M()
    compiled = aot_module(m, nop)
    got_cache, want_cache = Cache(), Cache()
    x = torch.randn(2, 3)
    torch.testing.assert_close(compiled(x, cache=got_cache), m(x, cache=want_cache))
    torch.testing.assert_close(got_cache.layers[0].keys, want_cache.layers[0].keys)
    with pytest.raises(RuntimeError, match=r"the argument cache \(.*Cache\) holds a tensor at "
                                           r"cache\.layers\[0\]\.keys"):
        compiled(x, cache=got_cache)


def test_transformers_cache_passed_in():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers.cache_utils import DynamicCache

    model, ids, compiled = tiny_llama()

    def run(fn):
        model.zero_grad()
        cache = DynamicCache()
        out = fn(input_ids=ids, labels=ids, cache=cache, use_cache=True)
        out.loss.backward()
        return cache, out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (want_cache, want, want_grads), (cache, got, got_grads) = run(model), run(compiled)
    assert got["cache"] is cache and len(cache.layers) == len(want_cache.layers) == 2
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    for layer, want_layer in zip(cache.layers, want_cache.layers):
        assert type(layer) is type(want_layer)
        assert layer.__dict__.keys() == want_layer.__dict__.keys()
        for t, w in ((layer.keys, want_layer.keys), (layer.values, want_layer.values)):
            assert type(t) is torch.Tensor
            torch.testing.assert_close(t, w)
    assert cache.get_seq_length() == want_cache.get_seq_length() == 8
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g)
    again, _, _ = run(compiled)   # a new empty cache: no new compilation
    assert again.layers[0] is not cache.layers[0] and len(compiled._compiled._compiled) == 1
    # the next generation step gets the filled cache: refused, no trace tensor left in it
    # (the eager run of Note [Eager's error, not the tracer's] still writes into it: see
    # test_a_trace_that_fails_leaves_the_object_as_it_was)
    with pytest.raises(RuntimeError, match=r"the argument cache \(transformers\.cache_utils\."
                                           r"DynamicCache\) holds a tensor at cache\.layers"
                                           r"\[0\]\.keys, and the program computes with"):
        compiled(input_ids=ids[:, :1], cache=again, use_cache=True)
    assert _fake_free(again)
