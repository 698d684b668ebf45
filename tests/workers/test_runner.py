"""The model runner's pure parts: the CUDA-graph bucket set and the tensor-parallel step plan."""

import dataclasses
import itertools

import pytest
import torch

from workers.runner.config import RunnerConfig
from workers.runner.graphs import graph_buckets
from workers.runner.tp import StepOp, StepPlan


def config(**kw) -> RunnerConfig:
    base = dict(
        model_dir="m",
        device=torch.device("cpu"),
        dtype=torch.float32,
        load_format="dummy",
        seed=0,
        page_size=16,
        max_model_len=4096,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        kernels="torch",
        num_pages=None,
        gpu_memory_utilization=0.9,
        cpu_kv_cache_gib=1.0,
        cuda_graphs=True,
        max_graph_batch_size=256,
    )
    return RunnerConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "max_num_seqs, k, spec_seqs, max_graph_batch_size, budget",
    list(itertools.product([1, 2, 3, 8, 40, 256], [0, 1, 4, 6, 16], [0, 1, 32], [4, 8, 256], [64, 2048])),
)
def test_every_decode_or_verification_step_that_may_replay_finds_a_bucket(
    max_num_seqs, k, spec_seqs, max_graph_batch_size, budget
):
    cfg = config(
        max_num_seqs=max_num_seqs,
        num_speculative_tokens=k,
        max_num_spec_seqs=spec_seqs,
        max_graph_batch_size=max_graph_batch_size,
        max_num_batched_tokens=max(budget, max_num_seqs),
    )
    buckets = graph_buckets(cfg.max_graph_rows)
    assert buckets == sorted(set(buckets)) and buckets[-1] <= cfg.max_num_rows
    replayed_decodes = min(max_num_seqs, max_graph_batch_size)
    # every decode batch that replays, and every verification of as many sequences as speculate
    # (each row count k' + 1 per sequence, k' <= k, within the token budget)
    for seqs in range(1, replayed_decodes + 1):
        assert seqs <= buckets[-1]
        if seqs <= spec_seqs:
            rows = min(seqs * (1 + k), cfg.max_num_batched_tokens)
            assert rows <= buckets[-1], f"{seqs} sequences verifying {k} tokens: {rows} rows, buckets {buckets}"


def test_without_speculation_the_buckets_stop_at_the_largest_decode_batch():
    assert graph_buckets(config().max_graph_rows) == [1, 2, 4, *range(8, 257, 8)]
    assert graph_buckets(config(max_num_seqs=1).max_graph_rows) == [1]
    assert graph_buckets(config(max_num_seqs=1, num_speculative_tokens=4, max_num_spec_seqs=32).max_graph_rows) == [
        1,
        2,
        4,
        5,
    ]


def test_a_step_plan_packs_into_one_int64_tensor_and_back():
    plan = StepPlan(StepOp.STEP, num_tokens=70, num_seqs=5, table_width=9, num_decodes=3, max_query_len=64,
                    num_splits=4, num_logit_rows=5)  # fmt: skip
    packed = plan.pack(torch.device("cpu"))
    assert packed.dtype == torch.int64 and packed.shape == (len(dataclasses.fields(StepPlan)),)
    assert StepPlan.unpack(packed) == plan
    assert StepPlan.unpack(StepPlan(StepOp.STOP).pack(torch.device("cpu"))).op is StepOp.STOP
    assert plan.input_sizes == [70, 70, 70, 5, 6, 45, 5]
