"""aotgrad — ahead-of-time autograd for PyTorch.

Note [Calling convention]
-------------------------
Given a function and example inputs, aotgrad traces one functional ATen graph
(the *joint* forward+backward, or an *inference* graph when no gradient is
needed), splits the joint into a forward and a backward graph, hands each to a
compiler, and wraps the results in a runtime that behaves like eager PyTorch.

* graph inputs are the call's tensors, flattened from its pytrees (for modules:
  parameters, then buffers, then user tensors); a tensor passed twice is one
  input; non-tensor leaves are constants baked into the graph (an object of a
  type pytree does not open too: what the program writes into it is replayed
  on each call, Note [Objects passed in], objects.py);
* the forward graph takes the primals ``primals_1 ... primals_N`` and returns
  ``(*mutated_input_values, *user_outputs, *saved_tensors, *saved_symints)``;
* the backward graph takes ``(*saved_symints, *saved_tensors, *tangents)`` —
  tangents are named ``tangents_1 ...``, one per differentiable output, laid
  out as the output is (Note [Tangent strides], tangents.py:
  ``config.guess_tangent_strides_as_outputs``) — and returns one gradient
  (or ``None``) per primal;
* the inference graph takes ``arg0_1 ...`` and returns
  ``(*mutated_input_values, *user_outputs)``;
* compiled graphs are always called *boxed*: with one list they may clear.

The stages, one module each (``partition``: a package): ``flatten`` →
``analyze`` → ``trace`` → ``partition`` → ``compile`` → ``runtime`` (driven by
``pipeline``).
"""

from . import backends, config
from .api import (
    aot_function,
    aot_module,
    aot_module_simplified,
    compiled_function,
    compiled_module,
)
from .cache import AOTAutogradCache, SerializableAOTDispatchCompiler
from .compile import (get_aot_compilation_context, get_aot_graph_name,
                      get_graph_being_compiled, make_boxed_compiler, make_boxed_func, nop)
from .debug_compilers import debug_compile, draw_graph, draw_graph_compile, print_compile
from .compilers import default_decompositions, memory_efficient_fusion, nnc_jit, ts_compile
from .export import aot_export_function, aot_export_joint_simple, aot_export_module
from .export_descriptors import (aot_compile_joint_with_descriptors,
                                 aot_export_joint_with_descriptors)
from .partition import MemoryPolicy, default_partition, min_cut_rematerialization_partition, tag
from .saved_hooks import saved_tensor_hook_context

__all__ = [
    "aot_function", "aot_module", "aot_module_simplified", "compiled_function",
    "compiled_module", "config", "backends", "MemoryPolicy", "tag", "default_partition",
    "get_aot_compilation_context", "get_aot_graph_name", "get_graph_being_compiled",
    "print_compile", "debug_compile", "draw_graph", "draw_graph_compile",
    "make_boxed_compiler", "make_boxed_func", "nop",
    "AOTAutogradCache", "SerializableAOTDispatchCompiler", "aot_export_function",
    "aot_export_joint_simple", "aot_export_module", "aot_export_joint_with_descriptors",
    "aot_compile_joint_with_descriptors", "default_decompositions",
    "memory_efficient_fusion", "saved_tensor_hook_context", "nnc_jit", "ts_compile", "min_cut_rematerialization_partition",
]
