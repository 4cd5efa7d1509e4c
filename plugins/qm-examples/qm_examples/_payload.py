"""Payload checks shared by the example task types.

Validators run in qm-server at submit time, on the payload as the codec decoded it. They
raise ``qm.errors.ValidationError("payload", message)``: the client gets
INVALID_ARGUMENT with the message, and nothing is enqueued. Anything else a validator
raised would be an internal server error, so every check here is explicit.
"""
from __future__ import annotations

from typing import Any, Callable

import qm
from qm.errors import ValidationError


def json_object(payload: Any, example: str, known_keys: tuple[str, ...]) -> dict:
    """The payload as a dict, or a ValidationError saying what shape is expected."""
    if not isinstance(payload, dict):
        raise ValidationError("payload", f"must be a JSON object like {example}, "
                                         f"got {_json_type(payload)}")
    unknown = sorted(set(payload) - set(known_keys))
    if unknown:
        raise ValidationError("payload", f"unknown key(s) {', '.join(map(repr, unknown))}; "
                                         f"expected only {', '.join(map(repr, known_keys))}, like {example}")
    return payload


def integer(obj: dict, key: str, low: int, high: int, *, default: int | None = None) -> int:
    """obj[key] as an int within [low, high] (JSON booleans and floats are refused)."""
    if key not in obj:
        if default is not None:
            return default
        raise ValidationError("payload",
                              f"payload.{key} is missing; give an integer from {low:_} to {high:_}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("payload", f"payload.{key} must be an integer from {low:_} to {high:_}, "
                                         f"got {_json_type(value)} {_short(value)}")
    if not low <= value <= high:
        raise ValidationError("payload",
                              f"payload.{key} must be from {low:_} to {high:_}, got {_short(value)}")
    return value


def checked(validate: Callable[[Any], None], payload: Any) -> None:
    """Re-run the validator inside the handler: the worker does not run validators, and a
    payload that cannot work will not work on a retry either, so fail with PermanentError."""
    try:
        validate(payload)
    except ValidationError as exc:
        raise qm.PermanentError(str(exc)) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number with a fraction", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
