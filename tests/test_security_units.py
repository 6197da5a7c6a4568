"""Unit tests for the security configuration: tenants and tokens files, the
tenant gate, per-tenant width policies, TLS flags and HAProxy's TLS check."""

from __future__ import annotations

import json

import pytest

from common.errors import InvalidInput, Unauthenticated
from common.matryoshka import WidthPolicy
from embedding.settings import load_settings
from embedding.tenants import Gate, TenantSpec, load_access, token_digest
from lb import render


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_tenants_file_yaml_and_json_agree(tmp_path):
    doc = {"tenants": {"acme": {"tokens": ["t-acme"], "allowed_widths": [256, 64, 128], "default_width": 128},
                       "beta": {"token_sha256": [token_digest("t-beta")]}}}
    from_json = load_access(tenants_file=write(tmp_path / "t.json", json.dumps(doc)))
    from_yaml = load_access(tenants_file=write(tmp_path / "t.yaml", """
tenants:
  acme: {tokens: [t-acme], allowed_widths: [256, 64, 128], default_width: 128}
  beta: {token_sha256: ["%s"]}
""" % token_digest("t-beta")))
    assert from_json == from_yaml
    assert from_yaml.tenants[0] == TenantSpec("acme", (64, 128, 256), 128)
    assert "t-acme" not in repr(from_yaml)  # only digests are kept


@pytest.mark.parametrize("body, message", [
    ("tenants: {a: {token: x}, b: {token: x}}", "two tenants"),
    ("tenants: {a: {tokne: x}}", "unknown keys"),
    ("tenants: {a: {allowed_widths: [64], default_width: 128}}", "not in allowed_widths"),
    ("tenants: {a: {allowed_widths: [0]}}", "positive integers"),
    ("tenants: {'a b': {}}", "names are"),
    ("acme: {}", "one key"),
    ("tenants: {a: {token_sha256: [abc]}}", "64 hex"),
    ("tenants: [", "does not parse"),
])
def test_bad_tenants_files_are_refused_with_a_reason(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_access(tenants_file=write(tmp_path / "t.yaml", body))


def test_tokens_file_and_flags(tmp_path):
    path = write(tmp_path / "tokens", "# comment\nt1 acme\n\nt2   # no tenant\n")
    access = load_access(tokens=["t3"], tokens_file=path)  # an empty one is refused: tests/security
    assert access.token_tenants == {token_digest("t1"): "acme", token_digest("t2"): "", token_digest("t3"): ""}
    with pytest.raises(ValueError, match=":1: expected"):
        load_access(tokens_file=write(tmp_path / "bad", "t1 acme extra\n"))
    with pytest.raises(ValueError, match="cannot read tokens file"):
        load_access(tokens_file=str(tmp_path / "missing"))


def test_gate_with_tokens_binds_the_tenant_to_the_token(tmp_path):
    gate = Gate(load_access(tokens_file=write(tmp_path / "tokens", "t1 acme\nt2 beta\n")))
    assert gate.tenant([("authorization", "Bearer t1")]) == "acme"
    assert gate.tenant([("authorization", "bearer t2"), ("x-sutra-tenant", "acme")]) == "beta"
    for metadata in ([], [("authorization", "Bearer t3")], [("authorization", "t1")],
                     [("authorization", "Basic t1")], [("x-sutra-tenant", "acme")]):
        with pytest.raises(Unauthenticated):
            gate.tenant(metadata)


def test_gate_without_tokens_reads_the_tenant_header():
    gate = Gate(load_access())
    assert not gate.auth_enabled
    assert gate.tenant([("x-sutra-tenant", "acme")]) == "acme"
    assert gate.tenant([("authorization", "Bearer anything")]) == ""
    with pytest.raises(InvalidInput):
        gate.tenant([("x-sutra-tenant", "a" * 65)])


def test_tenant_width_policy_on_top_of_the_model_policy():
    base = WidthPolicy(native_width=384, min_width=32, default_width=256)
    assert TenantSpec("a", (64, 128)).policy(base).default_width == 128  # 256 not allowed: the largest
    assert TenantSpec("a", (64, 256)).policy(base).default_width == 256
    assert TenantSpec("a", (), 96).policy(base).accepts(200)
    with pytest.raises(ValueError, match="tenant 'a'"):
        TenantSpec("a", (64, 512)).policy(base)


def test_frontend_tls_flags_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ca.pem", "c", "k", "ca"):
        (tmp_path / name).write_text("PEM")
    s = load_settings(["--mlbase-tls-ca", "ca.pem", "--shard-tls", "--tls-cert", "c", "--tls-key", "k"], env={})
    assert s.mlbase_tls.ca == "ca.pem" and s.shard_tls.ca == "" and s.server.tls.cert == "c"
    assert not s.server.tls.mutual
    s = load_settings([], env={"SUTRA_TLS_CERT": "c", "SUTRA_TLS_KEY": "k", "SUTRA_TLS_CLIENT_CA": "ca",
                               "SUTRA_MLBASE_TLS_SERVER_NAME": "mlbase.internal", "SUTRA_AUTH_TOKEN": "tok",
                               "SUTRA_ISOLATE_TENANTS": "true"})
    assert s.server.tls.mutual and s.mlbase_tls.server_name == "mlbase.internal" and s.shard_tls is None
    assert s.access.auth_enabled and s.access.isolate
    assert load_settings([], env={}).server.tls is None
    with pytest.raises(SystemExit):
        load_settings(["--tls-cert", "c"], env={})
    with pytest.raises(SystemExit):
        load_settings(["--mlbase-tls-cert", "c"], env={})  # a client certificate without its key
    with pytest.raises(SystemExit):
        load_settings(["--tls-cert", "c", "--tls-key", "missing.key"], env={})


def test_haproxy_check_over_tls_options():
    plain = render.LbSettings(replicas=("127.0.0.1:1",), socket="s")
    assert "default-server maxconn 256 check " in render.render(plain) and render.check_ssl_options(plain) == ""
    assert "shutdown-sessions check-ssl check-alpn h2" in render.render(
        render.LbSettings(replicas=("127.0.0.1:1",), socket="s", check_ssl=True))
    verified = render.LbSettings(replicas=("127.0.0.1:1",), socket="s", check_ssl=True, check_ca_file="/ca.pem",
                                 check_crt="/client.pem")
    assert render.check_ssl_options(verified) == \
        " check-ssl check-alpn h2 ca-file /ca.pem verify required crt /client.pem"
    assert render.check_ssl_options(render.LbSettings(replicas=("127.0.0.1:1",), socket="s", check_ssl=True)) == \
        " check-ssl check-alpn h2 verify none"
    with pytest.raises(ValueError):
        render.LbSettings(replicas=("127.0.0.1:1",), socket="s", check_crt="/client.pem")
