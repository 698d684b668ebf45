"""The servicer functions Serve's gRPC proxy registers (`grpc_options.grpc_servicer_functions`):
the generated ones, with raw-bytes requests.

Serve's proxy keeps each method's request deserializer and decodes the request before any of
kvfleet's code runs, so a malformed message would end as UNKNOWN ("Unexpected DecodeError") and
a known field with the wrong wire type as silent defaults. Registered through these functions,
the proxy forwards the client's bytes unchanged and the ingress decodes them (router/wire.py),
answering INVALID_ARGUMENT with a sentence. Responses are unchanged: the proxy sends the bytes the
ingress's messages serialize to.
"""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health_pb2_grpc

from protos.kvfleet.v1 import generation_pb2_grpc

GRPC_SERVICER_FUNCTIONS = [
    "router.services.add_generation_servicer_to_server",
    "router.services.add_health_servicer_to_server",
]


def add_generation_servicer_to_server(servicer, server) -> None:
    _add_raw(generation_pb2_grpc.add_GenerationServicer_to_server, servicer, server)


def add_health_servicer_to_server(servicer, server) -> None:
    _add_raw(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)


def _raw(handlers: dict) -> dict:
    return {name: handler._replace(request_deserializer=None) for name, handler in handlers.items()}


class _RawRequests:
    """The server as the generated `add_*_to_server` sees it: its handlers lose their request
    deserializers on the way in."""

    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for handler in generic_handlers:
            handler._method_handlers = _raw(handler._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:
            add(service_name, _raw(method_handlers))


def _add_raw(generated: Callable, servicer, server) -> None:
    generated(servicer, _RawRequests(server))
