"""The shared page index: which replica holds which KV pages of which model, in Redis.

Every replica publishes its page pool's KV events here (see `kvstore.publisher`); every router
asks, in one round trip, how many *leading* pages of a prompt each candidate replica holds.
The index is a cache of facts that expire: every entry has a TTL and is refreshed when the page
is stored or reused again; a replica that dies stops refreshing, and its liveness key lets
routers drop it at once.

Schema (`ns` = `IndexConfig.namespace`, `model` = the model id; the braces around the model are
a Redis Cluster hash tag, so all keys of one model live on one slot and one script can read them):

    {ns}:{{model}}:pages:{replica}   ZSET   member = page hash as 16 raw bytes, big-endian
                                            (`member.hex() == hash_to_str(h)`); score = the entry's
                                            expiry, ms since the epoch on the server's clock.
                                            Key TTL: `ttl_s`, renewed by every publish, so the whole
                                            set of a replica that stops publishing disappears.
    {ns}:{{model}}:host:{replica}    ZSET   the same, for the pages in the replica's host-memory tier
                                            (workers/kv_tiers.py); absent without one. Not
                                            prefix-closed (it holds evicted tails): lookups scan it.
    {ns}:{{model}}:live:{replica}    HASH   exactly the eight fields num_waiting, num_running,
                                            num_free_pages, num_total_pages, prefix_cache_queries,
                                            prefix_cache_hits, num_requests_finished,
                                            num_requests_aborted, each a decimal integer of 1 to
                                            18 digits (no sign, no spaces); written whole by the
                                            replica's heartbeat. Key TTL: `heartbeat_ttl_s`.

What the index reads from Redis is untrusted: anyone who can write to the server can leave keys
of any type and content under these names. A `live:` key is a replica only if it is a hash in
exactly the schema above (a forged one with a missing, extra or non-decimal field is not); a
`pages:` key that is not a sorted set holds nothing. Such an entry is skipped, never fatal: it
is counted in `LookupMetrics.malformed` and logged (at most one line a minute), and lookups
and `live_replicas` answer for the valid replicas. The writers repair their own keys: a
heartbeat replaces the whole hash, a publish replaces a `pages:` key of the wrong type.

An entry is live iff its score is greater than now. `stored` and `touched` events ZADD the
hashes with score now + ttl_s (a refresh); `removed` events ZREM them. Expired members are
ignored by lookups and deleted by `trim` (the publisher calls it now and then). Raw 16-byte
members take 88 bytes per (page, replica) entry against 103 for 32-hex-digit strings
(valkey 8.1, libc malloc, 64 replicas x 2,048 pages; `cluster/bench/index.py`), and halve
the bytes a lookup sends.

A lookup is one EVALSHA of a read-only script: for each candidate, its liveness key, then its
leading run, found one of two ways (`IndexConfig.lookup_mode`):

- `exact`: ZMSCORE over the prompt's hashes in order, up to the first missing or expired page.
  One check per (leading page held, candidate), 0.2 to 0.4 us each on the server: 2,048 pages
  x 64 replicas that all hold them cost ~30 ms. Right whatever the index holds.
- `search` (the default): galloping, then bisection. Page 0 alone (a candidate without it costs
  one check), then pages 1, 3, 7, ..., 2^k - 1 and the last in one ZMSCORE, then a binary search
  between the last of those held and the first not held: about 2 log2(pages) checks per
  candidate; ~0.3 ms on the server for 2,048 pages x 64 replicas, whatever they hold.

Search is right only while each replica's entries are *prefix-closed*: if it holds page i of a
prompt's chain, it holds pages 0..i-1 too (all live). Then "page i held" is monotone in i and
bisection finds where it flips. Two things should keep it so:
(a) eviction: every sequence holding a cached page holds its ancestors' pages too (a prefix hit
    acquires the whole leading run; a sequence caches its own pages in order, and `commit` swaps
    a recomputed twin of a cached page for the cached page itself), `PagePool.free` releases a
    page table last page first, and the free queue is LRU, so an ancestor is never less recently
    used than its descendant and `removed` events take a chain from its tail;
(b) expiry: a `touched` event refreshes a prefix hit's whole leading run at once, so a refresh
    never leaves a descendant outliving its ancestors.
(b) has an exception today (pinned by a test in tests/kvstore/test_index.py): a `stored` event
    refreshes only the new pages: the scheduler caches pages as chunked prefill and decode fill
    them, so a page stored at t2 has ancestors last refreshed at t1 < t2, and they expire up to
    t2 - t1 sooner. A later hit on a shorter prefix re-refreshes only that prefix, which leaves a
    hole of expired pages between two live runs.
Dropped events break it too: a `stored` or `touched` event lost to a full publisher queue, a
failed batch, or a Redis restart that loses data. In all these cases, until the hole's pages
are stored again or the pages past it expire or are evicted, search may over-report: a probe
past the hole hits and the run is taken to reach it (exact mode counts up to the hole). The
router then favours a replica that must recompute more than it was told. Users who prefer
exactness at O(pages) cost set `lookup_mode="exact"`.

Time is the Redis server's clock (`TIME` inside the scripts), so publishers and routers on
different machines agree on expiry; tests may inject a clock instead.

Lookups never raise: on a timeout (`timeout_ms`, default 20 ms) or any connection error they
return {} ("nothing known": route by load), count it, and skip Redis for `retry_after_s`.
Publishing, heartbeats and `clear` raise `redis.RedisError`; the publisher catches and counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Literal

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.hashing import PageHash
from kvstore.page_pool import KVEvent, KVEventKind, KVTier

logger = logging.getLogger(__name__)

Clock = Callable[[], int]  # milliseconds since the epoch
LookupMode = Literal["search", "exact"]


class IndexConfig(BaseModel):
    """Where the index lives and how long its facts last."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS) URL")
    namespace: str = Field("kvfleet", description="first part of every key; lets clusters share one Redis")
    username: str | None = Field(None, description="ACL user, used when redis_url names none")
    password: str | None = Field(None, description="used when redis_url carries none")
    password_file: str | None = Field(
        None,
        description="a file holding the password (e.g. a mounted Kubernetes Secret), read when a client "
        "connects; instead of password",
    )
    tls: bool = Field(False, description="connect with TLS even if the URL says redis://")
    tls_ca_certs: str | None = Field(None, description="CA bundle to verify the server against")
    tls_certfile: str | None = Field(None, description="client certificate (mutual TLS)")
    tls_keyfile: str | None = Field(None, description="client key (mutual TLS)")
    tls_cert_reqs: Literal["required", "optional", "none"] = "required"
    ttl_s: float = Field(300.0, gt=0, description="an entry expires this long after its page was last stored or hit")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="how often a replica reports its load")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="a replica silent this long holds nothing for routers")
    timeout_ms: float = Field(20.0, gt=0, description="lookup budget (socket timeout); over it, lookup answers {}")
    connect_timeout_ms: float | None = Field(None, gt=0, description="default: timeout_ms")
    publish_timeout_ms: float = Field(1000.0, gt=0, description="socket timeout of the publisher's writes")
    retry_after_s: float = Field(1.0, ge=0, description="after an error, lookups answer {} and publishing waits")
    max_queued_pages: int = Field(65536, ge=1, description="publisher queue bound, in page hashes; beyond it, drop")
    max_batch_pages: int = Field(4096, ge=1, description="page hashes written per script call")
    trim_interval_s: float = Field(60.0, gt=0, description="how often a publisher deletes its expired entries")
    lookup_mode: LookupMode = Field(
        "search",
        description="search: gallop and bisect each candidate's run, O(log pages), exact when entries are "
        "prefix-closed (see kvstore.index); exact: check every leading page held, O(pages)",
    )

    @field_validator("namespace")
    @classmethod
    def _no_hash_tag(cls, v: str) -> str:
        if not v or "{" in v or "}" in v:
            raise ValueError(f"namespace must be non-empty and free of '{{' and '}}', got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_password(self) -> IndexConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set index.password or index.password_file, not both")
        return self

    @model_validator(mode="after")
    def _heartbeat_outlives_interval(self) -> IndexConfig:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live replicas would flicker out of the index"
            )
        return self


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica's heartbeat reports (the router weighs it against prefix overlap)."""

    num_waiting: int = 0
    num_running: int = 0
    num_free_pages: int = 0
    num_total_pages: int = 0
    # Cumulative counters, for `kvfleet status` (routers read only the four fields above).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0


