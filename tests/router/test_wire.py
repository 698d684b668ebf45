"""Requests decoded from the client's bytes (router/wire.py) and the raw-bytes servicer functions
(router/services.py): every undecodable request is an InvalidRequestError naming the field."""

from __future__ import annotations

from unittest.mock import Mock

import grpc
import pytest

from protos.kvfleet.v1 import generation_pb2 as pb
from router.services import add_generation_servicer_to_server, add_health_servicer_to_server
from router.wire import decode
from workers.request import InvalidRequestError

HI = pb.GenerateRequest(text="hi").SerializeToString()


def refused(data: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        decode(data, pb.GenerateRequest)
    return err.value


def test_a_valid_request_decodes_as_protobuf_does():
    request = pb.GenerateRequest(
        text="héllo",
        sampling=pb.SamplingParams(max_tokens=-5, stop=["a", "b"], stop_token_ids=[1, 2], seed=2**64 - 1),
        request_id="r",
    )
    assert decode(request.SerializeToString(), pb.GenerateRequest) == request
    chat = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="x")] * 3))
    assert decode(chat.SerializeToString(), pb.GenerateRequest) == chat
    assert decode(request, pb.GenerateRequest) is request  # in-process callers pass the message


def test_unknown_fields_pass_for_newer_clients():
    assert decode(HI + b"\xf8\x01\x07", pb.GenerateRequest).text == "hi"  # field 31, varint 7


def test_invalid_utf8_names_the_string_field():
    err = refused(b"\x12\x03a\xffb")
    assert err.field == "text" and "not valid UTF-8" in str(err)
    chat = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="u", content="x")] * 2))
    data = chat.SerializeToString()
    err = refused(data[: len(data) - 1] + b"\xff")
    assert err.field == "chat.messages[1].content"


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff\xff", HI[:-1], b"\x12\x10ab", b"\x00", b"\xfb\x01\x00"],
    ids=["garbage", "truncated", "short", "field-0", "group"],
)
def test_truncated_or_garbage_bytes_are_not_a_protobuf_message(data):
    err = refused(data)
    assert err.field == "request" and "not a valid protobuf message" in str(err)


def test_a_known_field_with_the_wrong_wire_type_is_refused_not_defaulted():
    err = refused(HI + b"\x28\x05")  # sampling (field 5) sent as a varint
    assert err.field == "sampling" and "another schema" in str(err)
    err = refused(HI + b"\x2a\x02\x10\x01")  # sampling.temperature (a float) sent as a varint
    assert err.field == "sampling.temperature"
    err = refused(HI + b"\x30\x01")  # request_id (a string) sent as a varint
    assert err.field == "request_id"
    packed = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])).SerializeToString()
    unpacked = b"\x1a\x04\x08\x01\x08\x02"  # the same ids, one varint field each: both are valid
    assert decode(packed, pb.GenerateRequest) == decode(unpacked, pb.GenerateRequest)


def test_int32_overflow_reports_the_value_not_zero():
    err = refused(HI + b"\x2a\x06\x08\x80\x80\x80\x80\x10")  # sampling.max_tokens = 2^32
    assert err.field == "sampling.max_tokens" and "4294967296" in str(err) and "int32" in str(err)


class _Server:
    def __init__(self):
        self.generic, self.registered = [], {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = handlers


def test_servicer_functions_register_raw_bytes_requests():
    server = _Server()
    servicer = Mock()  # Serve's proxy registers a Mock too: only the handlers' codecs matter here
    add_generation_servicer_to_server(servicer, server)
    add_health_servicer_to_server(servicer, server)
    handlers = [h for g in server.generic for h in g._method_handlers.values()]
    handlers += [h for methods in server.registered.values() for h in methods.values()]
    assert len(handlers) >= 5 and all(isinstance(h, grpc.RpcMethodHandler) for h in handlers)
    assert all(h.request_deserializer is None for h in handlers)
    assert all(h.response_serializer is not None for h in handlers)
    assert {"kvfleet.v1.Generation", "grpc.health.v1.Health"} <= set(server.registered)
