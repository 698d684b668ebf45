"""Make Ray Serve's gRPC proxy listen on `grpc.host`, not on every interface.

Ray Serve 2.60 binds its gRPC proxy to `[::]:<port>` whatever `http_options.host` says
(`ray.serve._private.grpc_util.start_grpc_server` calls `default_impl.add_grpc_address(server,
f"[::]:{port}")`; `gRPCOptions` has no host field). `default_impl` is Serve's module of
replaceable implementations, and `add_grpc_address` is looked up in it at every call, so
replacing that one function in the proxy's process is the smallest change that binds the
configured host: the port, the servicers and everything else stay Serve's.

`install` is a Ray `worker_process_setup_hook`: `ServeCluster` (cluster/local.py) sets it in the
runtime_env of the Ray job that starts Serve, with the host in `KVFLEET_GRPC_HOST`; the Serve
controller inherits the job's runtime_env and the proxies inherit the controller's. On a Ray
cluster whose Serve was started elsewhere (KubeRay's serveConfigV2) the proxies bind every
interface, as Serve does; there the Kubernetes Service decides who reaches the port.
"""

from __future__ import annotations

import logging
import os

HOST_ENV = "KVFLEET_GRPC_HOST"
HOOK = "cluster.bind.install"

logger = logging.getLogger(__name__)


def runtime_env(host: str) -> dict | None:
    """The runtime_env entries that make the proxies bind `host` (None: every interface anyway)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return {"worker_process_setup_hook": HOOK, "env_vars": {HOST_ENV: host}}


def bind_address(address: str, host: str) -> str:
    """`[::]:50051` -> `127.0.0.1:50051` (IPv6 hosts in brackets); other addresses unchanged."""
    if not address.startswith("[::]:"):
        return address
    port = address.rsplit(":", 1)[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def install() -> None:
    host = os.environ.get(HOST_ENV, "")
    if host in ("", "0.0.0.0", "::"):
        return
    try:
        from ray.serve._private import default_impl
    except ImportError:  # a worker without Serve: nothing to bind
        return
    original = getattr(default_impl, "add_grpc_address", None)
    if original is None:
        logger.warning("this Ray Serve has no default_impl.add_grpc_address: its gRPC proxy binds every interface")
        return
    if getattr(original, "kvfleet_host", None) == host:
        return

    def add_grpc_address(server, address: str):
        return original(server, bind_address(address, host))

    add_grpc_address.kvfleet_host = host
    default_impl.add_grpc_address = add_grpc_address
