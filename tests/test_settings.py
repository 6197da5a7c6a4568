"""common/settings.py: one declaration per setting gives the flag, the variable, the parser,
the default, the help and the check; every service's settings round-trip through to_argv."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import cacheshard.settings
import embedding.settings
import mlbase.settings
from common.grpc_server import ServerOptions
from common.settings import Settings, at_least, evolve, item, items, load, parser_for, setting
from common.tls import TlsClientOptions, TlsServerOptions
from deploy import cli as deploy_cli
from deploy.settings import StackSettings
from embedding.settings import FrontendSettings
from lb import __main__ as lb_main
from lb.render import LbSettings
from mlbase.settings import MLBaseSettings

SERVICES = [embedding.settings, mlbase.settings, cacheshard.settings]


@dataclass(frozen=True)
class Toy(Settings):
    ENV_PREFIX = "TOY_"

    size: int = setting(3, "how many", check=at_least(1))
    names: tuple[str, ...] = setting(("a",), "which")
    loud: bool = setting(False, "shout")
    server: ServerOptions | None = None


def toy(argv, env):
    return load(Toy, argv, parser_for(Toy, env, prog="toy"))


def test_variables_are_derived_from_the_flags():
    assert item(Toy, "size").env == "TOY_SIZE"
    assert item(FrontendSettings, "l1_entries").env == "SUTRA_L1_ENTRIES"
    assert item(FrontendSettings, "server.port").env == "SUTRA_EMBEDDING_PORT"
    assert item(FrontendSettings, "server.host").env == "SUTRA_HOST"
    assert (item(FrontendSettings, "mlbase_tls.ca").flag, item(FrontendSettings, "mlbase_tls.ca").env) == (
        "mlbase-tls-ca", "SUTRA_MLBASE_TLS_CA")
    assert item(FrontendSettings, "mlbase_tls").env == "SUTRA_MLBASE_TLS"
    assert item(FrontendSettings, "server.tls.client_ca").env == "SUTRA_TLS_CLIENT_CA"
    assert item(MLBaseSettings, "max_queue").env == "SUTRA_MLBASE_MAX_QUEUE"
    assert item(MLBaseSettings, "server.max_connection_age_ms").env == "SUTRA_MAX_CONNECTION_AGE_MS"
    assert item(cacheshard.settings.ShardSettings, "sync").env == "SUTRA_CACHE_SHARD_SYNC"
    assert item(LbSettings, "stats_port").env == "SUTRA_LB_STATS_PORT"
    # The frontend reads the replica's width variable; the stack reads each service's own.
    assert item(FrontendSettings, "default_width").env == item(MLBaseSettings, "default_width").env == "MATRYOSHKA_DIM"
    assert item(StackSettings, "frontend_port").env == item(FrontendSettings, "server.port").env
    with pytest.raises(KeyError):
        item(FrontendSettings, "nope")


def test_flag_beats_environment_beats_default():
    assert toy([], {}) == Toy()
    assert toy([], {"TOY_SIZE": "5", "TOY_NAMES": "x, y", "TOY_LOUD": "yes"}) == Toy(5, ("x", "y"), True)
    assert toy(["--size", "7", "--no-loud"], {"TOY_SIZE": "5", "TOY_LOUD": "1"}) == Toy(7, ("a",), False)
    assert toy(["--loud"], {}).loud and not toy(["--loud", "false"], {}).loud


@pytest.mark.parametrize("argv, env, words", [
    (["--size", "0"], {}, "--size must be at least 1"),
    ([], {"TOY_SIZE": "many"}, "--size: invalid int value"),
    (["--loud", "maybe"], {}, "expected true/false"),
])
def test_a_wrong_setting_is_one_error_line(argv, env, words, capsys):
    with pytest.raises(SystemExit) as exc:
        toy(argv, env)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], errors


def test_objects_built_in_code_are_checked_the_same_way():
    with pytest.raises(ValueError, match="--size must be at least 1"):
        Toy(size=0)
    with pytest.raises(ValueError, match="--l1-entries must not be negative"):
        FrontendSettings(l1_entries=-1)
    with pytest.raises(ValueError, match="go together"):
        TlsServerOptions(cert="c")


@pytest.mark.parametrize("module", SERVICES, ids=lambda m: m.__name__)
def test_every_flag_shows_its_variable_and_default(module):
    text = " ".join(module.build_parser({}).format_help().split())
    settings_cls = type(module.load_settings([], {}))
    for it in items(settings_cls):
        assert f"--{it.flag}" in text
        assert f"env {it.env};" in text, it.flag
    assert text.count("(env ") >= len(list(items(settings_cls)))


@pytest.fixture
def pem(tmp_path):
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


def frontends(pem):
    base = FrontendSettings()
    yield base
    yield evolve(base, {"server.port": 7, "server.tls": TlsServerOptions(str(pem / "c.pem"), str(pem / "k.pem")),
                        "cache_shards": ("h1:1", "h2:2"), "allowed_widths": (64, 128), "cache_enabled": False,
                        "mlbase_tls": TlsClientOptions(ca=str(pem / "ca.pem"), server_name="m"),
                        "auth_tokens": ("t1", "t2"), "isolate_tenants": True, "batch_window_ms": 0.5})


def test_frontend_round_trips_through_its_command_line(pem):
    for s in frontends(pem):
        assert embedding.settings.load_settings(s.to_argv(), {}) == s
    assert embedding.settings.command(FrontendSettings(), "py")[:3] == ["py", "-m", "embedding"]


def test_replica_and_shard_round_trip(tmp_path):
    for s in (MLBaseSettings(), MLBaseSettings(precision="int8", int8_keep_fp32=("a", "b"), layer_norm=True,
                                               allowed_widths=(64, 256), server=ServerOptions(port=3))):
        assert mlbase.settings.load_settings(s.to_argv(), {}) == s
    shard = cacheshard.settings.ShardSettings(path=tmp_path / "db", sync=True, max_entries=5000)
    assert cacheshard.settings.load_settings(shard.to_argv(), {}) == shard
    assert cacheshard.settings.load_settings([], {}) == cacheshard.settings.ShardSettings()


def test_stack_and_balancer_round_trip(tmp_path):
    stack = StackSettings(run_dir=tmp_path, replicas=2, shard_sync=True, drain_seconds=1.5)
    assert deploy_cli.load_settings(stack.to_argv(), {}) == stack
    lb = LbSettings(replicas=("h:1", "h:2"), check_ssl=True, check_ca_file="/ca.pem", fall=3)
    args = lb_main.build_parser({}).parse_args(["render", *lb.to_argv()])
    from common.settings import from_args
    assert from_args(LbSettings, args) == lb


def test_to_argv_names_only_what_it_is_asked_for():
    s = evolve(FrontendSettings(), {"server.port": 9, "l1_entries": 5})
    assert s.to_argv(only=["server.port", "l1_entries"]) == ["--port", "9", "--l1-entries", "5"]
    with pytest.raises(KeyError):
        s.to_argv(only=["l1"])