@dataclass(frozen=True)
class ReplicaMatch:
    matched_pages: int  # leading pages of the prompt that the replica holds on its device
    load: ReplicaLoad
    host_pages: int = 0  # pages after those in its host tier (asked with `with_tiers`)


@dataclass
class LookupMetrics:
    lookups: int = 0  # calls, answered or not
    hits: int = 0  # answered with at least one replica holding at least one page
    timeouts: int = 0
    errors: int = 0  # connection and server errors other than timeouts
    skipped: int = 0  # answered {} without asking, during retry_after_s after a failure
    malformed: int = 0  # entries read from Redis outside the schema, skipped (see the module docstring)


_LOAD_FIELDS = ("num_waiting", "num_running", "num_free_pages", "num_total_pages")  # what lookups read
_HEARTBEAT_FIELDS = (
    *_LOAD_FIELDS,
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_requests_finished",
    "num_requests_aborted",
)

_LIVE_NOT_A_HEARTBEAT, _PAGES_NOT_A_ZSET = -2, -3  # the lookup script's codes for malformed entries
_MALFORMED_LOG_INTERVAL_S = 60.0


def parse_heartbeat(fields: object) -> ReplicaLoad | None:
    """A `live:` hash as HGETALL returns it (bytes keys and values), if it is in the schema."""
    if not isinstance(fields, dict) or len(fields) != len(_HEARTBEAT_FIELDS):
        return None
    values = []
    for name in _HEARTBEAT_FIELDS:
        v = fields.get(name.encode())
        if not isinstance(v, bytes) or not 0 < len(v) <= 18 or not v.isdigit():  # isdigit: ASCII only, for bytes
            return None
        values.append(int(v))
    return ReplicaLoad(*values)


