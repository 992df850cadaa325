"""The raw state of Python objects: what a list, a dict, a set, a deque or an
object of a class defined in Python holds (its items, ``__dict__`` and
slots), read and set without running the class's own code (no properties,
``__getattr__`` or ``__setstate__``).  Used by the opened outputs (opened.py)
and the objects passed in (objects.py, Note [Objects passed in])."""

from __future__ import annotations

import collections
import functools
import types
from typing import Any


class _Missing:
    def __repr__(self) -> str:
        return "<unset>"


MISSING = _Missing()   # an unset slot, in a state


def get_state(x: Any) -> tuple | None:
    """The raw state of a mutable object as parts ``(tag, list)``: "items"
    (a list, a deque), "map" (a dict's items), "set", "attrs" (``__dict__``
    items), "slots" (``(descriptor, value or MISSING)``); None for an object
    whose state cannot be read (a C object)."""
    parts = []
    if isinstance(x, list):
        parts.append(("items", list.copy(x)))
    elif isinstance(x, collections.deque):
        parts.append(("items", list(x)))
    elif isinstance(x, dict):
        parts.append(("map", list(dict.items(x))))
    elif isinstance(x, set):
        parts.append(("set", list(set.__iter__(x))))
    d = instance_dict(x)
    if d is not None:
        parts.append(("attrs", list(d.items())))
    descs = slot_descriptors(type(x))
    if descs:
        parts.append(("slots", [(desc, _slot_value(desc, x)) for desc in descs]))
    return tuple(parts) if parts else None


def _slot_value(desc: Any, x: Any) -> Any:
    try:
        return desc.__get__(x, type(x))
    except AttributeError:
        return MISSING


def set_state(x: Any, parts: list | tuple) -> None:
    """Give ``x`` the state ``parts`` (``get_state``'s form)."""
    for tag, data in parts:
        if tag == "items":
            if isinstance(x, list):
                list.__setitem__(x, slice(None), data)
            else:
                x.clear()
                x.extend(data)
        elif tag == "map":
            dict.clear(x)
            dict.update(x, data)
        elif tag == "set":
            set.clear(x)
            set.update(x, data)
        elif tag == "attrs":
            d = object.__getattribute__(x, "__dict__")
            d.clear()
            d.update(data)
        else:
            for desc, v in data:
                if v is not MISSING:
                    desc.__set__(x, v)
                elif _slot_value(desc, x) is not MISSING:
                    desc.__delete__(x)


def same_state(a: tuple | None, b: tuple | None) -> bool:
    """Whether two states of one object hold the same objects."""
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for (tag, x), (tag2, y) in zip(a, b):
        if tag != tag2 or len(x) != len(y):
            return False
        if tag == "set":
            if {id(v) for v in x} != {id(v) for v in y}:
                return False
        elif tag == "items":
            if any(u is not v for u, v in zip(x, y)):
                return False
        elif any(k is not k2 and not (type(k) is str and k == k2) or v is not v2
                 for (k, v), (k2, v2) in zip(x, y)):
            return False
    return True


def instance_dict(x: Any) -> dict | None:
    try:
        d = object.__getattribute__(x, "__dict__")
    except (AttributeError, TypeError):
        return None
    return d if type(d) is dict else None


@functools.lru_cache(maxsize=512)
def slot_descriptors(cls: type) -> tuple:
    out = []
    for c in cls.__mro__:
        names = c.__dict__.get("__slots__", ())
        for name in (names,) if isinstance(names, str) else names:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{c.__name__.lstrip('_')}{name}"
            desc = c.__dict__.get(name)
            if isinstance(desc, types.MemberDescriptorType):
                out.append(desc)
    return tuple(out)
