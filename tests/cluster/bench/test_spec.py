"""`kvfleet bench spec` without Ray (n-gram and in-process draft rows): one target engine, with the
threads it was given, runs every row and the baseline they share, and the report says so."""

import argparse
import json

import pytest
import torch

from cluster.bench.spec import _target_threads, add_arguments
from cluster.cli import build_parser


def test_every_row_runs_on_one_target_with_the_same_threads_beside_one_baseline(tmp_path):
    out = tmp_path / "spec.json"
    threads = torch.get_num_threads()
    command = (
        "bench spec --device cpu --proposers ngram draft --batch-sizes 1 --ks 2 --max-tokens 8 --repeats 2 "
        f"--num-pages 256 --max-model-len 256 --cpu-threads 1 --json {out}"
    )
    args = build_parser().parse_args(command.split())
    try:
        args.func(args)
    finally:
        torch.set_num_threads(threads)  # the engine set the process's threads
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["proposer"] for r in rows] == ["ngram", "draft"]
    assert report["cpu_threads"] == 1 and all(r["target_threads"] == 1 for r in rows)
    assert rows[0]["baseline_tok_per_s"] == rows[1]["baseline_tok_per_s"]  # timed in turn with them both
    assert "1 torch threads" in report["like_for_like"]
    assert len(report["load_average_at_start"]) == len(report["load_average_at_end"]) == 3
    for r in rows:
        assert r["identical_output"] is True  # greedy: speculation changes no token
        assert r["verify_ms_per_step"] > 0 and r["draft_ms_per_call"] > 0
    assert report["replicas_vs_in_process"] == []  # no replicas row asked for


@pytest.mark.parametrize(
    "flags, threads",
    [
        ("--proposers draft", 8),  # no replica: torch's default
        ("--proposers draft replicas --draft-replicas 1", 7),  # the cores the replica does not reserve
        ("--proposers draft replicas --draft-replicas 2 --draft-num-cpus 2", 4),
        ("--proposers replicas --draft-replicas 1 --draft-cpu-threads 3", 5),
        ("--proposers replicas --draft-replicas 9", 1),  # at least one
    ],
)
def test_beside_draft_replicas_the_target_gets_the_cores_they_do_not_reserve(flags, threads, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert _target_threads(parser.parse_args(["--device", "cpu", *flags.split()])) == threads