# KEYS: live_1, pages_1, live_2, pages_2, ...  ARGV[1]: now in ms (0: the server's clock);
# ARGV[2]: the prompt's page hashes, 16 bytes each, concatenated (one string, sliced here with
# string.sub where a page is probed, rather than one argument per page); ARGV[3]: '1' to return
# the load fields too; ARGV[4]: '1' when KEYS come in triples (live, pages, host) and each
# candidate's answer ends with the pages of its host tier that continue its device run.
# Returns one string of space-separated integers (one bulk string parses ~10x
# faster than an array in redis-py), per candidate: its matched pages, or -1 without a live
# heartbeat, -2 for a heartbeat outside the schema, -3 (live, holding nothing) for a pages key
# that is not a sorted set; with ARGV[3] = '1', each followed by its four load fields (0s unless
# the heartbeat is valid). Every value is validated here, so the reply always parses.
# `@HELD@` is the mode's definition of `held(key)`: the candidate's leading run.
_LOOKUP_LUA = """#!lua flags=no-writes
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Scores come back as decimal integer strings: comparing (length, text) is comparing numbers,
-- and a third cheaper than tonumber() on every score.
local nows = string.format('%d', now)
local nlen = #nows
local blob = ARGV[2]
local n = #blob / 16
local members = {}
local function member(i)
  local m = members[i]
  if not m then
    m = string.sub(blob, i * 16 - 15, i * 16)
    members[i] = m
  end
  return m
end
-- A score from ZSCORE / ZMSCORE is an entry that has not expired.
local function live(s)
  return s and (#s > nlen or (#s == nlen and s > nows))
end
-- A candidate's heartbeat: 'none' (no live key), 'bad' (a key outside the schema: not a hash, or
-- not exactly the heartbeat's fields, each 1 to 18 decimal digits), or its fields' values.
local FIELDS = {@FIELDS@}
local function heartbeat(key)
  local len = redis.pcall('HLEN', key)
  if type(len) ~= 'number' then return 'bad' end
  if len == 0 then return 'none' end
  if len ~= #FIELDS then return 'bad' end
  local v = redis.call('HMGET', key, unpack(FIELDS))
  for i = 1, #FIELDS do
    local s = v[i]
    if not s or #s > 18 or not string.find(s, '^%d+$') then return 'bad' end
  end
  return v
end
-- The first call on a pages key: its answer, or nil when the key is not a sorted set.
local function first_call(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then return nil end
  return r
end
-- The first of scores[1..len] that is missing or expired (len + 1: none). `live` inlined: in
-- exact mode this runs once per page held.
local function first_miss(scores, len)
  local j = 1
  while j <= len do
    local s = scores[j]
    if not s or #s < nlen or (#s == nlen and s <= nows) then return j end
    j = j + 1
  end
  return j
end
@HELD@
-- Pages from..n held live in `key` (a host-tier set), in order, up to the first miss: exact
-- chunked ZMSCORE (host sets hold evicted tails, so they need not be prefix-closed).
local function extend(key, from)
  local got, pos = 0, from
  while pos <= n do
    local last = math.min(pos + 63, n)
    local args = {}
    for i = pos, last do args[#args + 1] = member(i) end
    local scores = first_call('ZMSCORE', key, unpack(args))
    if not scores then return 0 end
    local j = first_miss(scores, last - pos + 1)
    got = got + j - 1
    if j <= last - pos + 1 then break end
    pos = last + 1
  end
  return got
end
local out = {}
local with_load = ARGV[3] == '1'
local with_tiers = ARGV[4] == '1'
local stride = with_tiers and 3 or 2
for c = 1, #KEYS, stride do
  local load = heartbeat(KEYS[c])
  if load == 'none' or load == 'bad' then
    out[#out + 1] = load == 'none' and -1 or -2
    if with_load then
      for i = 1, 4 do out[#out + 1] = 0 end
    end
    if with_tiers then out[#out + 1] = 0 end
  else
    local got = held(KEYS[c + 1])
    out[#out + 1] = got
    if with_load then
      for i = 1, 4 do out[#out + 1] = load[i] end
    end
    if with_tiers then out[#out + 1] = extend(KEYS[c + 2], math.max(got, 0) + 1) end
  end
end
return table.concat(out, ' ')
"""
# Exact: ZMSCORE over the pages in order, in chunks that double from SCAN_FIRST to SCAN_MAX
# pages, until the first miss: a replica that misses early costs one small call, and a run that
# ends mid-chunk wastes at most SCAN_MAX - 1 checks.
_EXACT_RUN = """
local split = 0  -- members[1..split] are sliced already
local function held(key)
  local got, pos, chunk = 0, 1, SCAN_FIRST
  while pos <= n do
    local last = math.min(pos + chunk - 1, n)
    while split < last do
      split = split + 1
      members[split] = string.sub(blob, split * 16 - 15, split * 16)
    end
    local len = last - pos + 1
    local scores
    if pos == 1 then
      scores = first_call('ZMSCORE', key, unpack(members, pos, last))
      if not scores then return -3 end
    else
      scores = redis.call('ZMSCORE', key, unpack(members, pos, last))
    end
    local j = first_miss(scores, len)
    got = got + j - 1
    if j <= len then break end
    pos = last + 1
    if chunk < SCAN_MAX then chunk = chunk * 2 end
  end
  return got
end
"""
# Search: page 1 alone (most candidates miss there: one cheap call), then pages 2, 4, 8, ... and
# n (1-based) in one ZMSCORE, then a binary search with ZSCORE between the last hit and the first
# miss. Measured against 3-, 4-, 8- and 16-way splits of that gap, plain bisection costs the
# least: a call with one member is cheaper than its extra members are worth. Valid only for
# prefix-closed entries (the module docstring says when they are).
_SEARCH_RUN = """
local gallop, gallop_members = {}, {}
local p = 2
while p < n do
  gallop[#gallop + 1] = p
  p = p * 2
end
if n > 1 then gallop[#gallop + 1] = n end
for i, q in ipairs(gallop) do gallop_members[i] = member(q) end
local function held(key)
  if n == 0 then return 0 end
  local first = first_call('ZSCORE', key, member(1))
  if first == nil then return -3 end
  if not live(first) then return 0 end
  if n == 1 then return 1 end
  local j = first_miss(redis.call('ZMSCORE', key, unpack(gallop_members)), #gallop)
  if j > #gallop then return n end
  local lo, hi = 1, gallop[j]  -- page lo is held (so, under the invariant, are 1..lo); hi is not
  if j > 1 then lo = gallop[j - 1] end
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if live(redis.call('ZSCORE', key, member(mid))) then lo = mid else hi = mid end
  end
  return lo
end
"""
_SCAN_FIRST, _SCAN_MAX = 8, 64
_EXACT_RUN = _EXACT_RUN.replace("SCAN_FIRST", str(_SCAN_FIRST)).replace("SCAN_MAX", str(_SCAN_MAX))
_LOOKUP_LUA = _LOOKUP_LUA.replace("@FIELDS@", ", ".join(f"'{f}'" for f in _HEARTBEAT_FIELDS))
_LOOKUP_LUA = {"exact": _LOOKUP_LUA.replace("@HELD@", _EXACT_RUN), "search": _LOOKUP_LUA.replace("@HELD@", _SEARCH_RUN)}
# KEYS[1]: a replica's pages key. ARGV[1]: now in ms (0: the server's clock); ARGV[2]: ttl in ms;
# ARGV[3]: 1 to delete expired entries first; then pairs (op, hashes): op '+' stores or refreshes,
# '-' removes; hashes are 16 bytes each, concatenated. Ops apply in order.
_PUBLISH_LUA = """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
local key = KEYS[1]
-- The replica owns this key: one of another type (left by anyone) is replaced, not an error.
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', key) end
if ARGV[3] == '1' then redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now)) end
local expiry = string.format('%d', now + ttl)
for a = 4, #ARGV, 2 do
  local blob = ARGV[a + 1]
  local n = #blob / 16
  local pos = 1
  while pos <= n do
    local last = math.min(pos + 511, n)
    local args = {}
    if ARGV[a] == '+' then
      for i = pos, last do
        args[#args + 1] = expiry
        args[#args + 1] = string.sub(blob, i * 16 - 15, i * 16)
      end
      redis.call('ZADD', key, unpack(args))
    else
      for i = pos, last do args[#args + 1] = string.sub(blob, i * 16 - 15, i * 16) end
      redis.call('ZREM', key, unpack(args))
    end
    pos = last + 1
  end
end
if #ARGV > 3 then redis.call('PEXPIRE', key, math.floor(ttl)) end
return 0
"""


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def encode_hashes(hashes: Iterable[PageHash]) -> bytes:
    """Page hashes as the index stores them: 16 big-endian bytes each, concatenated."""
    return b"".join(map(int.to_bytes, hashes, repeat(16)))  # big-endian, the default


