"""cluster/bind.py: the address Serve's gRPC proxy binds, from grpc.host."""

from __future__ import annotations

from cluster.bind import HOOK, HOST_ENV, bind_address, runtime_env


def test_serves_any_address_becomes_the_configured_host():
    assert bind_address("[::]:50051", "127.0.0.1") == "127.0.0.1:50051"
    assert bind_address("[::]:0", "::1") == "[::1]:0"
    assert bind_address("10.0.0.5:50051", "127.0.0.1") == "10.0.0.5:50051"  # not Serve's wildcard: untouched


def test_the_hook_is_set_only_for_a_specific_host():
    assert runtime_env("0.0.0.0") is None and runtime_env("::") is None
    assert runtime_env("127.0.0.1") == {"worker_process_setup_hook": HOOK, "env_vars": {HOST_ENV: "127.0.0.1"}}
