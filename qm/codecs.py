"""Payload and result codecs, the one home of the rules both ends share.

A task type declares one codec: "text" (UTF-8 str), "json" (any JSON value) or "bytes".
The server and the worker decode payloads and encode results with the type's codec; the
client encodes what a caller passes and decodes results with the codec the server names.
"""

from __future__ import annotations

import json
import sys
from typing import Any

CODECS = ("text", "json", "bytes")


def decode_payload(codec: str, payload: bytes) -> Any:
    """Bytes on the wire → a handler's argument; ValueError if they are not valid for the codec."""
    if codec == "bytes":
        return payload
    text = payload.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if codec != "json":
        return text
    try:
        return json.loads(text)
    except RecursionError:  # json's C parser counts nesting against Python's recursion limit
        raise ValueError(f"JSON nested deeper than {sys.getrecursionlimit()} levels") from None


def encode_result(codec: str, value: Any) -> bytes:
    """A handler's return value → bytes on the wire."""
    if codec == "bytes":
        return bytes(value)
    if codec == "json":
        return json.dumps(value).encode()
    return str(value).encode()


def encode_payload(payload: Any) -> bytes:
    """What a caller submits → bytes: str as UTF-8, bytes as they are, anything else as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


def decode_result(codec: str, raw: bytes) -> Any:
    """Result bytes → the caller's value (an empty JSON result is the empty string)."""
    if codec == "bytes":
        return raw
    text = raw.decode("utf-8", errors="replace")
    return json.loads(text) if codec == "json" and text else text