def decode_member(member: bytes) -> PageHash:
    return int.from_bytes(member, "big")


class IndexKeys:
    """Key names for one model in one namespace."""

    def __init__(self, namespace: str, model_id: str):
        if not model_id or "{" in model_id or "}" in model_id:
            raise ValueError(f"model_id must be non-empty and free of '{{' and '}}', got {model_id!r}")
        self.prefix = f"{namespace}:{{{model_id}}}"

    def pages(self, replica_id: str) -> str:
        return f"{self.prefix}:pages:{replica_id}"

    def live(self, replica_id: str) -> str:
        return f"{self.prefix}:live:{replica_id}"

    def host(self, replica_id: str) -> str:
        return f"{self.prefix}:host:{replica_id}"

    def tier(self, replica_id: str, tier: KVTier) -> str:
        return self.host(replica_id) if tier is KVTier.HOST else self.pages(replica_id)


def _client_kwargs(config: IndexConfig, timeout_ms: float, connect_timeout_ms: float) -> tuple[str, dict]:
    url = config.redis_url
    if config.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    kwargs: dict = dict(socket_timeout=timeout_ms / 1000, socket_connect_timeout=connect_timeout_ms / 1000)
    if config.username is not None:
        kwargs["username"] = config.username
    if config.password is not None:
        kwargs["password"] = config.password
    elif config.password_file is not None:
        try:
            kwargs["password"] = Path(config.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"index.password_file {config.password_file!r} cannot be read: {exc}") from exc
    if url.startswith("rediss://"):
        kwargs.update(
            ssl_ca_certs=config.tls_ca_certs,
            ssl_certfile=config.tls_certfile,
            ssl_keyfile=config.tls_keyfile,
            ssl_cert_reqs=config.tls_cert_reqs,
        )
    return url, kwargs


