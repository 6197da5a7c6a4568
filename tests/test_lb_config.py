"""lb/: the hand-built HTTP/2 health check decodes as well-formed frames, and
every configuration the renderer produces passes `haproxy -c`."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from lb import h2check, render

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


# --- an independent, minimal HTTP/2 + HPACK reader (only what the check uses) ---

def read_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split a frame sequence; fails if a length field does not match the bytes."""
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9, "truncated frame header"
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        (stream,) = struct.unpack(">I", data[pos + 5:pos + 9])
        assert stream >> 31 == 0, "reserved bit set"
        payload = data[pos + 9:pos + 9 + length]
        assert len(payload) == length, "frame length runs past the data"
        frames.append((ftype, flags, stream, payload))
        pos += 9 + length
    return frames


def read_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def read_string(block: bytes, pos: int) -> tuple[str, int]:
    assert not block[pos] & 0x80, "Huffman-coded string"
    length, pos = read_int(block, pos, 7)
    raw = block[pos:pos + length]
    assert len(raw) == length, "string runs past the block"
    return raw.decode("ascii"), pos + length


def decode_literal_block(block: bytes) -> list[tuple[str, str]]:
    """HPACK block made only of 'literal without indexing, new name' fields."""
    headers = []
    pos = 0
    while pos < len(block):
        assert block[pos] == 0x00, f"unexpected representation byte {block[pos]:#x}"
        name, pos = read_string(block, pos + 1)
        value, pos = read_string(block, pos)
        headers.append((name, value))
    return headers


# --- tests ---

def test_hpack_integer_encoding_matches_rfc_examples():
    # RFC 7541 C.1.1-C.1.3.
    assert h2check.hpack_int(10, 5) == bytes([0b01010])
    assert h2check.hpack_int(1337, 5) == bytes([0b11111, 0b10011010, 0b00001010])
    assert h2check.hpack_int(42, 8) == bytes([42])
    for value in (0, 126, 127, 128, 300, 70000):
        assert read_int(h2check.hpack_int(value, 7), 0, 7) == (value, len(h2check.hpack_int(value, 7)))


@pytest.mark.parametrize("service", ["", "sutra.mlbase.v1.MLBaseService"])
def test_health_check_request_is_well_formed_http2(service):
    data = h2check.health_check_request("replica.example:50061", service)
    assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    frames = read_frames(data[len(h2check.PREFACE):])
    assert [(t, f, s) for t, f, s, _ in frames] == [
        (h2check.FRAME_SETTINGS, 0, 0),
        (h2check.FRAME_HEADERS, h2check.FLAG_END_HEADERS, 1),
        (h2check.FRAME_DATA, h2check.FLAG_END_STREAM, 1),
    ]
    settings, headers, body = (p for _, _, _, p in frames)
    assert settings == b""
    decoded = decode_literal_block(headers)
    assert decoded == [
        (":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "replica.example:50061"), ("content-type", "application/grpc"), ("te", "trailers"),
    ]
    # gRPC length-prefixed message: not compressed, 4-byte length, then the protobuf.
    assert body[0] == 0
    (length,) = struct.unpack(">I", body[1:5])
    assert length == len(body) - 5
    from grpc_health.v1 import health_pb2
    assert health_pb2.HealthCheckRequest.FromString(body[5:]).service == service
    if not service:
        assert body == bytes.fromhex("0000000000")


def test_reply_patterns_are_the_serialized_health_responses():
    from grpc_health.v1 import health_pb2
    for status in (h2check.SERVING, h2check.NOT_SERVING):
        message = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert h2check.reply_pattern(status) == b"\x00" + struct.pack(">I", len(message)) + message
    assert h2check.reply_pattern(h2check.SERVING).hex() == "00000000020801"
    assert h2check.reply_pattern(h2check.NOT_SERVING).hex() == "00000000020802"


def haproxy_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("replicas", [
    ("127.0.0.1:50061",),
    ("127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"),
    tuple(f"10.0.0.{i}:50061" for i in range(1, 9)),
])
def test_rendered_configs_pass_haproxy_check(tmp_path, replicas):
    settings = render.LbSettings(replicas=replicas, socket=str(tmp_path / "haproxy.sock"))
    text = render.render(settings)
    result = haproxy_check(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    for name, address in zip(settings.names(), replicas):
        assert f"server {name} {address}" in text


def test_config_carries_the_required_directives(tmp_path):
    settings = render.LbSettings(replicas=("127.0.0.1:50061", "127.0.0.1:50062"),
                                 socket=str(tmp_path / "s.sock"), port=50060, stats_port=9999)
    text = render.render(settings)
    for needle in [
        "mode tcp", "balance leastconn", "option tcp-check", "option redispatch", "retries 3",
        "observe layer4", "on-marked-down shutdown-sessions",
        "inter 1000ms fastinter 500ms", "fall 2 rise 2",
        "tcp-check expect binary 000000000208 ", "binary 00000000020801 ",
        f"tcp-check send-binary {h2check.health_check_request(settings.authority).hex()} ",
        "bind 127.0.0.1:50060", "bind 127.0.0.1:9999", "stats uri /stats",
        "http-request use-service prometheus-exporter if { path /metrics }",
        f"stats socket {tmp_path / 's.sock'} mode 600 level admin",
        "timeout client 60s", "timeout server 60s", "tcp-request inspect-delay 3000ms",
        "tcp-request content accept if { req.len gt 0 }", "tcp-request content reject",
        "maxconn 8000", "default-server maxconn 256 check",
    ]:
        assert needle in text, needle
    # A health-check service name changes the bytes that are sent.
    other = render.render(render.LbSettings(replicas=settings.replicas, socket=settings.socket,
                                            health_service="sutra.mlbase.v1.MLBaseService"))
    assert other != text
    assert haproxy_check(other, tmp_path).returncode == 0


def test_haproxy_has_the_prometheus_exporter():
    out = subprocess.run([HAPROXY, "-vv"], capture_output=True, text=True).stdout
    assert "prometheus-exporter" in out


def test_a_broken_config_is_rejected_by_the_same_check(tmp_path):
    # The validation really validates: a typo fails it.
    text = render.render(render.LbSettings(replicas=("127.0.0.1:50061",), socket=str(tmp_path / "s")))
    result = haproxy_check(text.replace("balance leastconn", "balance leastcon"), tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize("bad", [(), ("localhost",), ("host:port",)])
def test_settings_reject_bad_replica_lists(bad):
    with pytest.raises(ValueError):
        render.LbSettings(replicas=bad, socket="s")


def test_cli_render_writes_a_valid_config(tmp_path):
    import sys
    out = tmp_path / "cli.cfg"
    result = subprocess.run(
        [sys.executable, "-m", "lb", "render", "--replica", "127.0.0.1:50061", "--replica", "127.0.0.1:50062",
         "--port", "50060", "--stats-port", "9999", "--socket", str(tmp_path / "h.sock"), "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert subprocess.run([HAPROXY, "-c", "-f", str(out)], capture_output=True).returncode == 0
