"""Stable, chained page hashes: the key of a KV page everywhere in kvfleet.

A page hash names the contents of one *full* page of KV cache: the tokens in it, every token
before it (through the chain), and the model. Process-, machine- and run-stable, so the router,
every worker and the Redis index agree on it:

    root = xxh3_128(b"kvfleet-page-v1" + model_id)
    h_0  = xxh3_128(root || tokens of page 0)
    h_i  = xxh3_128(h_{i-1} || tokens of page i)

Digests are 128 bits, packed as little-endian bytes for chaining and exposed as Python ints.
Token ids are packed as unsigned 32-bit little-endian integers. Python's `hash()` is never used:
it is salted per process.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

PageHash = int  # a 128-bit digest

_ROOT_PREFIX = b"kvfleet-page-v1\x00"


def root_hash(model_id: str) -> PageHash:
    """The chain's seed for a model: pages of different models never share a hash."""
    return xxhash.xxh3_128_intdigest(_ROOT_PREFIX + model_id.encode("utf-8"))


def page_hashes(
    token_ids: Sequence[int],
    page_size: int,
    model_id: str,
    parent: PageHash | None = None,
) -> list[PageHash]:
    """Hashes of the full pages of `token_ids` (a trailing partial page has none).

    `parent` is the hash of the page just before `token_ids[0]`; None means `token_ids` starts
    the sequence. Extending a sequence page by page with the last hash as parent gives the same
    hashes as hashing the whole sequence at once.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    prev = root_hash(model_id) if parent is None else parent
    num_full = len(token_ids) // page_size
    pack = struct.Struct(f"<{page_size}I").pack
    out: list[PageHash] = []
    for i in range(num_full):
        data = prev.to_bytes(16, "little") + pack(*token_ids[i * page_size : (i + 1) * page_size])
        prev = xxhash.xxh3_128_intdigest(data)
        out.append(prev)
    return out


def hash_to_str(h: PageHash) -> str:
    """The 32-hex-digit form used as a Redis member and in logs."""
    return f"{h:032x}"
