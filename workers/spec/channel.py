"""A fast channel for pinned draft calls: a socket straight from the target's process to a draft
replica's, around Ray and Serve's request wrapper for the per-step round trip.

A pinned call through the replica's actor costs Ray's task submission, Serve's request wrapper
and the object store's return path: milliseconds per call, which the lookahead cannot hide when
the draft computes in a millisecond or two. Here a replica listens on its node's IP
(`ChannelServer`: a TCP socket carrying stdlib `multiprocessing.connection` messages, its
challenge with a random authkey, a thread per connection) and answers a pickled request with
the handler's reply; the target keeps, per replica, a few connections (`ReplicaChannels`), one
call in flight on each at a time. Ray Serve keeps everything else: placement, discovery (the
address is asked for once, through the replica's actor), routing of unpinned calls, and failure
handling (a channel call that fails, times out, or finds the socket gone fails like any failed
call: the client re-routes the sequences; the replica's channel is dropped for good and its
later pinned calls take the actor path).

Trust: the Ray cluster is the boundary, as for Ray's own ports; the authkey (HMAC challenge both
ways) makes the socket refuse whoever does not hold it. Pickle travels on it, as on Ray's.

Invariants:
- the server runs the handler for one request at a time per connection, in order; the handler
  itself serialises against the replica's other callers (DraftWorker holds a lock);
- a connection carries one live call at a time; a call abandoned unread (a lookahead whose step
  did not use it) leaves its reply to be skipped by the connection's next call, in order;
- connecting (address, then sockets) happens on a thread of its own: a step never waits on it,
  and uses the actor path until the channel is up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

logger = logging.getLogger(__name__)

Address = tuple[str, int, bytes]  # host, port, authkey


class ChannelServer:
    """Answers requests on a socket: `handler(request)` per request, its return value (or the
    error it raised, as ("error", repr)) sent back. `address` is (host, port, authkey)."""

    def __init__(self, handler: Callable[[Any], Any], host: str = "127.0.0.1"):
        self.handler = handler
        self._authkey = os.urandom(32)
        # The challenge runs on each connection's own thread, so a stranger that connects and says
        # nothing holds up only its own thread, not accept().
        self._sock = socket.create_server((host, 0))
        self.address: Address = (host, self._sock.getsockname()[1], self._authkey)
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.num_refused = 0
        self._thread = threading.Thread(target=self._accept, name="draft-channel-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:  # closed
                return
            conn = _wrap(sock)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="draft-channel", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
            except Exception as exc:  # a wrong key, or a peer that is no client of ours
                self.num_refused += 1
                logger.debug("draft channel: refused a connection: %r", exc)
                return
            while True:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply = ("ok", self.handler(request))
                except Exception as exc:
                    reply = ("error", repr(exc))
                conn.send(reply)
        except (EOFError, OSError):  # the client went away mid-reply
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting and close every connection (their clients' calls fail, and re-route)."""
        with self._lock:
            self._closed = True
            _shut(self._sock.fileno())  # wakes the thread in accept()
            self._sock.close()
            # Wakes their threads in recv(), and their clients see the end. Under the lock: a
            # connection still in the set is not closed yet (its thread closes it after leaving).
            for conn in self._conns:
                _shut(conn.fileno())


class ChannelError(RuntimeError):
    """A channel call that failed: the socket went, the reply was late, or the handler raised."""


class _Link:
    """One connection of a replica's channel: at most one live call; `stale` replies of calls
    abandoned unread come first, and are skipped."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.busy = False
        self.stale = 0


class ChannelCall:
    """A call in flight on one connection (the `PendingCall` of workers/spec/draft_client.py)."""

    direct = True
    channel = True

    def __init__(self, owner: _Channel, link: _Link):
        self._owner, self._link = owner, link
        self._done = False

    def result(self, timeout_s: float | None = None) -> Any:
        if self._done:
            raise ChannelError("the call's reply was read already (or it failed)")
        self._done = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        link = self._link
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not link.conn.poll(left):
                    raise TimeoutError(f"no reply on the draft channel within {timeout_s:.3f} s")
                status, value = link.conn.recv()
                if link.stale:
                    link.stale -= 1
                    continue
                break
        except Exception as exc:
            self._owner.drop(exc)
            raise ChannelError(f"draft channel call failed: {exc!r}") from exc
        self._owner.free(link)
        if status != "ok":
            raise ChannelError(f"the draft replica raised: {value}")
        return value

    def cancel(self) -> None:
        """Give the call up: its reply, when it comes, is skipped by the connection's next call."""
        if not self._done:
            self._done = True
            self._link.stale += 1
            self._owner.free(self._link)

    def __del__(self) -> None:  # a lookahead its step did not read
        if not getattr(self, "_done", True):
            self.cancel()


