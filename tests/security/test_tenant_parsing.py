"""The access configuration's parsers, unit by unit: tenants files, tokens files,
--auth-token, the cache-isolation decision, and the CLI's token file.

Each case here was a way to configure a frontend that accepts more than its
operator meant: `tokens: "abc"` accepted "a", "b" and "c"; `abc#def` in a
tokens file accepted "abc" for the anonymous tenant; an empty --auth-token
silently left authentication off. Errors name the file, line or tenant, and
never the token.
"""

from __future__ import annotations

import argparse

import pytest

from embedding.cli import read_token_file
from embedding.settings import load_settings
from embedding.tenants import load_access, token_digest


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- tenants file -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ('tenants: {acme: {token: "x1", tokens: "abc"}}', r"tenant 'acme': `tokens` must be a list \(got a string\)"),
    ('tenants: {acme: {tokens: "abc"}}', r"tenant 'acme': `tokens` must be a list"),
    ('tenants: {acme: {tokens: {a: 1}}}', r"`tokens` must be a list \(got dict\)"),
    ('tenants: {acme: {token_sha256: "%s"}}' % token_digest("x"), "`token_sha256` must be a list"),
    ('tenants: {acme: {token: ["a", "b"]}}', "`token` is one string"),
    ("tenants: {acme: {token: 12345}}", "`token` is one string"),
    ("tenants: {acme: {token: null}}", "`token` is one string"),
    ('tenants: {acme: {token: ""}}', "tenant 'acme': an empty token"),
    ('tenants: {acme: {tokens: [""]}}', "an empty token"),
    ('tenants: {acme: {tokens: ["  "]}}', "spaces"),
    ('tenants: {acme: {tokens: [" secret-1"]}}', "spaces"),
    ('tenants: {acme: {tokens: ["secret 1"]}}', "spaces"),
    ('tenants: {acme: {tokens: ["sécret"]}}', "printable ASCII"),
    ("tenants: {acme: {tokens: [12345]}}", "not a string"),
])
def test_tenants_file_token_shapes_are_refused_naming_the_tenant(tmp_path, body, message):
    with pytest.raises(ValueError, match=message) as err:
        load_access(tenants_file=write(tmp_path / "t.yaml", body))
    for secret in ("abc", "secret", "sécret", "12345"):
        assert secret not in str(err.value)


def test_tenants_file_accepts_token_and_a_list_of_tokens(tmp_path):
    access = load_access(tenants_file=write(tmp_path / "t.yaml", """
tenants:
  acme: {token: "x1", tokens: ["x2", "a#b"]}
  beta: {tokens: []}
  gamma: {}
"""))
    assert access.token_tenants == {token_digest("x1"): "acme", token_digest("x2"): "acme",
                                    token_digest("a#b"): "acme"}
    assert not any(token_digest(c) in access.token_tenants for c in "x1x2")


# -- tokens file ------------------------------------------------------------------------------

def test_tokens_file_hash_inside_a_token_is_part_of_it(tmp_path):
    path = write(tmp_path / "tokens", "abc#def tenantA\n"
                                      "# a comment line\n"
                                      "   # an indented comment\n"
                                      "ghi tenantB # a comment after a space\n"
                                      "jkl\t#a comment after a tab\n"
                                      "mno#  # the token is mno#\n")
    access = load_access(tokens_file=path)
    assert access.token_tenants == {token_digest("abc#def"): "tenantA", token_digest("ghi"): "tenantB",
                                    token_digest("jkl"): "", token_digest("mno#"): ""}
    assert token_digest("abc") not in access.token_tenants


@pytest.mark.parametrize("line, message", [
    ("t1 acme extra", r":2: expected `TOKEN \[TENANT\]`, found 3 fields"),
    ("t1 acme#x extra#y", "found 3 fields"),
    ("t1 'a b'", "found 3 fields"),
    ("t1 bad/tenant", ":2: expected `TOKEN \\[TENANT\\]`; tenant names are"),
    ("tökén acme", ":2: a token with spaces or characters other than printable ASCII"),
])
def test_bad_tokens_file_lines_name_the_file_and_line_not_the_token(tmp_path, line, message):
    path = write(tmp_path / "tokens", f"# header\n{line}\n")
    with pytest.raises(ValueError, match=message) as err:
        load_access(tokens_file=path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert "t1" not in str(err.value) and "tökén" not in str(err.value)


# -- --auth-token and SUTRA_AUTH_TOKEN --------------------------------------------------------

def test_empty_auth_token_is_an_error_not_authentication_off():
    for token in ("", "   "):
        with pytest.raises(ValueError, match="--auth-token .*an empty token"):
            load_access(tokens=[token])
    assert load_access(tokens=[" t1 \n"]).token_tenants == {token_digest("t1"): ""}
    with pytest.raises(SystemExit):
        load_settings(["--auth-token", ""], env={})
    with pytest.raises(SystemExit):
        load_settings([], env={"SUTRA_AUTH_TOKEN": " "})
    assert load_settings([], env={"SUTRA_AUTH_TOKEN": "t1"}).access.auth_enabled
    assert not load_settings([], env={"SUTRA_AUTH_TOKEN": ""}).access.auth_enabled  # unset


# -- cache isolation --------------------------------------------------------------------------

def test_isolation_is_on_with_tokens_unless_shared_and_opt_in_without(tmp_path):
    assert load_access(tokens=["t1"]).isolate
    assert not load_access(tokens=["t1"], share=True).isolate
    assert load_access(tokens=["t1"], isolate=True).isolate
    assert load_access(tokens_file=write(tmp_path / "tokens", "t1 acme\n")).isolate
    assert not load_access().isolate  # no tokens: the header is only a namespace, on request
    assert load_access(isolate=True).isolate
    assert not load_access(share=True).isolate


def test_isolation_settings_flags_and_environment():
    assert load_settings(["--auth-token", "t1"], env={}).access.isolate
    assert not load_settings(["--auth-token", "t1", "--share-cache-across-tenants"], env={}).access.isolate
    assert not load_settings([], env={"SUTRA_AUTH_TOKEN": "t1",
                                      "SUTRA_SHARE_CACHE_ACROSS_TENANTS": "true"}).access.isolate
    assert load_settings(["--isolate-tenants"], env={}).access.isolate
    assert not load_settings([], env={}).access.isolate
    with pytest.raises(SystemExit):
        load_settings(["--isolate-tenants", "--share-cache-across-tenants"], env={})


def test_startup_line_says_the_mode_and_no_token():
    lines = {
        "isolated": load_access(tokens=["t-secret"]).describe(),
        "shared": load_access(tokens=["t-secret"], share=True).describe(),
        "header": load_access(isolate=True).describe(),
        "open": load_access().describe(),
    }
    assert "bearer tokens required (1 tokens, 1 tenants)" in lines["isolated"]
    assert "cache isolated per tenant" in lines["isolated"]
    assert "cache SHARED across tenants" in lines["shared"]
    assert "x-sutra-tenant" in lines["header"] and "no authentication" in lines["open"]
    assert "one cache shared by all callers" in lines["open"]
    assert not any("t-secret" in line or token_digest("t-secret") in line for line in lines.values())


# -- the CLI's token file ---------------------------------------------------------------------

def test_cli_token_file(tmp_path):
    assert read_token_file(write(tmp_path / "tok", "  abc#def\n")) == "abc#def"
    assert read_token_file("") == ""
    for name, text, message in [("empty", "\n", "holds nothing"), ("two", "a b\n", "several words")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            read_token_file(write(tmp_path / name, text))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot read token file"):
        read_token_file(str(tmp_path / "missing"))
