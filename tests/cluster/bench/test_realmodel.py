"""`kvfleet bench realmodel` without llama.cpp (a tiny model stands in for the GGUF): the rows, the ratios,
and the options after `--` reaching `kvfleet bench engine`."""

import json

from cluster.cli import build_parser


def test_realmodel_passes_engine_options_through(model_dirs, tmp_path):
    out = tmp_path / "realmodel.json"
    command = f"bench realmodel --model {model_dirs['llama']} --batch-sizes 2 --repeats 2 --json {out}"
    engine_flags = ["--", "--min-prompt", "4", "--max-prompt", "8", "--min-output", "2", "--max-output", "2"]
    args = build_parser().parse_args([*command.split(), *engine_flags, "--seed", "3"])
    args.func(args)
    report = json.loads(out.read_text())
    assert report["engine_args"] == [*engine_flags[1:], "--seed", "3"]
    assert [run["num_requests"] for run in report["runs"]] == [2]
    for run in report["runs"]:
        assert set(run["rows"]) == {"kvfleet", "transformers"}  # no --llamacpp-python: no llama.cpp row
        for system, row in run["rows"].items():  # of two repeats, the slower one (the lower median)
            tries = [r["output_tokens_per_s"] for r in run["all_rows"] if r["system"] == system]
            assert len(tries) == 2 and row["output_tokens_per_s"] == min(tries)
        for row in run["rows"].values():
            assert row["num_requests"] == run["num_requests"]
            assert row["output_tokens"] == 2 * run["num_requests"]  # --min/--max-output 2 reached the engine bench
            assert 4 * run["num_requests"] <= row["prompt_tokens"] <= 8 * run["num_requests"]
        ratios = run["ratios"]
        assert ratios["kvfleet_over_llamacpp"] is None and ratios["transformers_over_llamacpp"] is None
        kv, hf = run["rows"]["kvfleet"], run["rows"]["transformers"]
        assert ratios["kvfleet_over_transformers"] == kv["output_tokens_per_s"] / hf["output_tokens_per_s"]
