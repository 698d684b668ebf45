"""The `kvfleet generate` and `kvfleet status` commands: the Python client on the command line.

    kvfleet generate --stream "Write a haiku about pages"     text on stdout, a usage line on stderr
    kvfleet status [--json]                                    one line per replica: load, pages, hit rate

`add_client_commands(subparsers)` plugs both into the `kvfleet` parser. The cluster is found at
`--target`, else $KVFLEET_TARGET, else 127.0.0.1:50051; a bearer token comes from `--token`, else
$KVFLEET_TOKEN (so it need not sit in shell history). The environment is read here and nowhere in the
client. A failed call prints `error: <CODE>: <details>` on stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

import grpc

from cluster.client import DEFAULT_TARGET, ClientConfig, ClusterStatus, KvfleetClient, KvfleetError, Usage


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` and `status` to the `kvfleet` subcommands (each sets `func`)."""
    gen = subparsers.add_parser("generate", help="generate from a running cluster over gRPC")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--stream", action="store_true", help="print the text as it arrives")
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template)")
    gen.add_argument("--model", default="", help="model id (default: the cluster's only model)")
    gen.add_argument("--max-tokens", type=int, help="tokens to generate (server default: 16)")
    gen.add_argument("--temperature", type=float, help="0 is greedy (the server default)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int, help="reproducible sampling")
    _add_connection_args(gen)
    gen.set_defaults(func=cmd_generate)

    status = subparsers.add_parser("status", help="replicas of a running cluster: load, KV pages, prefix-cache hits")
    status.add_argument("--model", default="", help="model id (default: the cluster's only model)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_connection_args(status)
    status.set_defaults(func=cmd_status)


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    conn = parser.add_argument_group("connection")
    conn.add_argument("--target", help=f"host:port (default: $KVFLEET_TARGET or {DEFAULT_TARGET})")
    conn.add_argument("--token", help="bearer token (default: $KVFLEET_TOKEN)")
    conn.add_argument("--tls", action="store_true", help="connect with TLS")
    conn.add_argument("--ca", help="PEM file of the CAs to trust (implies --tls)")
    conn.add_argument("--application", help="Ray Serve application name, when the cluster serves several")
    conn.add_argument("--timeout", type=float, help="deadline in seconds, retries included")


def client_config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        target=args.target or os.environ.get("KVFLEET_TARGET") or DEFAULT_TARGET,
        tls=args.tls,
        root_certificates=args.ca,
        bearer_token=args.token or os.environ.get("KVFLEET_TOKEN") or None,
        timeout_s=args.timeout,
        application=args.application,
    )


@contextlib.contextmanager
def _exit_on_rpc_error() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        # KvfleetError and grpc's own errors alike: a user wants the code and the sentence, not a traceback.
        print(f"error: {KvfleetError.from_rpc(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, ValueError) as err:  # an unreadable --ca file, a bad option value
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    parts: list[str] = []
    finish_reason, usage, replica = None, None, ""
    ttft_s = None
    with _exit_on_rpc_error(), KvfleetClient(client_config(args)) as client:
        start = time.perf_counter()
        try:
            for chunk in client.generate(
                prompt,
                model=args.model,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
            ):
                if ttft_s is None:
                    ttft_s = time.perf_counter() - start
                if args.stream:
                    print(chunk.text, end="", flush=True)
                parts.append(chunk.text)
                finish_reason = chunk.finish_reason or finish_reason
                usage = chunk.usage or usage
                replica = chunk.replica or replica
        finally:
            if args.stream and parts:
                print(flush=True)  # end the streamed line before any usage or error line on stderr
        total_s = time.perf_counter() - start
    if not args.stream:
        print("".join(parts))
    print(usage_line(finish_reason, usage, replica, ttft_s, total_s), file=sys.stderr)


def usage_line(
    finish_reason: str | None, usage: Usage | None, replica: str, ttft_s: float | None, total_s: float
) -> str:
    counts = (
        f"prompt {usage.prompt_tokens} tokens ({usage.cached_prompt_tokens} cached), "
        f"completion {usage.completion_tokens} tokens"
        if usage
        else "no usage reported"
    )
    ttft = f"{ttft_s * 1e3:.1f} ms" if ttft_s is not None else "-"
    finish = finish_reason or "unfinished"
    return f"[{finish}] {counts}, replica {replica or '-'}, ttft {ttft}, total {total_s * 1e3:.1f} ms"


def cmd_status(args: argparse.Namespace) -> None:
    with _exit_on_rpc_error(), KvfleetClient(client_config(args)) as client:
        status = client.status(args.model)
    print(json.dumps(status_json(status), indent=2) if args.json else status_table(status))


def status_json(status: ClusterStatus) -> dict:
    replicas = [
        {**asdict(r), "page_usage": r.page_usage, "prefix_cache_hit_rate": r.prefix_cache_hit_rate}
        for r in status.replicas
    ]
    return {"model": status.model, "index_reachable": status.index_reachable, "replicas": replicas}


def status_table(status: ClusterStatus) -> str:
    index = "reachable" if status.index_reachable else "UNREACHABLE (no replica heartbeats can be read)"
    lines = [f"model {status.model or '-'}: {len(status.replicas)} replicas, page index {index}"]
    if not status.replicas:
        return "\n".join(lines)
    rows = [("REPLICA", "WAITING", "RUNNING", "FREE/TOTAL PAGES", "USED", "PREFIX HITS", "FINISHED")]
    for r in status.replicas:
        rate = r.prefix_cache_hit_rate
        hits = f"{rate:.1%} ({r.prefix_cache_hits}/{r.prefix_cache_queries})" if rate is not None else "-"
        rows.append(
            (
                r.replica,
                str(r.num_waiting),
                str(r.num_running),
                f"{r.num_free_pages}/{r.num_total_pages}",
                f"{r.page_usage:.1%}",
                hits,
                str(r.num_requests_finished),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)