class _IndexBase:
    def __init__(self, config: IndexConfig, model_id: str, clock: Clock | None):
        self.config = config
        self.model_id = model_id
        self.keys = IndexKeys(config.namespace, model_id)
        self.clock = clock
        self.metrics = LookupMetrics()
        self._down_until = 0.0  # time.monotonic() before which lookups answer {} at once
        self._lookup_keys: dict[str, tuple[str, str]] = {}  # replica -> (live key, pages key)
        self._malformed_log_after = 0.0  # time.monotonic() before which malformed entries are not logged
        self._malformed_unlogged = 0

    def _now_arg(self) -> int:
        return self.clock() if self.clock is not None else 0

    def _lookup_args(
        self, hashes: Sequence[PageHash], replicas: Sequence[str], with_load: bool, with_tiers: bool = False
    ) -> tuple[list, list]:
        cache = self._lookup_keys
        if len(cache) > 65536:  # replica ids churn as replicas restart
            cache.clear()
        keys = []
        for r in replicas:
            triple = cache.get(r)
            if triple is None:  # bytes: redis-py packs them a third faster than str
                names = (self.keys.live(r), self.keys.pages(r), self.keys.host(r))
                triple = cache[r] = tuple(k.encode() for k in names)
            keys += triple if with_tiers else triple[:2]
        return keys, [self._now_arg(), encode_hashes(hashes), int(with_load), int(with_tiers)]

    def _skip(self) -> bool:
        self.metrics.lookups += 1
        if time.monotonic() < self._down_until:
            self.metrics.skipped += 1
            return True
        return False

    def _failed(self, e: Exception) -> None:
        if isinstance(e, redis.TimeoutError):
            self.metrics.timeouts += 1
        else:
            self.metrics.errors += 1
        if self._down_until == 0.0:
            logger.warning(
                "page index at %s unanswered (%s: %s): routing by load only, retrying in %.1fs",
                self.config.redis_url.rpartition("@")[2],
                type(e).__name__,
                e,
                self.config.retry_after_s,
            )
        self._down_until = time.monotonic() + self.config.retry_after_s

    def _answered(self) -> None:
        if self._down_until:
            logger.info("page index answers again")
            self._down_until = 0.0

    def _counts(self, raw: bytes, replicas: Sequence[str]) -> dict[str, int]:
        self._answered()
        out = {}
        for r, matched in zip(replicas, map(int, raw.split()), strict=True):
            if matched < -1:
                self._malformed(r, matched)
            out[r] = max(matched, 0)
        if any(out.values()):
            self.metrics.hits += 1
        return out

    def _matches(self, raw: bytes, replicas: Sequence[str], with_tiers: bool = False) -> dict[str, ReplicaMatch]:
        self._answered()
        values = map(int, raw.split())
        out = {}
        width = 6 if with_tiers else 5  # per replica: matched, four load fields[, host pages]
        for r, matched, *rest in zip(replicas, *[values] * width, strict=True):
            if matched < -1:
                self._malformed(r, matched)
            if matched >= 0 or matched == _PAGES_NOT_A_ZSET:
                out[r] = ReplicaMatch(max(matched, 0), ReplicaLoad(*rest[:4]), rest[4] if with_tiers else 0)
        if any(m.matched_pages for m in out.values()):
            self.metrics.hits += 1
        return out

    def _malformed(self, replica: str, code: int) -> None:
        what = {_LIVE_NOT_A_HEARTBEAT: "live", _PAGES_NOT_A_ZSET: "pages"}.get(code, "?")
        self._skip_malformed(f"{self.keys.prefix}:{what}:{replica}")

    def _skip_malformed(self, key: str) -> None:
        """Count an entry outside the schema; log the first, then at most one line a minute."""
        self.metrics.malformed += 1
        self._malformed_unlogged += 1
        now = time.monotonic()
        if now >= self._malformed_log_after:
            logger.warning(
                "page index: skipped %d entr%s outside kvfleet's schema (e.g. %r; see kvstore.index); "
                "something else writes to this Redis namespace",
                self._malformed_unlogged,
                "y" if self._malformed_unlogged == 1 else "ies",
                key,
            )
            self._malformed_unlogged = 0
            self._malformed_log_after = now + _MALFORMED_LOG_INTERVAL_S


