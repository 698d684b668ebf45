"""The cache hit rate a served workload could reach at best, and where a run's misses went.

A turn's prompt can be served from cache only up to its last full page before its last token
(the engine computes that token for its logits), and only for pages some earlier turn computed.
`workload` is that ceiling: every turn sent earlier counts, as if each ran alone in send order,
so the first touch of each prefix is the only miss any routing or cache size must pay.

A run's misses below the ceiling (per turn: the pages an earlier turn computed that this one
did not get from cache) are split by the first page it missed:
- `in_flight`: no turn had finished computing that page when this one was sent (its first
  token, for a prompt page; its end, for a page of its answer): turns that overlap on a new
  prefix, which a cluster can avoid only by holding a turn back until another computes it;
  `in_flight_elsewhere` is the part of those whose page was first being computed on another
  replica than the one this turn went to (routing could have sent it to the computing one);
- `after_computed`: the page was complete somewhere when this turn was sent, yet it was
  recomputed: evicted from every tier, routed away from its holder without a pull, a pull
  refused by the cost model or failed.
(Pages are committed chunk by chunk during a prefill, so a turn admitted late can still find
some of an `in_flight` prefix cached: the split is a guide, not an exact account.)
"""

from __future__ import annotations

from kvstore.hashing import page_hashes


def hit_ceilings(turns, page_size: int) -> dict:
    """`turns`: cluster/bench/serve.py's `Turn`s (with `prompt`, `answer`, `sent`, `ttft`, `e2e`,
    `cached_tokens`). Fractions of all their prompt tokens."""
    ok = sorted((t for t in turns if not t.error and t.prompt), key=lambda t: t.sent)
    total = sum(len(t.prompt) for t in ok)
    done_at: dict[int, float] = {}  # page hash -> earliest time a turn sent earlier had computed it
    first_on: dict[int, str] = {}  # page hash -> the replica of the first turn that computed it
    ceiling = in_flight = elsewhere = after = 0
    for t in ok:
        asked = page_hashes(t.prompt, page_size, "")[: (len(t.prompt) - 1) // page_size]
        n = 0
        while n < len(asked) and asked[n] in done_at:
            n += 1
        ceiling += n * page_size
        missed = n * page_size - t.cached_tokens
        if missed > 0:
            first = asked[t.cached_tokens // page_size]
            if done_at[first] > t.sent:
                in_flight += missed
                elsewhere += missed if first_on[first] != t.replica else 0
            else:
                after += missed
        first_token, end = t.sent + t.ttft, t.sent + t.e2e
        for h in page_hashes(t.prompt, page_size, ""):
            done_at[h] = min(done_at.get(h, first_token), first_token)
            first_on.setdefault(h, t.replica)
        for h in page_hashes(t.prompt + t.answer[:-1], page_size, ""):
            done_at[h] = min(done_at.get(h, end), end)
            first_on.setdefault(h, t.replica)
    frac = (lambda x: x / total) if total else (lambda x: 0.0)
    return {
        "workload": frac(ceiling),
        "missed_in_flight": frac(in_flight),
        "missed_in_flight_elsewhere": frac(elsewhere),
        "missed_after_computed": frac(after),
    }