class _Channel:
    """One replica's connections, once connected; `dropped` once a call on it failed."""

    def __init__(self, replica_id: str, links: list[_Link]):
        self.replica_id = replica_id
        self.links = links
        self.dropped = False
        self._lock = threading.RLock()  # reentrant: a call dropped unread frees its link from __del__

    def call(self, request: Any) -> ChannelCall | None:
        with self._lock:
            if self.dropped:
                return None
            link = next((x for x in self.links if not x.busy), None)
            if link is None:
                return None
            link.busy = True
        try:
            link.conn.send(request)
        except Exception as exc:
            self.drop(exc)
            raise ChannelError(f"draft channel send failed: {exc!r}") from exc
        return ChannelCall(self, link)

    def free(self, link: _Link) -> None:
        with self._lock:
            link.busy = False

    def drop(self, why: BaseException) -> None:
        with self._lock:
            if self.dropped:
                return
            self.dropped = True
        logger.warning("draft channel to %s dropped (its calls take the actor path): %r", self.replica_id, why)
        for link in self.links:
            with contextlib.suppress(OSError):
                link.conn.close()


class ReplicaChannels:
    """The target's channels, by replica id. `call` answers a `ChannelCall`, or None where the
    replica has no channel up (not yet connected, unreachable, dropped, or every connection busy):
    the caller then takes the actor path. The first call for a replica starts connecting it on a
    thread: `fetch_address(replica_id)` (blocking; (host, port, authkey), or None for no channel),
    then `pool_size` connections."""

    def __init__(
        self,
        fetch_address: Callable[[str], Address | None],
        pool_size: int = 2,
        connect_timeout_s: float = 10.0,
    ):
        self.fetch_address = fetch_address
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self._channels: dict[str, _Channel | None] = {}  # None: connecting, or no channel for good
        self._lock = threading.Lock()

    def call(self, replica_id: str, request: Any) -> ChannelCall | None:
        with self._lock:
            if replica_id not in self._channels:
                self._channels[replica_id] = None
                threading.Thread(
                    target=self._connect, args=(replica_id,), name="draft-channel-connect", daemon=True
                ).start()
                return None
            channel = self._channels[replica_id]
        return None if channel is None else channel.call(request)

    def ready(self, replica_id: str) -> bool:
        channel = self._channels.get(replica_id)
        return channel is not None and not channel.dropped

    def _connect(self, replica_id: str) -> None:
        try:
            address = self.fetch_address(replica_id)
            if address is None:
                return
            host, port, authkey = address
            links = [_Link(_connect(host, port, authkey, self.connect_timeout_s)) for _ in range(self.pool_size)]
        except Exception as exc:
            logger.warning("no draft channel to %s (its calls take the actor path): %r", replica_id, exc)
            return
        with self._lock:
            self._channels[replica_id] = _Channel(replica_id, links)
        logger.debug("draft channel to %s up at %s:%d", replica_id, host, port)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            if channel is not None:
                channel.drop(RuntimeError("closed"))


def _wrap(sock: socket.socket) -> Connection:
    """A connected socket as a `Connection`, with Nagle off (a message may take two writes)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(True)
    return Connection(sock.detach())


def _shut(fd: int) -> None:
    """Shut a socket down both ways by its descriptor: a thread blocked on it wakes (close alone
    would not wake it on Linux), and the peer sees the end."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _connect(host: str, port: int, authkey: bytes, timeout_s: float) -> Connection:
    """An authenticated connection, within `timeout_s` (the challenge itself has no timeout: a
    silent peer would hold it forever, so it runs on a thread that is given up on)."""
    result: list = []

    def attempt():
        try:
            conn = _wrap(socket.create_connection((host, port), timeout=timeout_s))
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
            result.append(conn)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not result:
        raise TimeoutError(f"connecting to {host}:{port} took over {timeout_s} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