class PageIndex(_IndexBase):
    """The index for one model, with blocking I/O: publishing, heartbeats, and lookups.

    Thread-safe (redis-py pools its connections). Lookups use a client with `timeout_ms`;
    writes use another with `publish_timeout_ms`, so a slow batch never eats the lookup budget.
    """

    def __init__(self, config: IndexConfig, model_id: str, clock: Clock | None = None):
        super().__init__(config, model_id, clock)
        connect_ms = config.connect_timeout_ms or config.timeout_ms
        url, kw = _client_kwargs(config, config.timeout_ms, connect_ms)
        # No retries: a lookup gets one try within its budget; the publisher decides its own.
        self._reader = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kw)
        url, kw = _client_kwargs(config, config.publish_timeout_ms, max(connect_ms, config.publish_timeout_ms))
        self._writer = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kw)
        self._lookup_script = self._reader.register_script(_LOOKUP_LUA[config.lookup_mode])
        self._publish_script = self._writer.register_script(_PUBLISH_LUA)

    # ------------------------------------------------------------------ reads (never raise)
    def lookup(self, hashes: Sequence[PageHash], replicas: Sequence[str]) -> dict[str, int]:
        """Leading pages of `hashes` held by each candidate, in one round trip.

        Every candidate is a key of the answer (0: holds no leading page, or no live heartbeat);
        {} means the index could not answer in time (or there were no candidates).
        """
        raw = self._call(hashes, replicas, with_load=False)
        return {} if raw is None else self._counts(raw, replicas)

    def lookup_with_load(
        self, hashes: Sequence[PageHash], replicas: Sequence[str], with_tiers: bool = False
    ) -> dict[str, ReplicaMatch]:
        """Like `lookup`, with each replica's reported load, in the same round trip; only
        replicas with a live heartbeat are keys of the answer. `with_tiers`: each match also
        counts the pages of the replica's host tier that continue its device run."""
        raw = self._call(hashes, replicas, with_load=True, with_tiers=with_tiers)
        return {} if raw is None else self._matches(raw, replicas, with_tiers)

    def _call(
        self, hashes: Sequence[PageHash], replicas: Sequence[str], with_load: bool, with_tiers: bool = False
    ) -> bytes | None:
        if not replicas or self._skip():
            return None
        keys, args = self._lookup_args(hashes, replicas, with_load, with_tiers)
        try:
            return self._lookup_script(keys, args)
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return None

    # ------------------------------------------------------------------ writes (raise redis.RedisError)
    def publish(self, events: Iterable[KVEvent]) -> None:
        """Apply events in order: stored/touched refresh entries to now + ttl_s, removed deletes them."""
        ops: dict[tuple[str, KVTier], list] = {}  # one script call per (replica, tier) key
        for ev in events:
            if not ev.hashes:
                continue
            op = b"-" if ev.kind == KVEventKind.REMOVED else b"+"
            args = ops.setdefault((ev.replica_id, ev.tier), [])
            if args and args[-2] == op:
                args[-1] += encode_hashes(ev.hashes)
            else:
                args += (op, encode_hashes(ev.hashes))
        for (replica_id, tier), args in ops.items():
            self._run_publish(replica_id, args, trim=False, tier=tier)

    def trim(self, replica_id: str) -> None:
        """Delete the replica's expired entries (lookups ignore them anyway; this frees memory)."""
        self._run_publish(replica_id, [], trim=True)
        self._run_publish(replica_id, [], trim=True, tier=KVTier.HOST)

    def heartbeat(self, replica_id: str, load: ReplicaLoad) -> bool:
        """Report the replica alive, with its load, for the next `heartbeat_ttl_s`. Returns whether
        the previous heartbeat was still there: False after the first, after a silence longer than
        the TTL, or when Redis lost its data (a restart), i.e. whenever the index may have forgotten
        this replica's pages too."""
        key = self.keys.live(replica_id)
        pipe = self._writer.pipeline(transaction=True)
        pipe.exists(key)
        pipe.delete(key)  # written whole: whatever else was left under this name goes
        pipe.hset(key, mapping={f: int(getattr(load, f)) for f in _HEARTBEAT_FIELDS})
        pipe.pexpire(key, int(self.config.heartbeat_ttl_s * 1000))
        return bool(pipe.execute()[0])

    def live_replicas(self) -> dict[str, ReplicaLoad]:
        """Every replica of the model with a live heartbeat, and what it last reported (a SCAN
        and one pipelined HGETALL: for status pages, not for routing). Entries outside the schema
        are skipped and counted. Raises `redis.RedisError` when Redis does not answer."""
        prefix = self.keys.live("").encode()
        keys = list(self._writer.scan_iter(match=_glob_escape(self.keys.live("")) + "*", count=1000))
        pipe = self._writer.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out = {}
        # Errors come back per command (a key of another type answers WRONGTYPE), not raised.
        for key, fields in zip(keys, pipe.execute(raise_on_error=False), strict=True):
            if fields == {}:  # expired between the SCAN and the HGETALL
                continue
            if isinstance(fields, redis.ConnectionError | redis.TimeoutError):
                raise fields
            load = parse_heartbeat(fields)
            try:
                name = key[len(prefix) :].decode()
            except UnicodeDecodeError:
                load = None
            if load is None:
                self._skip_malformed(key.decode(errors="backslashreplace"))
            else:
                out[name] = load
        return dict(sorted(out.items()))

    def leave(self, replica_id: str) -> None:
        """Drop the replica's heartbeat at once (it is shutting down); its entries expire by TTL."""
        self._writer.delete(self.keys.live(replica_id))

    def clear(self, replica_id: str) -> None:
        """Forget everything about the replica (it starts again under the same id)."""
        self._writer.delete(self.keys.pages(replica_id), self.keys.host(replica_id), self.keys.live(replica_id))

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    def _run_publish(self, replica_id: str, ops: list, trim: bool, tier: KVTier = KVTier.GPU) -> None:
        ttl_ms = int(self.config.ttl_s * 1000)
        self._publish_script([self.keys.tier(replica_id, tier)], [self._now_arg(), ttl_ms, int(trim), *ops])


