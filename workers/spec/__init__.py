"""Speculative decoding: proposers guess the next k tokens, the target verifies them exactly.

    proposer.propose(seqs, k)  ->  k tokens per sequence (+ their draft distribution q)
    scheduler.add_draft_tokens  ->  the decode becomes a verification of k + 1 tokens
    ModelRunner.execute         ->  one target pass; `verify` picks the tokens to keep

The folder, by job: `verify` (exact rejection sampling), `proposers` (the `Proposer` protocol,
`Proposals`, the n-gram proposer), `decoder` (the engine's side: which decodes speculate, adaptive
k, counters, the fallback when a proposer fails), `draft_model` (a draft model in the target's
process, or a draft replica's), `wire` (what travels to and from draft replicas) and
`draft_client` (the target's side of draft replicas).
"""
