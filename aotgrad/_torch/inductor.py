"""torch's inductor, as aotgrad's backends use it (part of ``_torch``: torch's
private modules are reached from this package only)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._guards import detect_fake_mode


def inductor_compile(gm: torch.fx.GraphModule, example_inputs, *, is_backward: bool = False,
                     is_inference: bool = False, config_patches: dict | None = None,
                     device_index: Any = None):
    """Compile one of aotgrad's ATen graphs with ``compile_fx_inner`` (never
    ``compile_fx``: it runs torch's AOTAutograd), set up as ``compile_fx`` would:
    the example inputs' fake mode as ``V.fake_mode`` and in a ``TracingContext``,
    the Python dispatcher, compiled autograd off.  Inductor gets a copy of ``gm``
    (it rewrites in place); tensor outputs keep their traced strides.
    ``config_patches`` hold while it compiles; ``device_index``: the
    ``BoxedDeviceIndex`` a forward and its backward share.  Returns inductor's
    ``OutputCode``, called boxed (``_boxed_call``)."""
    from torch._dynamo import compiled_autograd
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.virtualized import V

    donated = gm.meta.get(DONATED_INPUTS_META) if is_backward else None
    gm = _copy_graph_module(gm)
    if is_inference:  # Note [Inductor's graph passes] (backends.py)
        gm = inductor_joint_passes(gm)
    output = next(iter(reversed(gm.graph.nodes)))
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        outs = (outs,)
        output.args = (outs,)
        gm.recompile()
    output.meta["user_visible_output_idxs"] = [
        i for i, n in enumerate(outs)
        if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]

    example_inputs = list(example_inputs)
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    context = TracingContext.try_get()
    if context is not None and context.fake_mode is fake_mode:
        in_context = contextlib.nullcontext()  # dynamo's own context: keep it as is
    else:
        in_context = tracing(TracingContext(fake_mode))
    from torch._inductor import config
    from torch._inductor.utils import BoxedBool

    with V.set_fake_mode(fake_mode), in_context, enable_python_dispatcher(), \
            compiled_autograd._disable(), config.patch(config_patches or {}), \
            _donation_in_cache_key(donated, is_backward):
        context = TracingContext.get()
        before = context.fw_metadata
        if donated is not None:  # Note [Donated buffers] (compile.py): what inductor reads
            context.fw_metadata = donated
        try:  # CUDA graphs (mode="reduce-overhead"): no input is assumed to keep its address
            out = compile_fx_inner(gm, example_inputs, is_backward=is_backward,
                                   is_inference=is_inference,
                                   cudagraphs=BoxedBool(config.triton.cudagraphs),
                                   static_input_idxs=[], boxed_forward_device_index=device_index)
        finally:
            context.fw_metadata = before
        out.donates_inputs = donated is not None
        return out


DONATED_INPUTS_META = "aotgrad_donated_inputs"


@contextlib.contextmanager
def _donation_in_cache_key(donated: Any, is_backward: bool):
    """Note [Donated buffers] (compile.py): a backward compiled to overwrite
    its saved buffers and the one compiled later for ``retain_graph`` are
    the same graph, and inductor's FX graph cache key does not hold which
    inputs it may overwrite: the second compile got the first's code back
    (the second retained backward read an overwritten buffer).  Every
    backward's key is tagged with the indices it may overwrite (none: [])
    (torch.compiler.config.cache_key_tag), so neither meets the other's
    entry, nor one stored untagged by an earlier aotgrad."""
    if not is_backward:
        yield
        return
    import torch.compiler.config as compiler_config
    tag = getattr(compiler_config, "cache_key_tag", None)
    if tag is None:   # no tag to key on: the backward is not cached
        from torch._inductor import config
        with config.patch(fx_graph_cache=False):
            yield
        return
    indices = list(donated.bw_donated_idxs) if donated is not None else []
    with compiler_config.patch(cache_key_tag=f"{tag}|aotgrad-donated{indices}"):
        yield


def inductor_mode_options(mode: str | None, options: dict | None) -> tuple[dict, Any]:
    """Inductor's settings for ``torch.compile(mode=, options=)`` (torch's errors
    for unknown ones; freezing off, with a warning), and a ``BoxedDeviceIndex``."""
    from torch._inductor import config, list_mode_options
    from torch._inductor.cudagraph_utils import BoxedDeviceIndex

    patches = dict(list_mode_options(mode or "default"))
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in config._config:   # the error torch.compile gives
            raise RuntimeError(f"Unexpected optimization option {key}, known options are "
                               f"{sorted(config.get_config_copy())}")
        patches[name] = value
    if patches.get("freezing", config.freezing):  # torch's freeze() needs its AOTAutograd
        warnings.warn("aotgrad.backends.inductor does not freeze parameters (inductor's "
                      "freezing pass needs torch's AOTAutograd); they stay graph inputs")
        patches["freezing"] = False
    return patches, BoxedDeviceIndex(None)


def inductor_pre_grad_passes(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """inductor's passes over a torch-level (dynamo) graph, as ``compile_fx`` runs them."""
    from torch._inductor.compile_fx import _recursive_pre_grad_passes
    return _recursive_pre_grad_passes(gm, example_inputs)


def inductor_joint_passes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """inductor's joint-graph passes over an ATen graph: Note [Inductor's graph passes];
    the Python floats in it made tensors first (``tensorify_python_scalars``)."""
    from torch._inductor.compile_fx import _recursive_joint_graph_passes
    from torch._inductor.virtualized import V
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    devices = [v.device for v in vals if isinstance(v, torch.Tensor)]
    kwargs = {"input_device": next((d for d in devices if d.type != "cpu"), None)} \
        if "input_device" in inspect.signature(_recursive_joint_graph_passes).parameters else {}
    fake_mode = detect_fake_mode(vals)
    tensorify_python_scalars(gm, fake_mode)
    with V.set_fake_mode(fake_mode or FakeTensorMode(allow_non_fake_inputs=True)):
        return _recursive_joint_graph_passes(gm, **kwargs)


def tensorify_python_scalars(gm: torch.fx.GraphModule, fake_mode: Any) -> None:
    """Note [Python floats for inductor]: the ``.item()`` of each float
    scalar input of ``gm`` and the arithmetic on its symbol rewritten as
    tensor ops, in place, as torch's AOTAutograd does before inductor sees a
    graph.  Under ``torch.compile(dynamic=True)`` dynamo passes a Python
    float as a 0-d float64 tensor that the graph reads with
    ``_local_scalar_dense``, whose result is a *backed* symbol (dynamo's
    ``zf0``): inductor lowers ``_local_scalar_dense`` only for results bound
    as unbacked symbols (``KeyError: 'unbacked_bindings'``), and it cannot
    compute with float symbols.  A float the pass cannot turn into tensor
    ops is specialised instead: the pass marks it and raises dynamo's
    ``TensorifyScalarRestartAnalysis``, and dynamo traces the frame again
    with the float a constant.  No-op without a ShapeEnv (static shapes)."""
    if fake_mode is None or fake_mode.shape_env is None:
        return
    try:
        from torch.fx.passes._tensorify_python_scalars import tensorify_python_scalars as run
    except ImportError:  # pragma: no cover (a torch without the pass)
        return
    run(gm, fake_mode.shape_env, fake_mode)
    gm.recompile()


def inductor_decompositions() -> dict:
    """The decomposition table inductor expects its ATen graphs to be traced with."""
    from torch._inductor.decomposition import select_decomp_table
    return select_decomp_table()


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta copied shallowly)."""
    graph = torch.fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)
