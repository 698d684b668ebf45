"""`kvfleet bench engine --workload shared-prefix` on a tiny model: prefix caching off, then on."""

import json

from cluster.bench.shared_prefix import SharedPrefixWorkload
from cluster.cli import build_parser


def test_workload_shares_only_the_prefix():
    w = SharedPrefixWorkload.make(5, 48, (3, 7), (2, 4), 1000, seed=0)
    assert all(p[:48] == w.prefix for p in w.prompts)
    assert all(3 <= len(s) <= 7 for s in w.suffixes) and all(2 <= n <= 4 for n in w.output_lens)
    assert len({tuple(s) for s in w.suffixes}) == 5
    assert SharedPrefixWorkload.make(5, 48, (3, 7), (2, 4), 1000, seed=0) == w


def test_shared_prefix_bench_hits_with_caching_only(model_dirs, tmp_path):
    out = tmp_path / "shared.json"
    flags = "--workload shared-prefix --device cpu --num-requests 4 --prefix-len 64 --suffix-len 3 9"
    flags += " --min-output 3 --max-output 3 --max-model-len 128"
    args = build_parser().parse_args(
        ["bench", "engine", *flags.split(), "--model", str(model_dirs["llama"]), "--json", str(out)]
    )
    args.func(args)
    report = json.loads(out.read_text())
    off, on = report["runs"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["prompt_tokens"] == on["prompt_tokens"] and off["output_tokens"] == on["output_tokens"] == 12
    assert off["cached_prompt_tokens"] == 0 and off["hit_rate"] == 0
    # One request at a time: the first misses, the other three find the 64-token prefix (4 full pages).
    assert on["cached_prompt_tokens"] == 3 * 64 and on["hit_rate"] > 0
    assert on["prefill_tokens_computed"] == off["prefill_tokens_computed"] - 3 * 64
    for run in (off, on):
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p90"] and run["output_tokens_per_s"] > 0
    assert report["ttft_p50_speedup"] > 0
