"""The workload of `kvfleet bench simulate`: conversations that share prefixes.

Each conversation runs on one of `system_prompts` system prompts (the k-th is picked with
probability ~ 1 / k**prompt_zipf); turn t's prompt is the system prompt, every earlier question and
answer, and a new question; so a conversation's history is a prefix of its next prompt.
Conversations start as a Poisson process (`rate / turns` per second, so that requests arrive at
about `rate` per second at steady state) and each turn follows the previous answer after an
exponential think time. Lengths are drawn uniformly from [1/2, 3/2] of their means.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    system_prompts: int = 32
    system_prompt_tokens: int = 1024  # mean; each prompt's length is drawn from [1/2, 3/2] of it
    prompt_zipf: float = 1.0  # popularity of the k-th system prompt ~ 1 / k**zipf
    turns: int = 4  # per conversation
    question_tokens: int = 128  # means; each drawn from [1/2, 3/2] of it
    answer_tokens: int = 256
    think_s: float = 5.0  # mean pause between an answer and the next question
    rate_per_replica: float = 8.0  # requests/s at steady state, unless `rate` is set
    rate: float | None = None
    duration_s: float = 60.0  # conversations start until then, and turns due later are dropped ...
    users: int | None = None  # ... unless this many conversations are asked for: then they all run to the end
    warmup_s: float = 30.0  # measure the requests that arrive from then until duration_s


@dataclass
class Conversation:
    id: int
    sys_id: int
    sys_len: int
    start: float
    questions: list[int]
    answers: list[int]
    thinks: list[float]


def make_conversations(w: Workload, replicas: int, seed: int) -> list[Conversation]:
    """The conversations, from the seed alone: the same for every policy."""
    rng = random.Random(seed)
    rate = w.rate if w.rate is not None else w.rate_per_replica * replicas

    def around(mean: int) -> int:
        return rng.randint(max(1, mean // 2), max(1, mean * 3 // 2))

    sys_lens = [around(w.system_prompt_tokens) for _ in range(w.system_prompts)]
    cum, total = [], 0.0
    for k in range(w.system_prompts):
        total += 1.0 / (k + 1) ** w.prompt_zipf
        cum.append(total)
    convs, t = [], 0.0
    while True:
        t += rng.expovariate(rate / w.turns)  # each conversation brings `turns` requests
        if (t > w.duration_s) if w.users is None else (len(convs) == w.users):
            break
        c = len(convs)
        s = rng.choices(range(w.system_prompts), cum_weights=cum)[0]
        n = w.turns
        questions = [around(w.question_tokens) for _ in range(n)]
        answers = [around(w.answer_tokens) for _ in range(n)]
        thinks = [rng.expovariate(1 / w.think_s) if w.think_s > 0 else 0.0 for _ in range(n - 1)]
        convs.append(Conversation(c, s, sys_lens[s], t, questions, answers, thinks))
    return convs