class AsyncPageIndex(_IndexBase):
    """The router's side of the index on asyncio: lookups only, same semantics as `PageIndex`.

    Its connections belong to the event loop that first uses it.
    """

    def __init__(self, config: IndexConfig, model_id: str, clock: Clock | None = None):
        super().__init__(config, model_id, clock)
        url, kw = _client_kwargs(config, config.timeout_ms, config.connect_timeout_ms or config.timeout_ms)
        self._reader = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **kw)
        self._lookup_script = self._reader.register_script(_LOOKUP_LUA[config.lookup_mode])

    async def lookup(self, hashes: Sequence[PageHash], replicas: Sequence[str]) -> dict[str, int]:
        raw = await self._call(hashes, replicas, with_load=False)
        return {} if raw is None else self._counts(raw, replicas)

    async def lookup_with_load(self, hashes: Sequence[PageHash], replicas: Sequence[str]) -> dict[str, ReplicaMatch]:
        raw = await self._call(hashes, replicas, with_load=True)
        return {} if raw is None else self._matches(raw, replicas)

    async def try_lookup_with_load(
        self, hashes: Sequence[PageHash], replicas: Sequence[str], with_tiers: bool = False
    ) -> dict[str, ReplicaMatch] | None:
        """Like `lookup_with_load`, but None when the index gave no answer (down, slow, or in its
        retry pause), so a router can tell "nobody holds this" from "nobody knows"."""
        raw = await self._call(hashes, replicas, with_load=True, with_tiers=with_tiers) if replicas else b""
        return None if raw is None else self._matches(raw, replicas, with_tiers) if replicas else {}

    async def _call(
        self, hashes: Sequence[PageHash], replicas: Sequence[str], with_load: bool, with_tiers: bool = False
    ) -> bytes | None:
        if not replicas or self._skip():
            return None
        keys, args = self._lookup_args(hashes, replicas, with_load, with_tiers)
        try:
            return await self._lookup_script(keys, args)
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return None

    async def aclose(self) -> None:
        await self._reader.aclose()
