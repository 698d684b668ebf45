"""Exact verification of proposed tokens (Leviathan et al. 2023; Chen et al. 2023).

Proposed token x is accepted with probability min(1, p(x) / q(x)); at the first rejection a token
is drawn from normalise(max(0, p - q)); if all k are accepted a bonus token is drawn from p. p is
what the sampler would draw from at that position (`Sampler.process`: penalty over the history
including the accepted drafts, temperature, top-k/p, min-p); a proposer without a distribution
(n-gram, a greedy draft) counts as q = one-hot. A greedy row's p is one-hot on the argmax, so
greedy verification keeps the drafts while they equal the target's argmax: output identical to
non-speculative greedy. A seeded request draws all its randomness from its own generator, so it
repeats exactly for the same speculation decisions (k per step); its tokens differ from the
non-speculative run's, being other draws from the same distribution.
"""

from __future__ import annotations

import torch

from workers.sampling import Sampler, upload
from workers.scheduler import ScheduledSeq


def verify(
    sampler: Sampler, logits: torch.Tensor, entries: list[ScheduledSeq], entry_rows: list[list[int]]
) -> list[list[int]]:
    """The tokens each verification emits: its accepted drafts, then one token of the target's
    (the correction at the first rejection, or the bonus after k acceptances).

    One device-to-host transfer for the whole batch (the chosen tokens, with the sampled rows'
    accept flags); greedy rows compare their drafts with the argmax on the host."""
    device = logits.device
    rows = [r for rs in entry_rows for r in rs]
    x = logits if rows == list(range(logits.shape[0])) else logits[upload(rows, torch.int64, device)]
    starts, drafts = [], []  # per row: the draft it checks (0 on the bonus row)
    for s in entries:
        starts.append(len(drafts))
        drafts += s.draft_token_ids
        drafts.append(0)
    sampled = [i for i, s in enumerate(entries) if not s.seq.sampling.greedy]
    penalty = any(s.seq.sampling.repetition_penalty != 1.0 for s in entries)
    if not sampled and not penalty:
        choice_l = x.argmax(dim=-1).tolist()  # exact in any float dtype: no float32 copy
        return _emitted(entries, starts, choice_l, None, {})
    params, history = [], [] if penalty else None
    for s in entries:
        k = len(s.draft_token_ids)
        params += [s.seq.sampling] * (k + 1)
        if penalty:
            history += [s.seq.token_ids + s.draft_token_ids[:j] for j in range(k + 1)]
    scores = sampler.process(x, params, history)
    if not sampled:
        return _emitted(entries, starts, scores.argmax(dim=-1).tolist(), None, {})
    srows, dp_rows, dp, oh_rows, gens = [], [], [], [], []
    for i in sampled:
        s = entries[i]
        k = len(s.draft_token_ids)
        first = len(srows)
        srows += range(starts[i], starts[i] + k + 1)
        if s.draft_probs is not None:
            dp_rows += range(first, first + k)
            dp.append(s.draft_probs)
        else:  # a deterministic proposal: q is one-hot on the draft
            oh_rows += range(first, first + k)
        gens.append((k + 1, s.seq.generator))
    idx = upload(srows, torch.int64, device)
    d = upload([drafts[r] for r in srows], torch.int64, device)
    p = (scores if len(srows) == scores.shape[0] else scores[idx]).softmax(dim=-1)
    q = torch.zeros_like(p)  # the bonus rows draw from p itself: no draft, q = 0 there
    if dp:
        q[upload(dp_rows, torch.int64, device)] = torch.cat(dp).to(q.dtype)
    if oh_rows:
        oh = upload(oh_rows, torch.int64, device)
        q[oh, d[oh]] = 1.0
    noise = torch.empty_like(p)
    uniform = torch.empty(len(srows), device=device)
    if all(g is None for _, g in gens):
        uniform.uniform_(generator=sampler.generator)
        noise.exponential_(generator=sampler.generator)
    else:
        offset = 0
        for n, gen in gens:
            gen = gen or sampler.generator
            uniform[offset : offset + n].uniform_(generator=gen)
            noise[offset : offset + n].exponential_(generator=gen)
            offset += n
    p_x = p.gather(1, d[:, None]).squeeze(1)
    q_x = q.gather(1, d[:, None]).squeeze(1)
    ok = uniform * q_x < p_x
    residual = (p - q).clamp_(min=0)
    # p == q leaves nothing (and then rejection had probability 0): fall back to p.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p, residual)
    token = residual.div_(noise).argmax(dim=-1)
    choice = token if len(srows) == scores.shape[0] else scores.argmax(dim=-1).index_copy(0, idx, token)
    both = torch.cat([choice, ok.to(choice.dtype)]).tolist()
    n = choice.shape[0]
    return _emitted(entries, starts, both[:n], both[n:], {r: j for j, r in enumerate(srows)})


def _emitted(entries, starts, choice: list[int], ok: list[int] | None, ok_row: dict[int, int]) -> list[list[int]]:
    """Per entry: its drafts while accepted, then the target's token at the first rejection
    (or the bonus). A greedy row accepts its draft when it is the argmax; a sampled row as the
    rejection test said (`ok[ok_row[r]]`)."""
    out = []
    for s, start in zip(entries, starts, strict=True):
        emitted = []
        for j, t in enumerate(s.draft_token_ids):
            r = start + j
            if ok[ok_row[r]] if r in ok_row else choice[r] == t:
                emitted.append(t)
                continue
            emitted.append(choice[r])
            break
        else:
            emitted.append(choice[start + len(s.draft_token_ids)])
        out.append(emitted)
    return out
