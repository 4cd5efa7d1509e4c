"""A TCP proxy in front of RabbitMQ that can hold back what a client sends.

    proxy = HoldingProxy(rabbitmq.amqp_port)      # amqp://guest:guest@127.0.0.1:{proxy.port}/%2F
    proxy.hold()      # bytes the connections open now send are kept back, not forwarded
    proxy.drop()      # those connections end; what was held back never reaches RabbitMQ

It makes one moment reproducible: a process has written a publish to its socket and is
waiting for the confirm, and dies before the broker saw the message.
"""
from __future__ import annotations

import socket
import threading


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.held = False
        self.held_bytes = 0
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class HoldingProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client, False), daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket, outbound: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with link.lock:
                    if outbound and link.held:
                        link.held_bytes += len(data)
                        continue
                target.sendall(data)
        except OSError:
            pass
        link.close()

    def hold(self) -> None:
        """From now on, keep back what the currently open connections send to RabbitMQ."""
        with self._lock:
            for link in self._links:
                with link.lock:
                    link.held = True

    def held_bytes(self) -> int:
        with self._lock:
            return sum(link.held_bytes for link in self._links)

    def drop(self) -> None:
        """End the held connections; what they sent since hold() is discarded."""
        with self._lock:
            links = [link for link in self._links if link.held]
            self._links = [link for link in self._links if not link.held]
        for link in links:
            link.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
