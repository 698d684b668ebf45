"""`kvfleet bench serve`'s workload defaults: its own, `--tiers`'s where that sets one, and a flag
given on the command line over both."""

import argparse

from cluster.bench.serve import TIERS_DEFAULTS, WORKLOAD_DEFAULTS, _fill_defaults, add_serve_parser


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    _fill_defaults(args)
    return args


def test_tiers_takes_its_own_workload_defaults_and_a_given_flag_wins():
    plain, tiers = parse(), parse("--tiers")
    assert all(getattr(plain, k) == v for k, v in WORKLOAD_DEFAULTS.items())
    assert all(getattr(tiers, k) == TIERS_DEFAULTS.get(k, v) for k, v in WORKLOAD_DEFAULTS.items())
    # the hot prefixes outgrow one replica's pool: more system-prompt pages than the pool holds
    assert tiers.system_prompts * tiers.system_len > tiers.num_pages * 16
    given = parse("--tiers", "--num-pages", "256", "--rate", "2")
    assert (given.num_pages, given.rate, given.users) == (256, 2.0, TIERS_DEFAULTS["users"])
