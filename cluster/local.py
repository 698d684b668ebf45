"""Running a kvfleet cluster from this process: `kvfleet serve` and the integration tests.

`ServeCluster(config).start()` brings up, in order, what the config leaves to it:
  1. a private Redis-protocol server on a free port, when `config.index` is None (local mode),
     supervised: if it dies it is restarted on the same port within a fraction of a second, and
     the replicas write their pages into it again (`kvstore.redis_server`, `kvstore.publisher`);
  2. a local Ray with its dashboard, when `config.ray.address` is None (else it connects). With
     `ray.dashboard_host` on loopback (the default) Ray runs as a one-machine cluster on
     127.0.0.1, so the dashboard, its agents' HTTP ports and every Prometheus metrics port bind
     loopback only; another `dashboard_host` (e.g. 0.0.0.0) exposes them on the machine's address;
  3. Ray Serve with its gRPC proxy (`config.grpc.port`) and the kvfleet application,
     reporting progress while replicas load the model, and returning once all are RUNNING.
`stop()` (or leaving the `with` block) takes down what it started, in reverse order.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from cluster.config import ClusterConfig
from kvstore.index import IndexConfig
from kvstore.redis_server import LocalRedisServer, free_port


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ClusterStartError(RuntimeError):
    """The application did not reach RUNNING (a replica failed to start, or the wait timed out)."""


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _ray_on_loopback() -> None:
    """Make the local Ray about to start a one-machine cluster on 127.0.0.1.

    Ray binds its agents' HTTP ports and its metrics ports (dashboard, autoscaler, each node's
    export port) on the node's IP, and on loopback only when that IP is loopback. On Linux it
    takes the machine's reachable address even if told 127.0.0.1; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    gives it the macOS/Windows default, loopback. The variable reaches the processes Ray starts;
    this process read it when it imported Ray, so its copy is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


class ServeCluster:
    """`index_settings`: IndexConfig fields for the private index of local mode (ignored when the
    config names an index); tests use it for fast heartbeats."""

    def __init__(
        self, config: ClusterConfig, progress: Callable[[str], None] = _stderr, index_settings: dict | None = None
    ):
        self.config = config
        self.progress = progress
        self.index_settings = index_settings or {}
        self.redis: LocalRedisServer | None = None
        self._started_ray = False
        self.grpc_port = config.grpc.port or free_port()
        self.http_port = config.grpc.http_port or free_port()
        self.dashboard_url: str | None = None

    @property
    def grpc_target(self) -> str:
        host = "127.0.0.1" if self.config.grpc.host in ("0.0.0.0", "::", "127.0.0.1") else self.config.grpc.host
        return f"{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible HTTP API's base URL (Serve's HTTP proxy), e.g. for `openai.OpenAI(base_url=...)`."""
        host = self.grpc_target.rsplit(":", 1)[0]
        return f"http://{host}:{self.http_port}/v1"

    def start(self, timeout_s: float = 600.0) -> ServeCluster:
        import ray
        from ray import serve

        from cluster import bind
        from cluster.app import build_app, controller_options, grpc_options

        try:
            if self.config.index is None:
                self.redis = LocalRedisServer().start().supervise()
                index = IndexConfig(**{**self.index_settings, "redis_url": self.redis.url})
                self.config = self.config.model_copy(update={"index": index})
                self.progress(f"page index: private Redis-protocol server at {self.redis.url}")
                if self.config.ray.address is not None:
                    self.progress(
                        "warning: no index.redis_url in the config, so the page index lives on this machine's "
                        "loopback; replicas on other nodes of the Ray cluster cannot reach it and route by load "
                        "alone. Set index.redis_url to a Redis every node reaches."
                    )
            if self.config.ray.address is None and not ray.is_initialized():
                rc = self.config.ray
                if rc.dashboard_host in _LOOPBACK:
                    _ray_on_loopback()
                context = ray.init(
                    num_cpus=rc.num_cpus,
                    namespace=rc.namespace,
                    include_dashboard=rc.include_dashboard,
                    dashboard_host=rc.dashboard_host,
                    dashboard_port=rc.dashboard_port or None,
                    logging_level="warning",
                    log_to_driver=False,
                    runtime_env=bind.runtime_env(self.config.grpc.host),
                )
                self._started_ray = True
                self.dashboard_url = getattr(context, "dashboard_url", None)
            elif not ray.is_initialized():
                context = ray.init(
                    address=self.config.ray.address,
                    namespace=self.config.ray.namespace,
                    runtime_env=bind.runtime_env(self.config.grpc.host),
                )
                self.dashboard_url = getattr(context, "dashboard_url", None)
            if self.dashboard_url and "://" not in self.dashboard_url:
                self.dashboard_url = f"http://{self.dashboard_url}"
            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our progress lines say it shorter
            serve.start(
                http_options={"host": self.config.grpc.host, "port": self.http_port},
                grpc_options={**grpc_options(self.config), "port": self.grpc_port},
                controller_options=controller_options(self.config),
            )
            self.progress(
                f"deploying {self.config.model_id}: {self.config.target.replicas} TargetWorker replica(s) "
                f"on {self.config.engine.device}, {self.config.ingress.replicas} ingress replica(s)"
            )
            serve.run_many(
                [serve.api.RunTarget(build_app(self.config), name=self.config.app_name, route_prefix="/")],
                wait_for_applications_running=False,
            )
            self._wait_running(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_running(self, timeout_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            app = serve.status().applications.get(self.config.app_name)
            if app is not None:
                parts = []
                for name, dep in sorted(app.deployments.items()):
                    counts = ", ".join(f"{n} {str(state).lower()}" for state, n in sorted(dep.replica_states.items()))
                    parts.append(f"{name}: {counts or dep.status.value.lower()}")
                line = f"  {app.status.value.lower()}: " + "; ".join(parts)
                if line != last:
                    self.progress(line)
                    last = line
                if app.status.value == "RUNNING":
                    return
                if app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise ClusterStartError(f"the application failed to start: {app.message}")
            if time.monotonic() > deadline:
                raise ClusterStartError(f"the application was not RUNNING after {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                if self._started_ray:
                    ray.shutdown()
                    self._started_ray = False
        if self.redis is not None:
            self.redis.close()
            self.redis = None

    def __enter__(self) -> ServeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
