"""Domain errors. Every error a user sees names what happened and what to change."""


class QMError(Exception):
    """Base of every QueueMaster error."""


class ConfigError(QMError):
    """A configuration key has a bad value or is unknown; names the key's path."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"config {path}: {reason}")


class ValidationError(QMError):
    """Bad input to the API; names the field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UnknownTaskType(ValidationError):
    """The task type is not served by any installed plugin."""

    def __init__(self, task_type: str, known: list[str]):
        known_text = ", ".join(sorted(known)) or "none installed"
        super().__init__("type", f"unknown task type {task_type!r} (known: {known_text})")


class PluginError(QMError):
    """A plugin could not be loaded or declares something invalid."""


class BrokerUnavailable(QMError):
    """The message broker cannot be reached or refused the message."""


class BrokerRefused(QMError):
    """The broker refused a declaration or look-up (AMQP 404 NOT_FOUND, 406
    PRECONDITION_FAILED: a queue exists with other arguments); the connection stays up."""

    def __init__(self, code: int, text: str):
        super().__init__(f"RabbitMQ refused: {code} {text}")
        self.code = code
        self.text = text


class ConsumerRefused(QMError):
    """The broker refused a consumer because of exclusive use: the queue has an exclusive
    consumer, or an exclusive one was asked for while the queue had consumers."""

    def __init__(self, queue: str, detail: str = ""):
        self.queue = queue
        self.detail = detail
        why = f" ({detail})" if detail else ""
        super().__init__(f"the broker refused a consumer on queue {queue}: it is in exclusive use{why}")


class ServerIdentityError(QMError):
    """qm-server cannot establish who it is: its data directory or recorded id is unusable."""


class DuplicateServer(ServerIdentityError):
    """Another live qm-server already uses this data directory or this server id."""


class TaskNotFound(QMError):
    """No task with that id is known to this server."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")


class TaskAlreadyFinished(QMError):
    """The task has reached a final state; it cannot be cancelled."""

    def __init__(self, task_id: str, state: str):
        self.task_id = task_id
        self.state = state
        super().__init__(f"task {task_id} already ended {state}; there is nothing to cancel")


class TaskError(QMError):
    """A task ended in a state other than SUCCEEDED (raised by client.result)."""

    def __init__(self, task_id: str, state: str, error: str):
        self.task_id = task_id
        self.state = state
        self.error = error
        super().__init__(f"task {task_id} ended {state}: {error}")


class SoftTimeout(Exception):
    """Raised inside task code at its soft timeout (qm.SoftTimeout), if it has one.

    Catch it to clean up; the hard limit still kills the task at its deadline. Left
    uncaught, the task ends TIMED_OUT.
    """


class Retry(Exception):
    """Raise in task code to ask for another attempt (qm.Retry), after `delay_s` if given.

    It counts against the task's retry budget; once that is spent the task ends FAILED.
    """

    def __init__(self, reason: str = "the task asked to be retried", delay_s: float | None = None):
        self.delay_s = delay_s
        super().__init__(reason)


class PermanentError(Exception):
    """Raise in task code to fail at once, without retrying (qm.PermanentError)."""
