"""Decode a request from its bytes, refusing what protobuf would reject or silently misread.

The ingress registers its services with raw-bytes request deserializers (router/services.py), so
Serve's gRPC proxy hands it the bytes the client sent and every undecodable request is answered
here with INVALID_ARGUMENT and a sentence naming the field, instead of the proxy's UNKNOWN
("Unexpected DecodeError"). Before `ParseFromString`, one pass over the wire format checks what
protobuf itself would not report, or not in a user's words:

- truncated or garbage bytes (where: "truncated at byte 17");
- a string field that is not UTF-8 (which field, at which byte);
- a known field sent with another wire type (protobuf keeps it as an unknown field, so a
  malformed `sampling` would silently become the defaults);
- an int32 field whose varint does not fit 32 bits (protobuf truncates it: 2^32 would read 0).

Unknown field numbers pass (a newer client may send fields this server does not know). The pass
skips the bytes of strings and packed numbers, so its cost grows with the number of fields, not
with the length of the prompt.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from workers.request import InvalidRequestError

_VARINT, _FIXED64, _LEN, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5
_WIRE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 3: "group", 4: "group end", 5: "fixed32"}

_F = FieldDescriptor
_WIRE_OF_TYPE = {
    **dict.fromkeys((_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64), _VARINT),
    **dict.fromkeys((_F.TYPE_SINT32, _F.TYPE_SINT64, _F.TYPE_BOOL, _F.TYPE_ENUM), _VARINT),
    **dict.fromkeys((_F.TYPE_FIXED64, _F.TYPE_SFIXED64, _F.TYPE_DOUBLE), _FIXED64),
    **dict.fromkeys((_F.TYPE_FIXED32, _F.TYPE_SFIXED32, _F.TYPE_FLOAT), _FIXED32),
    **dict.fromkeys((_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE), _LEN),
}
_INT32_LIMIT = 2**31
_UINT64 = 2**64


def decode(data: bytes | Message, message_type: type[Message]) -> Message:
    """The message in `data`; in-process callers may pass the message itself."""
    if isinstance(data, message_type):
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequestError("request", f"expected a serialized {message_type.DESCRIPTOR.full_name}")
    data = bytes(data)
    _check(data, 0, len(data), message_type.DESCRIPTOR, "")
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as e:  # the pass above should have named it; this is the backstop
        raise InvalidRequestError(
            "request", f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {e}"
        ) from None
    return message


def _is_repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before (gone in 7)
    return is_repeated if is_repeated is not None else field.label == _F.LABEL_REPEATED


def _not_protobuf(what: str, pos: int) -> InvalidRequestError:
    return InvalidRequestError(
        "request", f"the request is not a valid protobuf message: {what} at byte {pos}; check the client's stub"
    )


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _not_protobuf("truncated varint", start)
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _not_protobuf("varint longer than 10 bytes", start)


def _check(data: bytes, pos: int, end: int, desc: Descriptor, prefix: str) -> None:
    seen: dict[int, int] = {}
    while pos < end:
        key_pos = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or wire in (6, 7):
            raise _not_protobuf(f"invalid field key {key}", key_pos)
        field = desc.fields_by_number.get(number)
        path = ""
        if field is not None:
            path = prefix + field.name
            repeated = _is_repeated(field)
            if repeated:
                index = seen.get(number, 0)
                seen[number] = index + 1
                if field.type == _F.TYPE_MESSAGE or field.type == _F.TYPE_STRING:
                    path = f"{path}[{index}]"
            expected = _WIRE_OF_TYPE[field.type]
            packed_ok = repeated and expected != _LEN and wire == _LEN
            if wire != expected and not packed_ok:
                raise InvalidRequestError(
                    path,
                    f"{path} was sent as a {_WIRE_NAMES[wire]} field, but it is a "
                    f"{_WIRE_NAMES[expected]} field of {desc.full_name}: the client was built from another schema",
                )
        if wire == _VARINT:
            value, pos = _varint(data, pos, end)
            if field is not None and field.type == _F.TYPE_INT32 and _INT32_LIMIT <= value < _UINT64 - _INT32_LIMIT:
                raise InvalidRequestError(path, f"{path} is {value}, outside int32 [-2^31, 2^31 - 1]")
            if field is not None and field.type == _F.TYPE_UINT32 and value >= 2**32:
                raise InvalidRequestError(path, f"{path} is {value}, outside uint32 [0, 2^32 - 1]")
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise _not_protobuf("truncated fixed-size field", key_pos)
        elif wire == _LEN:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _not_protobuf(f"truncated field ({length} bytes announced, {end - pos} left)", key_pos)
            if field is not None and field.type == _F.TYPE_MESSAGE:
                _check(data, pos, pos + length, field.message_type, path + ".")
            elif field is not None and field.type == _F.TYPE_STRING:
                try:
                    data[pos : pos + length].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidRequestError(
                        path, f"{path} is not valid UTF-8 (byte {e.start} of the string, {e.reason})"
                    ) from None
            pos += length
        else:
            raise _not_protobuf("groups are not part of this API", key_pos)
    if pos != end:
        raise _not_protobuf("a field runs past its message", end)
