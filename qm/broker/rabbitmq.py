"""RabbitMQ broker on pika's AsyncioConnection: runs on the caller's asyncio loop.

Connection management
    One connection, one confirm-mode channel for publishing, one channel per consumer
    (so each consumer has its own prefetch). A background task keeps the connection
    up: when it drops, pending confirms fail with BrokerUnavailable, and after an
    exponential backoff (capped by `reconnect_max_delay_s`) it reconnects, replays
    every declaration and re-establishes every consumer.

Several nodes (a RabbitMQ cluster)
    The broker takes a list of AMQP URLs, one per node. It connects to the first node
    that answers, in the given order; when that connection is lost (the node stopped,
    killed, partitioned away) the next attempt goes to the next node in the list, and
    so on around it. Only after every node refused in one round does the keeper back
    off, so failing over to a live node costs one connection set-up, not a delay. What
    lives in the lost connection is rebuilt on the new node exactly as after a one-node
    reconnect: declarations replayed (a quorum queue keeps its messages on the other
    members), consumers re-registered, unconfirmed publishes failed to their callers
    (who publish again), unacked deliveries requeued by RabbitMQ. Every quorum queue
    declared gets `x-quorum-initial-group-size` when one is configured.

Exclusive consumers
    `consume(..., exclusive=True)` passes AMQP's exclusive flag. RabbitMQ answers a
    refused basic.consume by closing that consumer's channel with 403 ACCESS_REFUSED
    ("in exclusive use"); pika then drops the pending ConsumeOk callback and reports the
    close only to the channel's close callback, so that callback fails the waiting
    consume with ConsumerRefused, and only the refused channel is lost. The old
    connection's consumers are gone with it, so a replay after a reconnect is normally
    granted; if it is refused, someone else holds the queue (or the broker has not yet
    seen our old connection end): that is logged as an error and the whole connection
    is retried with the usual backoff, so it recovers once the queue is free.

Declarations, look-ups and deletes go through a separate admin channel: a refusal
(404 NOT_FOUND, 406 PRECONDITION_FAILED for a queue that exists with other arguments)
closes only that channel and raises BrokerRefused, so the caller can decide (e.g. fall
back to a legacy queue's arguments) while publishing and consuming go on.

Publisher confirms are pipelined: each publish registers a future under its sequence
number and returns when the broker acks that number (or a `multiple` ack covering it);
nothing waits for one message before sending the next. After a basic.nack the next publish
goes on a fresh channel (qm/broker/confirms.py says why: a channel can stay refused by a
quorum queue whose leader died), and the refused one is closed once it is answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import ssl
from typing import Any, Callable, Sequence

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import connection_workflow

from qm.broker import pika_writes
from qm.broker.base import EXCHANGE_KINDS, Broker, Delivery, DeliveryCallback
from qm.broker.confirms import ConfirmChannel
from qm.errors import BrokerRefused, BrokerUnavailable, ConsumerRefused, PublishOutcomeUnknown, QueueFull

log = logging.getLogger(__name__)

#: How long one broker round trip (declare, qos, consume) may take before giving up.
RPC_TIMEOUT_S = 10.0
#: First reconnect delay; doubles up to the configured maximum.
RECONNECT_INITIAL_DELAY_S = 0.2
#: AMQP delivery mode for messages that survive a broker restart.
PERSISTENT = pika.DeliveryMode.Persistent
#: How long a declaration refused because its queue's node is still starting is tried again.
NODE_STARTING_WAIT_S = 30.0
#: What RabbitMQ says of a durable queue whose node (or local replica) is not up yet, right
#: after a restart: the declaration is right, the queue just cannot answer yet.
_NODE_STARTING = ("is down or inaccessible", "does not have a replica on the local node")


@dataclasses.dataclass
class _ConsumerSpec:
    tag: str
    queue: str
    callback: DeliveryCallback
    prefetch: int
    arguments: dict[str, Any] | None = None
    exclusive: bool = False
    channel: Any = None
    generation: int = -1
    active: bool = True
    amqp_tag: str = ""
    starting: asyncio.Future | None = None  # the basic.consume awaiting its ConsumeOk
    #: Settlements held while the consumer is swapped for a new prefetch (set_prefetch):
    #: (ack?, delivery tag, multiple/requeue), sent in order once the old one is cancelled.
    held_settles: list[tuple[bool, int, bool]] | None = None
    #: One prefetch change at a time (a second waits, then applies the latest value).
    swapping: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


class RabbitMQBroker(Broker):
    """The production broker; see the module docstring for the connection model."""

    def __init__(
        self,
        urls: str | Sequence[str],
        heartbeat_s: int = 30,
        reconnect_max_delay_s: float = 10.0,
        connection_name: str = "qm",
        quorum_initial_group_size: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`urls`: one AMQP URL, or one per node of a cluster (tried in this order).
        `ssl_context`: for amqps:// nodes, with CA/cert/key from config (qm/security/amqp.py)."""
        pika_writes.join_queued_frames()  # one send per burst of frames (qm/broker/pika_writes.py)
        pika_writes.flush_at_end_of_turn()  # that send at the end of the loop turn, no watcher toggled
        self._nodes = [
            _parameters(url, heartbeat_s, connection_name, ssl_context)
            for url in ([urls] if isinstance(urls, str) else urls)
        ]
        if not self._nodes:
            raise ValueError("RabbitMQBroker needs at least one AMQP URL")
        self._node_index = 0
        self._quorum_initial_group_size = quorum_initial_group_size
        self._reconnect_max_delay_s = reconnect_max_delay_s
        self._declarations: list[tuple[str, tuple]] = []
        self._consumers: dict[str, _ConsumerSpec] = {}
        self._consumer_ids = itertools.count(1)
        self._connection: AsyncioConnection | None = None
        self._publisher: ConfirmChannel | None = None
        self._refused: list[ConfirmChannel] = []  # replaced after a nack, closed once answered
        self._publisher_lock = asyncio.Lock()
        self._admin_channel: Any = None
        self._admin_lock = asyncio.Lock()
        self._admin_refusal: asyncio.Future | None = None
        self._waiters: set[asyncio.Future] = set()
        self._generation = 0
        self._connected = asyncio.Event()
        self._closed: asyncio.Future | None = None
        self._runner: asyncio.Task | None = None
        self._closing = False
        self._last_error = "not connected yet"
        self.connections = 0  # established so far; reconnects = connections - 1

    @property
    def _params(self) -> pika.URLParameters:
        return self._nodes[self._node_index]

    @property
    def _where(self) -> str:
        """host:port of the node in use (or tried next)."""
        return f"{self._params.host}:{self._params.port}"

    @property
    def node(self) -> str:
        """host:port of the node connected to (or tried next)."""
        return self._where

    def _next_node(self) -> None:
        """Move on to the next node in the list (around it)."""
        self._node_index = (self._node_index + 1) % len(self._nodes)

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self, first_attempt_timeout_s: float = 10.0) -> None:
        """Start the connection keeper; wait for the first connection up to the timeout.

        If RabbitMQ is not reachable by then, a warning is logged and the keeper goes on
        retrying in the background; publishes fail with BrokerUnavailable meanwhile.
        """
        if self._runner is None:
            self._runner = asyncio.create_task(self._keep_connected(), name="rabbitmq-keeper")
        if not await self.wait_connected(first_attempt_timeout_s):
            log.warning(
                "RabbitMQ at %s is not reachable yet (%s); retrying in the background", self._where, self._last_error
            )

    async def close(self) -> None:
        self._closing = True
        if self._runner:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            closed = self._closed
            connection.close()
            if closed is not None:
                await asyncio.wait([closed], timeout=RPC_TIMEOUT_S)
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def unavailable(self) -> BrokerUnavailable:
        """The error publishes raise while disconnected, naming the broker and the cause."""
        if len(self._nodes) == 1:
            return BrokerUnavailable(
                f"RabbitMQ at {self._where} is unreachable ({self._last_error}); "
                "check that it is running and that broker.url is right"
            )
        nodes = ", ".join(f"{node.host}:{node.port}" for node in self._nodes)
        return BrokerUnavailable(
            f"RabbitMQ is unreachable on every node ({nodes}; last tried {self._where}: "
            f"{self._last_error}); check that the cluster runs and that broker.urls "
            "is right"
        )

    async def _keep_connected(self) -> None:
        delay_s = RECONNECT_INITIAL_DELAY_S
        failed = 0  # attempts failed since the last connection or backoff
        while not self._closing:
            try:
                await self._open()
            except (
                BrokerUnavailable,
                ConsumerRefused,
                pika.exceptions.AMQPError,
                OSError,
                asyncio.TimeoutError,
            ) as exc:
                self._last_error = _describe(exc)
                self._drop(self._last_error)
                # Another node may answer at once; back off only after a whole round failed
                # (with one node, every attempt is a round).
                tried = self._where
                self._next_node()
                failed += 1
                round_over = failed >= len(self._nodes)
                self._log_failed_attempt(exc, tried, delay_s if round_over else None)
                if round_over:
                    failed = 0
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, self._reconnect_max_delay_s)
                continue
            delay_s, failed = RECONNECT_INITIAL_DELAY_S, 0
            self.connections += 1
            self._connected.set()
            log.info("connected to RabbitMQ at %s", self._where)
            assert self._closed is not None  # set by _open
            reason = await asyncio.shield(self._closed)
            self._last_error = reason
            self._drop(reason)
            if not self._closing:
                lost = self._where
                if len(self._nodes) > 1:
                    self._next_node()  # the lost node is likely down: try the others first
                log.warning("lost connection to RabbitMQ at %s: %s; reconnecting (to %s)", lost, reason, self._where)

    def _log_failed_attempt(self, error: Exception, tried: str, delay_s: float | None) -> None:
        """`delay_s` None: the next node is tried at once."""
        then = f"trying {self._where} next" if delay_s is None else f"retrying in {delay_s:.1f} s"
        if isinstance(error, ConsumerRefused):  # loud: someone else may be doing our job
            log.error(
                "RabbitMQ at %s refused to re-establish the exclusive consumer of queue %s after "
                "a reconnect: another live process consumes it (for a qm-server: another server "
                "with the same server id), or RabbitMQ has not yet noticed that our previous "
                "connection ended; %s",
                tried,
                error.queue,
                then,
            )
        else:
            log.warning("cannot connect to RabbitMQ at %s: %s; %s", tried, self._last_error, then)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        opened = loop.create_future()
        closed = self._closed = loop.create_future()
        self._generation += 1

        def on_open(connection):
            if not opened.done():
                opened.set_result(connection)

        def on_open_error(connection, error):
            if not opened.done():
                opened.set_exception(BrokerUnavailable(_describe(error)))

        def on_close(connection, reason):
            if not closed.done():
                closed.set_result(_describe(reason))
            if not opened.done():
                opened.set_exception(BrokerUnavailable(_describe(reason)))

        self._connection = AsyncioConnection(self._params, on_open, on_open_error, on_close, custom_ioloop=loop)
        await asyncio.wait_for(opened, RPC_TIMEOUT_S)
        self._publisher = await self._open_publisher()
        for kind, args in list(self._declarations):
            try:
                await self._apply_declaration(kind, args)
            except BrokerRefused as exc:
                log.error("RabbitMQ refused to re-declare %s %s after reconnecting: %s", kind, args[0], exc)
        for spec in list(self._consumers.values()):
            if spec.active:
                await self._start_consumer(spec)

    def _drop(self, reason: str) -> None:
        """Forget the lost connection: fail whatever waits on it."""
        self._connected.clear()
        lost = f"connection to RabbitMQ at {self._where} lost ({reason})"
        unknown = PublishOutcomeUnknown(f"{lost} before the message was confirmed")
        for publisher in self._publishers():  # sent, never confirmed: RabbitMQ may hold them
            publisher.fail_all(unknown)
        error = BrokerUnavailable(lost)
        for future in self._waiters:
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        self._publisher = None
        self._refused.clear()
        self._admin_channel = None
        for spec in self._consumers.values():
            spec.channel = None
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            connection.close()

    # -- plumbing --------------------------------------------------------------------

    async def _rpc(self, start: Callable[[Callable], Any], future: asyncio.Future | None = None) -> Any:
        """Run a pika call that reports completion through a callback; await it (or the
        given future, which something else may fail first)."""
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        try:

            def on_reply(frame: Any = None) -> None:
                if not future.done():
                    future.set_result(frame)

            start(on_reply)
            return await asyncio.wait_for(future, RPC_TIMEOUT_S)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(_describe(exc)) from exc
        finally:
            self._waiters.discard(future)

    async def _open_channel(self, consumer: _ConsumerSpec | None = None) -> Any:
        connection = self._connection
        assert connection is not None  # called only once connected (_open, consume)
        channel = await self._rpc(lambda cb: connection.channel(on_open_callback=cb))
        generation = self._generation
        channel.add_on_close_callback(lambda ch, reason: self._on_channel_closed(generation, reason, consumer))
        return channel

    async def _admin(self, call: Callable[[Any, Callable], Any]) -> Any:
        """Run `call(channel, callback)` on the admin channel and await its reply. A broker
        refusal closes only that channel: BrokerRefused, and a fresh channel next time."""
        async with self._admin_lock:
            if self._connection is None or not self._connection.is_open:
                raise self.unavailable()  # (not `connected`: declarations replay before that is set)
            connection = self._connection
            channel = self._admin_channel
            if channel is None or not channel.is_open:
                channel = await self._rpc(lambda cb: connection.channel(on_open_callback=cb))
                channel.add_on_close_callback(self._on_admin_closed)
                self._admin_channel = channel
            self._admin_refusal = refusal = asyncio.get_running_loop().create_future()
            reply = asyncio.ensure_future(self._rpc(lambda cb: call(channel, cb)))
            await asyncio.wait([reply, refusal], return_when=asyncio.FIRST_COMPLETED)
            if reply.done():
                return reply.result()
            reply.cancel()
            raise refusal.result()

    def _on_admin_closed(self, channel: Any, reason: object) -> None:
        refusal = self._admin_refusal
        if refusal is None or refusal.done():
            return
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            refusal.set_result(BrokerRefused(reason.reply_code, reason.reply_text))
        else:
            refusal.set_result(self.unavailable())

    def _on_channel_closed(self, generation: int, reason: object, consumer: _ConsumerSpec | None) -> None:
        # A channel closed by the broker (e.g. a publish to a missing exchange) takes the whole
        # connection down so the keeper rebuilds a consistent state; our own closes and
        # channels of an earlier connection pass. A refused exclusive consume loses only
        # its own channel: the consume fails with ConsumerRefused.
        if (
            self._closing
            or generation != self._generation
            or not isinstance(reason, pika.exceptions.ChannelClosedByBroker)
        ):
            return  # a lost connection is reported by the connection's own close callback
        starting = consumer.starting if consumer is not None else None
        if (
            consumer is not None
            and reason.reply_code == pika.spec.ACCESS_REFUSED
            and starting is not None
            and not starting.done()
        ):
            starting.set_exception(ConsumerRefused(consumer.queue, reason.reply_text))
            return
        error = BrokerUnavailable(f"RabbitMQ closed a channel: {_describe(reason)}")
        for future in list(self._waiters):
            if not future.done():
                future.set_exception(error)
        for publisher in self._publishers():
            publisher.fail_all(error)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(_describe(reason))

    def _on_confirm(self, publisher: ConfirmChannel, frame: Any) -> None:
        method = frame.method
        refusal = None
        if isinstance(method, pika.spec.Basic.Nack):
            where = self._where

            def refusal() -> Exception:
                return QueueFull(
                    f"RabbitMQ at {where} refused the message (basic.nack): its queue is full "
                    "(broker.max_queue_length), or has no leader for the moment (a cluster node went away); "
                    "retry later"
                )

        publisher.answer(method.delivery_tag, method.multiple, refusal)
        if publisher in self._refused and publisher.settled:
            self._refused.remove(publisher)
            _close_quietly(publisher.channel)

    def _publishers(self) -> list[ConfirmChannel]:
        return [publisher for publisher in [self._publisher, *self._refused] if publisher is not None]

    async def _open_publisher(self) -> ConfirmChannel:
        """A fresh channel in confirm mode."""
        publisher = ConfirmChannel(await self._open_channel())
        await self._rpc(
            lambda cb: publisher.channel.confirm_delivery(lambda frame: self._on_confirm(publisher, frame), callback=cb)
        )
        return publisher

    async def _usable_publisher(self) -> ConfirmChannel:
        """The publishing channel; after a nack on it, a fresh one (opened once, whoever
        publishes first). The refused one is closed once its last publish is answered."""
        publisher = self._publisher
        if not self.connected or publisher is None:
            raise self.unavailable()
        if publisher.usable:
            return publisher
        async with self._publisher_lock:
            publisher, generation = self._publisher, self._generation
            if publisher is None or publisher.usable or not publisher.channel.is_open:
                return self._current_publisher()
            try:
                fresh = await self._open_publisher()
            except asyncio.TimeoutError:
                raise BrokerUnavailable(f"RabbitMQ at {self._where} did not open a fresh publishing channel") from None
            if generation != self._generation or self._publisher is not publisher:
                _close_quietly(fresh.channel)  # a reconnect came in between: it has its own
                return self._current_publisher()
            log.info(
                "RabbitMQ at %s refused a publish (basic.nack); publishing on a fresh channel from now on",
                self._where,
            )
            self._publisher = fresh
            if publisher.settled:
                _close_quietly(publisher.channel)
            else:
                self._refused.append(publisher)
            return fresh

    def _current_publisher(self) -> ConfirmChannel:
        publisher = self._publisher
        if not self.connected or publisher is None or not publisher.channel.is_open:
            raise self.unavailable()
        return publisher

    # -- declarations ----------------------------------------------------------------

    async def declare_exchange(self, name: str, kind: str) -> None:
        if kind not in EXCHANGE_KINDS:
            raise ValueError(f"exchange kind must be one of {EXCHANGE_KINDS}, got {kind!r}")
        await self._declare("exchange", (name, kind))

    async def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        await self._declare("queue", (name, tuple(sorted((arguments or {}).items()))))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        await self._declare("bind", (queue, exchange, routing_key))

    async def _declare(self, kind: str, args: tuple) -> None:
        """Record a declaration (replayed on every reconnect) and apply it if connected.
        A refusal because the queue's node is still starting is tried again, with a growing
        pause, for NODE_STARTING_WAIT_S; any other refusal is raised at once."""
        if (kind, args) in self._declarations:
            return
        waited_s, pause_s = 0.0, RECONNECT_INITIAL_DELAY_S
        while self.connected:
            try:
                await self._apply_declaration(kind, args)
                break
            except BrokerRefused as refused:
                if not _node_starting(refused) or waited_s >= NODE_STARTING_WAIT_S:
                    raise
                log.warning("%s: %s; trying again in %.1f s", self._where, refused.text, pause_s)
                await asyncio.sleep(pause_s)
                waited_s, pause_s = waited_s + pause_s, min(pause_s * 2, 2.0)
        self._declarations.append((kind, args))

    async def _apply_declaration(self, kind: str, args: tuple) -> None:
        if kind == "exchange":
            name, exchange_type = args
            await self._admin(
                lambda channel, cb: channel.exchange_declare(
                    exchange=name, exchange_type=exchange_type, durable=True, callback=cb
                )
            )
        elif kind == "queue":
            name, arguments = args
            declared = self._with_group_size(dict(arguments))
            await self._admin(
                lambda channel, cb: channel.queue_declare(queue=name, durable=True, arguments=declared, callback=cb)
            )
        else:
            queue, exchange, routing_key = args
            await self._admin(
                lambda channel, cb: channel.queue_bind(
                    queue=queue, exchange=exchange, routing_key=routing_key, callback=cb
                )
            )

    def _with_group_size(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """A quorum queue's arguments plus the configured initial group size (members)."""
        if self._quorum_initial_group_size and arguments.get("x-queue-type") == "quorum":
            arguments.setdefault("x-quorum-initial-group-size", self._quorum_initial_group_size)
        return arguments

    async def queue_size(self, queue: str) -> int | None:
        try:
            frame = await self._admin(lambda channel, cb: channel.queue_declare(queue=queue, passive=True, callback=cb))
        except BrokerRefused as exc:
            if exc.code == 404:
                return None
            raise
        return frame.method.message_count

    async def delete_queue(self, queue: str, if_empty: bool = False) -> None:
        self._declarations = [
            (kind, args) for kind, args in self._declarations if not (kind in ("queue", "bind") and args[0] == queue)
        ]
        await self._admin_ignoring_absent(
            lambda channel, cb: channel.queue_delete(queue=queue, if_empty=if_empty, callback=cb)
        )

    async def delete_exchange(self, exchange: str) -> None:
        self._declarations = [
            (kind, args)
            for kind, args in self._declarations
            if not ((kind == "exchange" and args[0] == exchange) or (kind == "bind" and args[1] == exchange))
        ]
        await self._admin_ignoring_absent(lambda channel, cb: channel.exchange_delete(exchange=exchange, callback=cb))

    async def _admin_ignoring_absent(self, call: Callable[[Any, Callable], Any]) -> None:
        try:
            await self._admin(call)
        except BrokerRefused as exc:
            if exc.code != 404:
                raise

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        publisher = await self._usable_publisher()
        properties = pika.BasicProperties(
            delivery_mode=PERSISTENT, headers=headers or {}, content_type="application/x-protobuf"
        )
        try:
            publisher.channel.basic_publish(exchange, routing_key, body, properties)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(f"publish to RabbitMQ failed: {_describe(exc)}") from exc
        await publisher.sent()

    # -- consuming -------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        on_delivery: DeliveryCallback,
        prefetch: int,
        arguments: dict[str, Any] | None = None,
        exclusive: bool = False,
    ) -> str:
        spec = _ConsumerSpec(
            f"qm-consumer-{next(self._consumer_ids)}", queue, on_delivery, prefetch, arguments, exclusive
        )
        self._consumers[spec.tag] = spec
        if self.connected:
            try:
                await self._start_consumer(spec)
            except ConsumerRefused:
                del self._consumers[spec.tag]  # refused for good: never replayed
                raise
            except BrokerUnavailable as lost:  # e.g. a stream replica still starting closed it
                log.warning("consumer on %s starts once RabbitMQ is back: %s", queue, lost)
        return spec.tag

    async def _start_consumer(self, spec: _ConsumerSpec) -> None:
        channel = await self._open_channel(spec)
        await self._rpc(lambda cb: channel.basic_qos(prefetch_count=spec.prefetch, callback=cb))
        # Set before consuming: deliveries can reach the callback (and be acked there)
        # before this coroutine resumes from the ConsumeOk.
        spec.channel, spec.generation = channel, self._generation
        await self._basic_consume(spec)

    async def _basic_consume(self, spec: _ConsumerSpec) -> None:
        """Start an AMQP consumer on the spec's channel, under a fresh AMQP tag.

        Deliveries carry the spec's stable tag, so acks find the channel whichever AMQP
        consumer delivered them.
        """
        channel, generation = spec.channel, spec.generation

        def on_message(_channel, method, properties, body):
            spec.callback(
                Delivery(
                    body, dict(properties.headers or {}), method.redelivered, method.delivery_tag, spec.tag, generation
                )
            )

        spec.amqp_tag = f"{spec.tag}.{next(self._consumer_ids)}"
        spec.starting = asyncio.get_running_loop().create_future()
        try:
            await self._rpc(
                lambda cb: channel.basic_consume(
                    spec.queue,
                    on_message,
                    auto_ack=False,
                    exclusive=spec.exclusive,
                    consumer_tag=spec.amqp_tag,
                    arguments=spec.arguments,
                    callback=cb,
                ),
                spec.starting,
            )
        finally:
            spec.starting = None

    async def set_prefetch(self, consumer_tag: str, prefetch: int) -> None:
        """RabbitMQ applies a per-consumer prefetch to new consumers only: set the new QoS,
        start a new consumer on the same channel, then cancel the old one. An exclusive
        consumer would refuse its own successor, so it is cancelled first instead.

        Acks and nacks of the consumer's deliveries are held until the old consumer is
        cancelled: each would give the old consumer room for one more delivery. One sent
        to it anyway (room an earlier ack gave, a message just published) still reaches
        the callback, see `_cancel_keeping_late_deliveries`; only one the quorum queue
        hands the old consumer while the broker is already cancelling it comes back
        marked redelivered (seen with messages published during the swap). The swap
        takes a few broker round trips; a change asked for meanwhile waits for it, then
        applies its own value."""
        spec = self._consumers.get(consumer_tag)
        if spec is None:
            return
        async with spec.swapping:
            if spec.prefetch == prefetch:
                return
            spec.prefetch = prefetch
            channel = spec.channel
            if not spec.active or channel is None or not channel.is_open:
                return  # applied when the consumer is next started
            spec.held_settles = []
            try:
                await self._swap_consumer(spec, channel, prefetch)
            finally:
                held, spec.held_settles = spec.held_settles, None
                if channel.is_open and spec.channel is channel:  # else the broker requeued them
                    for ack, delivery_tag, flag in held:
                        self._send_settle(channel, ack, delivery_tag, flag)

    async def _swap_consumer(self, spec: _ConsumerSpec, channel: Any, prefetch: int) -> None:
        old_tag = spec.amqp_tag
        await self._rpc(lambda cb: channel.basic_qos(prefetch_count=prefetch, callback=cb))
        if not spec.exclusive:
            await self._basic_consume(spec)
            await self._rpc(lambda cb: _cancel_keeping_late_deliveries(channel, old_tag, cb))
            return
        await self._rpc(lambda cb: _cancel_keeping_late_deliveries(channel, old_tag, cb))
        try:
            await self._basic_consume(spec)
        except ConsumerRefused as exc:
            # Someone took the queue in that gap: reconnect, so the keeper replays the
            # consumer (and says loudly while it is refused).
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(str(exc))

    async def cancel(self, consumer_tag: str) -> None:
        spec = self._consumers.get(consumer_tag)
        if spec is None or not spec.active:
            return
        spec.active = False
        if spec.channel is not None and spec.channel.is_open:
            await self._rpc(lambda cb: spec.channel.basic_cancel(spec.amqp_tag, callback=cb))

    def ack(self, delivery: Delivery, through: bool = False) -> None:
        self._settle(delivery, True, through)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        self._settle(delivery, False, requeue)

    def settleable(self, delivery: Delivery) -> bool:
        return self._live_spec(delivery) is not None

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    def _live_spec(self, delivery: Delivery) -> _ConsumerSpec | None:
        """The delivery's consumer, if the channel it came on is still its open channel."""
        spec = self._consumers.get(delivery.consumer_tag)
        if spec is None or spec.channel is None or spec.generation != delivery.channel_generation:
            return None
        return spec if spec.channel.is_open else None

    def _settle(self, delivery: Delivery, ack: bool, flag: bool) -> None:
        """`flag`: an ack's `multiple`, a nack's `requeue`. On the delivery's own channel
        (one per consumer, so `multiple` covers only this consumer's deliveries), unless
        that channel is gone (the broker requeued it); held during a prefetch swap."""
        spec = self._live_spec(delivery)
        if spec is None:
            return
        if spec.held_settles is not None:
            spec.held_settles.append((ack, delivery.delivery_tag, flag))
            return
        self._send_settle(spec.channel, ack, delivery.delivery_tag, flag)

    @staticmethod
    def _send_settle(channel: Any, ack: bool, delivery_tag: int, flag: bool) -> None:
        if ack:
            channel.basic_ack(delivery_tag, multiple=flag)
        else:
            channel.basic_nack(delivery_tag, requeue=flag)


