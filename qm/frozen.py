"""`evolve` and `from_values`: dataclasses.replace and construction for the frozen records on
the event path, without __init__.

`dataclasses.replace` passes every field through the class's generated __init__ (for a
frozen class, one `object.__setattr__` per field): 9 us for a TaskRecord's 31 fields on
the reference box, and the store's fold of one task's outcome makes three or four. A
copy of the instance's fields with the changes applied gives an equal object in 1.3 us;
a record read from a store row is built the same way (`from_values`: 1.8 us, was 5.3).
Only for frozen dataclasses without `__post_init__`, `slots` or init-only fields; a name
that is not a field is a TypeError, as with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

_FIELDS: dict[type, frozenset[str]] = {}
_ORDER: dict[type, tuple[str, ...]] = {}


def evolve(instance: T, **changes: Any) -> T:
    """A copy of `instance` with `changes` (field name → value) applied."""
    cls = type(instance)
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = _evolvable_fields(cls)
    if not fields.issuperset(changes):
        unknown = sorted(set(changes) - fields)
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
    copy = object.__new__(cls)
    state = copy.__dict__
    state.update(instance.__dict__)
    state.update(changes)
    return copy


def from_values(cls: type[T], values: Sequence[Any]) -> T:
    """An instance of `cls` from the values of all its fields, in declaration order."""
    names = _ORDER.get(cls)
    if names is None:
        names = _ORDER[cls] = tuple(sorted(_evolvable_fields(cls), key=_declared_order(cls).index))
    if len(values) != len(names):
        raise TypeError(f"{cls.__name__} has {len(names)} fields, got {len(values)} values")
    instance = object.__new__(cls)
    instance.__dict__.update(zip(names, values, strict=True))
    return instance


def _declared_order(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def _evolvable_fields(cls: type) -> frozenset[str]:
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__slots__") or hasattr(cls, "__post_init__"):
        raise TypeError(f"evolve() needs a dataclass without slots or __post_init__, not {cls.__name__}")
    return frozenset(field.name for field in dataclasses.fields(cls))
