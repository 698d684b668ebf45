"""The sampler: turns one step's logits into one token per row (and optionally its logprobs).

Per row, in Hugging Face `generate` order: repetition penalty; then, for sampled rows only,
temperature, top-k, top-p and min-p; then argmax (greedy) or a draw. Each processor matches
the HF class of the same name (`transformers.generation.logits_process`), ties included.

Invariants:
- a row's token depends only on its own logits, params, token history and noise; a row whose
  parameters disable a processor passes through it unchanged even when other rows use it;
- a row with its own generator draws its noise from that generator only, so a seeded request
  gives the same tokens whatever the batch size, its row position or the other rows;
- greedy rows draw no noise at all; unseeded sampled rows share the sampler's generator;
- the caller's logits are never modified; logprobs describe the raw model distribution
  (before penalty and temperature), as the model produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.request import SamplingParams, StepLogprobs, TokenLogprob

_NEG_INF = float("-inf")


@dataclass
class SamplingInputs:
    params: list[SamplingParams]  # one per row of logits
    generators: list[torch.Generator | None]  # per row; None -> the sampler's shared generator
    token_history: list[list[int]]  # per row: prompt + output ids so far (for repetition penalty)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[StepLogprobs | None]  # None for rows whose params.logprobs is None


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or array on `device` without waiting for the device (a plain
    `torch.tensor(..., device=cuda)` waits for every queued kernel): through pinned memory, which
    the caching host allocator keeps until the copy has run."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own RNG; it lives on the logits' device so noise never crosses devices."""
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    def __init__(self, device: torch.device | str, seed: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs) -> SamplerOutput:
        params = inputs.params
        num_rows = logits.shape[0]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        penalty_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]

        if not (logprob_rows or penalty_rows or sample_rows):
            # argmax is exact in any float dtype, so the common case needs no float32 copy.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_rows)

        raw = logits.float()
        scores = raw
        if penalty_rows:
            scores = self._penalize(scores, penalty_rows, params, inputs.token_history)

        if len(sample_rows) == num_rows:
            tokens = self._sample(scores, params, inputs.generators)
        else:
            tokens = scores.argmax(dim=-1)
            if sample_rows:
                idx = self._index(sample_rows)
                sampled = self._sample(
                    scores[idx], [params[i] for i in sample_rows], [inputs.generators[i] for i in sample_rows]
                )
                tokens = tokens.index_copy(0, idx, sampled)

        top = self._logprobs(raw, tokens, logprob_rows, params) if logprob_rows else None
        # The step's only device-to-host syncs: every kernel above is already queued.
        token_ids = tokens.tolist()
        logprobs: list[StepLogprobs | None] = [None] * num_rows
        if top is not None:
            chosen, top_values, top_ids = (t.tolist() for t in top)
            for j, i in enumerate(logprob_rows):
                n = params[i].logprobs
                logprobs[i] = StepLogprobs(
                    chosen=TokenLogprob(token_ids[i], chosen[j]),
                    top=tuple(TokenLogprob(t, v) for t, v in zip(top_ids[j][:n], top_values[j][:n], strict=True)),
                )
        return SamplerOutput(token_ids, logprobs)

    def process(
        self, logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]] | None
    ) -> torch.Tensor:
        """The scores `__call__` draws from, per row, in float32: repetition penalty, then for
        sampled rows temperature, top-k, top-p and min-p (a greedy row's argmax is its token; a
        sampled row's softmax is the distribution its token is drawn from). The speculative
        verifier and the draft model use it, so they honour exactly what the sampler honours.
        `history` may be None when no row has a repetition penalty."""
        scores = logits.float()
        penalty_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalty_rows:
            scores = self._penalize(scores, penalty_rows, params, history)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(sample_rows) == scores.shape[0]:  # no row to carry over unchanged
            if any(p.temperature != 1.0 for p in params):
                scores = self._divide(scores, [p.temperature for p in params])
            return self._filter(scores, params)
        if sample_rows:
            idx = self._index(sample_rows)
            sub = [params[i] for i in sample_rows]
            processed = scores[idx]
            if any(p.temperature != 1.0 for p in sub):
                processed = self._divide(processed, [p.temperature for p in sub])
            scores = scores.index_copy(0, idx, self._filter(processed, sub))
        return scores

    # ------------------------------------------------------------------ steps
    def _index(self, rows: list[int]) -> torch.Tensor:
        return upload(rows, torch.long, self.device)

    def _row_values(self, values: list[float]) -> torch.Tensor:
        """A [rows, 1] float32 column, to broadcast one parameter per row over the vocabulary."""
        return upload(values, torch.float32, self.device).unsqueeze(1)

    def _divide(self, scores: torch.Tensor, values: list[float]) -> torch.Tensor:
        """Row i divided by values[i], rounded as HF's `scores / python_float` is: on CUDA PyTorch
        multiplies by the reciprocal (taken in double, rounded to float32), elsewhere it divides.
        A true division would differ from HF in the last bit on CUDA."""
        if scores.device.type == "cuda":
            return scores * self._row_values([1.0 / v for v in values])
        return scores / self._row_values(values)

    def _penalize(
        self, scores: torch.Tensor, rows: list[int], params: list[SamplingParams], history: list[list[int]]
    ) -> torch.Tensor:
        """HF RepetitionPenaltyLogitsProcessor on `rows`: each id seen is penalized once,
        logit < 0 multiplied by the penalty, logit >= 0 divided; ids >= vocab are ignored."""
        vocab = scores.shape[1]
        lengths = [len(history[i]) for i in rows]
        ids = upload([t for i in rows for t in history[i]], torch.long, self.device)
        # output_size spares the device a sync to learn the length.
        row_of_id = torch.repeat_interleave(
            torch.arange(len(rows), device=self.device),
            upload(lengths, torch.long, self.device),
            output_size=sum(lengths),
        )
        # One spare column absorbs out-of-vocabulary ids, as HF does, then is dropped.
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=self.device)
        seen[row_of_id, ids.clamp(max=vocab)] = True
        seen = seen[:, :vocab]

        idx = self._index(rows)
        sub = scores[idx]
        penalties = [params[i].repetition_penalty for i in rows]
        penalized = torch.where(sub < 0, sub * self._row_values(penalties), self._divide(sub, penalties))
        return scores.index_copy(0, idx, torch.where(seen, penalized, sub))

    def _sample(
        self, scores: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        temperatures = [p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            scores = self._divide(scores, temperatures)
        scores = self._filter(scores, params)
        probs = scores.softmax(dim=-1)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i,
        # and lets each row take its noise from its own generator.
        noise = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if not seeded:
            noise.exponential_(generator=self.generator)
        elif len(seeded) < len(generators):
            unseeded = self._index([i for i, g in enumerate(generators) if g is None])
            shared = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype, device=probs.device)
            noise.index_copy_(0, unseeded, shared.exponential_(generator=self.generator))
        for i in seeded:
            noise[i].exponential_(generator=generators[i])
        return probs.div_(noise).argmax(dim=-1)

    def _filter(self, scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Top-k, top-p, min-p in HF's order and semantics; each is built only if some row uses it,
        and a row that disables it gets a threshold that removes nothing."""
        vocab = scores.shape[1]

        top_k = [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params]
        if any(top_k):
            # Like HF, keep every token tied with the k-th largest (so possibly more than k).
            k = upload(top_k, torch.long, self.device).unsqueeze(1)
            kth = scores.topk(max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0))
            kth = kth.masked_fill(k == 0, _NEG_INF)
            scores = scores.masked_fill(scores < kth, _NEG_INF)

        if any(p.top_p < 1.0 for p in params):
            # HF: remove tokens whose ascending cumulative probability is <= 1 - top_p, but never
            # the most likely one. The same (unstable) sort as HF, so ties split the same way.
            # A disabled row gets -1, which no cumulative probability reaches.
            cut = self._row_values([1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params])
            sorted_scores, order = scores.sort(dim=-1)
            remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= cut
            remove[:, -1] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), _NEG_INF)

        min_p = [p.min_p for p in params]
        if any(min_p):
            # Relative to the most likely token after temperature and the filters above. The top
            # token itself is never removed (min_p <= 1), so HF's keep-one step is a no-op here.
            probs = scores.softmax(dim=-1)
            floor = self._row_values(min_p) * probs.amax(dim=-1, keepdim=True)
            scores = scores.masked_fill(probs < floor, _NEG_INF)
        return scores

    def _logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], params: list[SamplingParams]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `rows`, in one pass: the chosen token's logprob, and the top-n logprobs and ids
        (n the largest any row asks for; each row keeps its own first n)."""
        idx = self._index(rows)
        logprobs = raw[idx].log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[idx].unsqueeze(1)).squeeze(1)
        num_top = min(max(params[i].logprobs for i in rows), raw.shape[1])
        top = logprobs.topk(num_top, dim=-1)  # sorted, highest first
        return chosen, top.values, top.indices
