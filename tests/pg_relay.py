"""A TCP relay in front of the test PostgreSQL that can stop answering.

:meth:`PgRelay.freeze` stops forwarding bytes either way while every socket stays
open, as a PostgreSQL stopped with SIGSTOP, a frozen VM or a network partition
looks to a client: statements already sent wait for an answer that does not come,
and a new connection is accepted but never greeted. :meth:`PgRelay.thaw` forwards
again, what was held included (a frozen server reads its sockets when it resumes).
:meth:`PgRelay.freeze_at_commit` freezes just before a chosen transaction's
``COMMIT`` reaches the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
from sqlalchemy.engine import make_url

CHUNK = 65536
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@attrs.define(eq=False)
class _Link:
    """One client connection and what the commit trap knows of it."""

    marked: bool = False


@attrs.define(eq=False)
class PgRelay:
    """Relays 127.0.0.1:``port`` to the PostgreSQL of ``upstream`` (a URL)."""

    upstream: str
    port: int = 0
    flowing: anyio.Event = attrs.field(factory=anyio.Event)
    frozen_at: float | None = None
    _trap: bytes | None = None

    @property
    def url(self) -> str:
        """The upstream URL pointed at the relay: TCP, no TLS, 2 s connect timeout (a
        frozen server is never greeted within it; the node's default is longer)."""
        url = make_url(self.upstream)
        query = {k: v for k, v in url.query.items() if k not in ("host", "port")}
        query |= {"sslmode": "disable", "gssencmode": "disable", "connect_timeout": "2"}
        return url.set(host="127.0.0.1", port=self.port, query=query).render_as_string(
            hide_password=False
        )

    async def _connect_upstream(self) -> Stream:
        url = make_url(self.upstream)
        host = url.query.get("host") or url.host or "localhost"
        port = int(url.query.get("port") or url.port or 5432)  # type: ignore[arg-type]
        if isinstance(host, str) and host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(str(host), port)

    def freeze(self) -> None:
        """Stop forwarding; every connection stays open."""
        if self.flowing.is_set():
            self.flowing = anyio.Event()
            self.frozen_at = anyio.current_time()

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._trap = None
        self.frozen_at = None
        self.flowing.set()

    def freeze_at_commit(self, marker: bytes) -> None:
        """Freeze when a connection that has carried ``marker`` (in a statement or its
        parameters) next sends ``COMMIT``, holding that ``COMMIT`` back."""
        self._trap = marker

    def _trips(self, link: _Link, data: bytes) -> bool:
        if self._trap is None:
            return False
        link.marked = link.marked or self._trap in data
        return link.marked and b"COMMIT" in data

    async def _pump(
        self, source: Stream, sink: Stream, link: _Link | None, both: anyio.CancelScope
    ) -> None:
        """Copy ``source`` to ``sink`` while flowing (``link``: client to server); when
        either side ends, end both directions (``both``)."""
        try:
            while True:
                await self.flowing.wait()  # frozen: read nothing, the bytes wait
                data = await source[0].read(CHUNK)
                if not data:
                    return
                if link is not None and self._trips(link, data):
                    self._trap = None
                    self.freeze()
                await self.flowing.wait()  # frozen meanwhile: hold what was read
                sink[1].write(data)
                await sink[1].drain()
        except OSError:
            pass
        finally:
            both.cancel()

    async def _serve(self, client: Stream) -> None:
        try:
            server = await self._connect_upstream()
        except OSError:
            client[1].close()
            return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, _Link(), tg.cancel_scope)
                tg.start_soon(self._pump, server, client, None, tg.cancel_scope)
        finally:
            client[1].close()
            server[1].close()

    @classmethod
    @asynccontextmanager
    async def running(cls, upstream: str) -> AsyncIterator[PgRelay]:
        """A relay to ``upstream``, listening until the block ends (then every
        relayed connection is cut)."""
        relay = cls(upstream)
        relay.flowing.set()
        async with anyio.create_task_group() as tg:

            def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                tg.start_soon(relay._serve, (reader, writer))

            listener = await asyncio.start_server(accepted, "127.0.0.1", 0)
            relay.port = listener.sockets[0].getsockname()[1]
            try:
                yield relay
            finally:
                relay.thaw()
                listener.close()
                tg.cancel_scope.cancel()
