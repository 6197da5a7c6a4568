"""The bytes of a gRPC health check, hand-built, for HAProxy's tcp-check.

HAProxy 2.6 cannot send a gRPC request from `option httpchk` (no NUL bytes
in a body, and a gRPC error still arrives as HTTP 200), so in `mode tcp` we
send the whole HTTP/2 exchange ourselves with `tcp-check send-binary` and look
for the health reply's bytes with `tcp-check expect binary`.

The exchange is: the client connection preface, an empty SETTINGS frame, one
HEADERS frame (stream 1) for `POST /grpc.health.v1.Health/Check`, and one
DATA frame with END_STREAM carrying a length-prefixed HealthCheckRequest.
The header block uses HPACK "literal header field without indexing, new
name" with plain (non-Huffman) strings: valid for every decoder, and it
leaves no state in the server's dynamic table.

A gRPC reply's DATA payload is `00` (not compressed) + a 4-byte length +
the HealthCheckResponse, whose only field is `status` (field 1, varint):
SERVING is `00 00000002 0801`, NOT_SERVING `00 00000002 0802`.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEALTH_PATH = "/grpc.health.v1.Health/Check"

FRAME_DATA = 0x0
FRAME_HEADERS = 0x1
FRAME_SETTINGS = 0x4
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4

SERVING = 1
NOT_SERVING = 2

# The reply's gRPC message up to (not including) the status value: compressed
# flag 0, length 2, field 1 varint tag 0x08. The status byte comes next.
REPLY_PREFIX = b"\x00\x00\x00\x00\x02\x08"


def hpack_int(value: int, prefix_bits: int, first_byte_flags: int = 0) -> bytes:
    """RFC 7541 section 5.1 integer with an N-bit prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = bytearray([first_byte_flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(text: str) -> bytes:
    """A string literal without Huffman coding (H bit 0, 7-bit length prefix)."""
    raw = text.encode("ascii")
    return hpack_int(len(raw), 7) + raw


def hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name (first byte 0x00)."""
    return b"\x00" + hpack_string(name) + hpack_string(value)


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """An HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    if len(payload) >= 1 << 24:
        raise ValueError("frame payload too large")
    return struct.pack(">I", len(payload))[1:] + bytes([frame_type, flags]) + struct.pack(">I", stream_id & 0x7FFFFFFF) + payload


def health_request_message(service: str = "") -> bytes:
    """A HealthCheckRequest in gRPC's length-prefixed framing.

    The protobuf is written by hand (field 1, wire type 2) so this module has
    no dependency on generated code; an empty service name is an empty
    message, which asks for the server's overall status.
    """
    body = b""
    if service:
        raw = service.encode("utf-8")
        body = b"\x0a" + proto_varint(len(raw)) + raw
    return b"\x00" + struct.pack(">I", len(body)) + body


def proto_varint(value: int) -> bytes:
    """A protobuf base-128 varint (used for the message length above)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def health_check_request(authority: str = "localhost", service: str = "", scheme: str = "http") -> bytes:
    """The whole client side of the exchange, ready for `tcp-check send-binary`
    (`scheme` "https" when HAProxy sends it inside TLS with check-ssl)."""
    headers = b"".join(
        hpack_literal(name, value)
        for name, value in (
            (":method", "POST"),
            (":scheme", scheme),
            (":path", HEALTH_PATH),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    return (
        PREFACE
        + frame(FRAME_SETTINGS, 0, 0, b"")
        + frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, headers)
        + frame(FRAME_DATA, FLAG_END_STREAM, 1, health_request_message(service))
    )


def reply_pattern(status: int = SERVING) -> bytes:
    """The bytes a reply with `status` contains (`tcp-check expect binary`)."""
    return REPLY_PREFIX + bytes([status])