def _parameters(
    url: str, heartbeat_s: int, connection_name: str, ssl_context: ssl.SSLContext | None = None
) -> pika.URLParameters:
    """Connection parameters of one node: one attempt each (the keeper retries)."""
    params = pika.URLParameters(url)
    if ssl_context is not None and params.ssl_options is not None:  # an amqps:// node
        params.ssl_options = pika.SSLOptions(ssl_context, server_hostname=params.host)
    params.heartbeat = heartbeat_s
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    params.client_properties = {"connection_name": connection_name}
    return params


def _cancel_keeping_late_deliveries(channel: Any, amqp_tag: str, callback: Callable) -> None:
    """`basic_cancel`, but a delivery the broker sent the consumer before it read the
    cancel still reaches the consumer's callback.

    pika rejects (requeue) every delivery to a consumer between its Basic.Cancel and the
    CancelOk, and RabbitMQ puts it back in the queue marked redelivered: a worker would
    run that task alone, as a poison suspect, though it never ran. During a prefetch swap
    the consumer's successor takes over on the same channel (after it, for an exclusive
    consumer), so such a delivery is simply one more to settle on that channel (and goes
    back to the queue with the channel, like any other, if it closes). pika keeps the
    callback until the CancelOk; taking the tag out of its cancelling set (pika 1.x state,
    no public switch) routes these deliveries to it. Without that set this is a plain
    `basic_cancel`.
    """
    channel.basic_cancel(amqp_tag, callback=callback)
    cancelling = getattr(channel, "_cancelled", None)
    if isinstance(cancelling, set):
        cancelling.discard(amqp_tag)


