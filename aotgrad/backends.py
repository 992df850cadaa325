"""Backends for ``torch.compile(fn, backend=...)`` built on aot_module_simplified."""
