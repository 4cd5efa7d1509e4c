"""The built-in `python` task type: run a pickled Python callable (what qm.Executor sends).

Trust model, plainly: unpickling runs code. So the type is refused unless the server and
the worker are configured with a shared secret (`executor.secret`, QM_EXECUTOR__SECRET),
and every payload must carry an HMAC-SHA256 of its pickle under that secret: the server
checks it at submit, the worker checks it again before unpickling. Results are signed the
same way and checked by the client before it unpickles them. Whoever holds the secret can
run any code on the workers, as the workers' user: give it only to clients you would give
a shell on those hosts, and run workers with no more rights than the tasks need.

Wire format of a signed blob: b"qm1" + 32-byte HMAC-SHA256(secret, pickle) + pickle.
The secret reaches plugin code through the environment (the qm-server and qm-worker
composition roots export the configured value as QM_EXECUTOR__SECRET).
"""
from __future__ import annotations

import hashlib
import hmac
import os

import cloudpickle

from qm.errors import PermanentError, Retry, SoftTimeout, ValidationError
from qm.registry import TaskType

#: Marks the blob format version.
MAGIC = b"qm1"
DIGEST_BYTES = 32
#: Where the shared secret is read from in the server and worker processes.
SECRET_ENV = "QM_EXECUTOR__SECRET"


class SignatureError(ValidationError):
    """A payload or result is unsigned or signed with another secret."""

    def __init__(self, what: str, message: str):
        super().__init__(what, message)


def sign(secret: str, data: bytes) -> bytes:
    return MAGIC + hmac.new(secret.encode(), data, hashlib.sha256).digest() + data


def verify(secret: str, blob: bytes, what: str = "payload") -> bytes:
    """The signed data, or SignatureError naming what is wrong."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + DIGEST_BYTES:
        raise SignatureError(what, "not a signed qm.Executor blob (unsigned or corrupted)")
    digest, data = blob[len(MAGIC):len(MAGIC) + DIGEST_BYTES], blob[len(MAGIC) + DIGEST_BYTES:]
    expected = hmac.new(secret.encode(), data, hashlib.sha256).digest()
    if not hmac.compare_digest(digest, expected):
        raise SignatureError(what, "signature does not match: signed with another executor.secret?")
    return data


def _secret(side: str) -> str:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise ValidationError("type", f"the python task type is disabled on this {side}: set executor.secret "
                                      f"({SECRET_ENV}) to the same value on servers, workers and clients")
    return secret


def validate(payload: bytes) -> None:
    """Server side: the type is enabled and the payload is signed with our secret."""
    verify(_secret("server"), payload)


def run(payload: bytes) -> bytes:
    """Worker side: verify, unpickle, call; the result (or the exception) goes back signed."""
    try:
        secret = _secret("worker")
        function, args, kwargs = cloudpickle.loads(verify(secret, payload))
    except ValidationError as exc:
        raise PermanentError(str(exc)) from None
    try:
        outcome = ("ok", function(*args, **kwargs))
    except (SoftTimeout, Retry, PermanentError):
        raise  # limits and retries are the queue's business: TIMED_OUT, RETRYING, FAILED
    except Exception as exc:  # the caller's exception travels back to its future
        outcome = ("raised", exc)
    return sign(secret, cloudpickle.dumps(outcome))


#: Registered through the package's entry points like any plugin.
TASK_TYPE = TaskType(name="python", handler=run, codec="bytes", validate=validate,
                     description="Pickled Python callables from qm.Executor (needs executor.secret)")
