"""The built-in `python` task type: run a pickled Python callable (what qm.Executor sends).

Trust model, plainly: unpickling runs code. So the type is refused unless the server and
the worker are configured with a shared secret (`executor.secret` or
`executor.secret_file`, at least 32 characters), and every payload must carry an
HMAC-SHA256 of its pickle under that secret, with a key id, an expiry and a nonce
(qm/security/signing.py): the server checks signature, expiry and nonce at submit (a
captured payload cannot be submitted again), the worker checks the signature again
before unpickling. Results are signed the same way and checked by the client before it
unpickles them. Whoever holds the secret can run any code on the workers, as the
workers' user: give it only to clients you would give a shell on those hosts, and run
workers with no more rights than the tasks need.

The keys reach this module through `configure()`: called by the qm-server and qm-worker
composition roots, and in each worker child with the keys the supervisor hands it on
its start (never through the environment, which task code and its subprocesses see).
"""

from __future__ import annotations

import cloudpickle

from qm.errors import PermanentError, Retry, SoftTimeout, ValidationError
from qm.registry import TaskType
from qm.security.signing import Keyring, ReplayGuard, SignatureError

__all__ = ["SignatureError", "configure", "run", "sign", "validate", "TASK_TYPE"]

#: Seconds a signature is accepted at submit; set by configure() (executor.signature_ttl_s).
_state: dict = {"keys": None, "ttl_s": 300.0, "guard": ReplayGuard()}


def configure(keys: Keyring | None, ttl_s: float = 300.0) -> None:
    """Enable the type with these keys (None disables it)."""
    _state.update(keys=keys, ttl_s=ttl_s, guard=ReplayGuard())


def sign(secret: str, data: bytes, key_id: str = "1", ttl_s: float = 300.0) -> bytes:
    """`data` signed with one secret under `key_id` (what qm.Executor sends)."""
    return Keyring(key_id, {key_id: secret}).sign(data, ttl_s)


def _keys(side: str) -> Keyring:
    keys = _state["keys"]
    if keys is None:
        raise ValidationError(
            "type",
            f"the python task type is disabled on this {side}: set executor.secret "
            "(or executor.secret_file) to the same value on servers, workers and clients",
        )
    return keys


def validate(payload: bytes) -> None:
    """Server side: the type is enabled, the payload signed with a key we hold, not expired,
    and not seen before."""
    signed = _keys("server").verify(payload)
    _state["guard"].check(signed)


def run(payload: bytes) -> bytes:
    """Worker side: verify, unpickle, call; the result (or the exception) goes back signed."""
    try:
        keys = _keys("worker")
        signed = keys.verify(payload, check_expiry=False)
        function, args, kwargs = cloudpickle.loads(signed.data)
    except ValidationError as exc:
        raise PermanentError(str(exc)) from None
    try:
        outcome = ("ok", function(*args, **kwargs))
    except (SoftTimeout, Retry, PermanentError):
        raise  # limits and retries are the queue's business: TIMED_OUT, RETRYING, FAILED
    except Exception as exc:  # the caller's exception travels back to its future
        outcome = ("raised", exc)
    return keys.sign(cloudpickle.dumps(outcome), _state["ttl_s"], signed.key_id)  # the caller holds this key


#: Registered through the package's entry points like any plugin.
TASK_TYPE = TaskType(
    name="python",
    handler=run,
    codec="bytes",
    validate=validate,
    description="Pickled Python callables from qm.Executor (needs executor.secret)",
)