def _close_quietly(channel: Any) -> None:
    """Close a channel we are done with; one already closing or closed is left alone."""
    if channel.is_open:
        try:
            channel.close()
        except pika.exceptions.AMQPError:
            pass  # its connection is going: nothing left to close


def _describe(error: object) -> str:
    """A short human description of a pika error or close reason."""
    if isinstance(error, (BrokerUnavailable, ConsumerRefused)):
        return str(error)
    if isinstance(error, connection_workflow.AMQPConnectionWorkflowFailed) and error.exceptions:
        return _describe(error.exceptions[-1])
    if isinstance(error, connection_workflow.AMQPConnectorPhaseErrorBase) and error.exception is not None:
        return _describe(error.exception)
    if isinstance(error, pika.exceptions.AMQPConnectionError) and error.args:
        first = error.args[0]
        return _describe(first) if isinstance(first, BaseException) else str(first)
    if isinstance(error, (pika.exceptions.ConnectionClosed, pika.exceptions.ChannelClosed)):
        return f"{error.reply_code} {error.reply_text}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, pika.exceptions.StreamLostError):
        return "connection lost"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return str(error)


def _node_starting(refused: BrokerRefused) -> bool:
    """A refusal that only says the queue's node or replica is not up yet (see _NODE_STARTING)."""
    return refused.code in (404, 406) and any(text in refused.text for text in _NODE_STARTING)
