"""Higher-order operators under aotgrad's tracing.

``torch.cond``, ``while_loop``, ``map``, ``scan``, ``invoke_subgraph``
(``torch.compiler.nested_compile_region``), ``auto_functionalized`` (a custom
op that mutates an argument), ``flex_attention``, checkpoint regions: their
operands are graphs, their rules (``py_impl``) live in torch, one per
dispatch key and per mode.  Two more take no graphs: ``with_effects``, the
token chain of effectful ops (tokens.py), and ``triton_kernel_wrapper_mutation``,
a user Triton kernel's launch, which torch's rule for functionalization
turns into ``triton_kernel_wrapper_functional`` (the tensors the kernel
writes cloned, then the kernel's results written back as mutations;
``tests/test_triton_kernels.py``).

Note [Higher-order operators]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
aotgrad traces them as torch's own tracer does: the light tracer refuses
them (``record.NeedsMakeFx``; ``with_effects`` excepted, Note [Effect
tokens] in record.py), so a program with one is analyzed, then traced by
make_fx.  Each operator's rule for make_fx's mode traces its bodies into
subgraphs (``true_graph_0``, ``body_graph_0`` ...) and records one node;
its rule for the Autograd key is an ``autograd.Function`` whose backward
traces the bodies' joint with make_fx entered again
(``materialize_as_graph``), which needs make_fx's tracer: never the light
one.  The functionalization rules come from torch's FunctionalTensorMode,
the fake results from the operators' rules for FakeTensorMode.  What aotgrad
adds are the three notes below: each one a way in which its tracing stack
differs from torch's and broke these operators.

Note [Dynamo under aotgrad's modes]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Called outside torch.compile, ``torch.cond`` (``while_loop``, ``map``,
``scan`` ...) compiles a small wrapper of its operator with
``torch.compile(fullgraph=True)`` and calls that: dynamo turns the user's
branch functions into graphs.  Dynamo skips a frame while a dispatch mode is
on the stack that is neither an infra mode (fake, functional, proxy) nor
declares ``ignore_compile_internals``, and marks the frame's code skipped
for good.  Under aotgrad's ``EagerChecks`` (analyze.py) or
``CheckpointRegionMarker`` (partition/marks.py), then:

* the operator ran with the user's own functions, not graphs: a branch that
  returns a bare tensor broke cond's backward (``TypeError: object of type
  'bool' has no len()``, in the joint it builds of the branch);
* every later ``torch.cond`` of the process, eager ones too, ran its wrapper
  uncompiled, and dynamo compiled the operator's dense kernel as a frame of
  its own, which fails (``Unsupported: torch.* op returned non-Tensor ...
  _len_torch_dispatch_stack``).

Both modes only check or mark what passes through them and let the
operators pass, so while torch compiles such a call (``_in_hop_compile``)
they declare ``ignore_compile_internals`` (``transparent_to_hop_compiles``):
dynamo traces the wrapper under them as under torch's tracer, and the
compiled wrapper runs with them on the stack, as the program does.

A function the program compiles itself (``torch.compile`` inside the traced
program) is another matter: compiled under the trace, an inductor kernel
would run on fake tensors (torch's tracer fails so: "Cannot access data
pointer"; the light tracer's fakes have none, and the process crashed).  So
outside a higher-order op's compile the modes stay visible to dynamo, and
so does the light tracer (``_Recorder.is_infra_mode`` is the same switch):
dynamo skips such a function and aotgrad traces through it, into its graph.
(Dynamo then marks that code skipped for good too, as it would under any
user mode: later calls of the function, outside aotgrad, run it uncompiled.)

Note [Layers a failed run leaves]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A graph dynamo made of code that uses ``vmap`` (flex_attention's default
block mask) calls ``_vmap_increment_nesting`` and ``_vmap_decrement_nesting``
as nodes, with no ``try``/``finally`` between them.  A run of it that stops
in between -- and aotgrad stops runs on purpose: the light tracer's refusal,
a mutation it leaves to functionalization (Note [Functional already],
trace.py) -- left a vmap level on functorch's stack, and every later run (the
next attempt, eager's run for its error) ran as under vmap:
``KeyError: TransformType.Vmap`` from flex_attention.  Dynamo restores the
stack's depth around its own compiled frames; aotgrad does so around each
run of the program it traces or runs for eager's error
(``_torch.functorch_layers_restored``, in ``record.record``,
``record.trace_graph``, ``analyze.analyze`` and
``pipeline.raise_eager_error``).

Note [Fake rules that need a ShapeEnv]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``while_loop``'s rule for fake tensors uses its fake mode's ShapeEnv (for
the sizes its body may make from data), and aotgrad's static fake mode has
none (``_torch.new_fake_mode``: torch's static tracing has none either, and
fails the same program with the same ``AttributeError``).  A trace that
fails inside a higher-order operator's fake rule while the fake mode is
aotgrad's own and has no ShapeEnv is run again with a static fake mode that
has one (``needs_shape_env``; ``pipeline.trace_call``).  The sizes stay
static: the graph is the same.
"""

from __future__ import annotations

from typing import Any

from . import _torch


#: Note [Dynamo under aotgrad's modes]: ``ignore_compile_internals`` of aotgrad's
#: modes, ``is_infra_mode`` of the light tracer
transparent_to_hop_compiles = classmethod(lambda cls: _torch.in_hop_compile())


def needs_shape_env(error: BaseException, fake_mode: Any) -> bool:
    """Note [Fake rules that need a ShapeEnv]: whether ``error`` was raised in a
    higher-order operator's fake rule while ``fake_mode`` has no ShapeEnv."""
    if type(fake_mode) is not _torch.FakeTensorMode or fake_mode.shape_env is not None:
        return False
    rules = _torch.fake_rules_of_hops()
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the error and its causes
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in rules:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


# Note [Random numbers in a region's backward]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Under torch.compile a nested_compile_region is an ``invoke_subgraph`` node;
# torch's own autograd rule for it splits the region into a forward and a
# backward subgraph.  In aotgrad's trace a region called twice gets a
# backward subgraph that runs its random ops again (dropout's mask drawn
# anew), so the gradient does not match the forward's numbers -- a silent
# wrong value.  Until the region is partitioned by aotgrad itself, a joint
# whose backward calls a region that draws random numbers is refused.
def refuse_random_region_backward(joint_gm: Any, tangent_side: set) -> None:
    """Note [Random numbers in a region's backward]."""
    import torch

    target = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    if target is None:
        return
    for n in joint_gm.graph.find_nodes(op="call_function", target=target):
        body = n.args[0] if n.args else None
        sub = getattr(joint_gm, body.target, None) if getattr(body, "op", None) == "get_attr" \
            else None
        if n not in tangent_side or sub is None:
            continue
        for m in sub.graph.nodes:
            if isinstance(m.target, torch._ops.OpOverload) and \
                    torch.Tag.nondeterministic_seeded in m.target.tags:
                raise NotImplementedError(
                    f"aotgrad: the backward of a nested_compile_region ({body.target}) draws "
                    f"random numbers again ({m.target}), so its gradient would not match "
                    "the forward's (dropout's mask). Move the random op out of the region, "
                    "or compile with aotgrad.aot_function / aot_module, where the region is "
                    "plain code (Note [Random numbers in a region's backward], hops.py).")
