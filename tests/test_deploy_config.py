"""deploy/: settings, the generated supervisord configuration (parsed by
supervisor itself), and the CLI's help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import stack
from deploy.settings import ROOT, StackSettings
from deploy.supervisor import programs, render_config, shutdown_seconds
from tests.test_deploy_manifests import program_args, shutdown_budget


def test_defaults_are_the_architecture_ports(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    s = StackSettings()
    assert (s.frontend_port, s.shard_port, s.lb_port, s.stats_port, s.http_port) == (50051, 50052, 50060, 9999, 8080)
    assert s.replica_addresses() == ["127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"]
    assert s.replicas == 3 and s.run_dir == ROOT / ".run"


@pytest.mark.parametrize("cores, replicas, threads", [(1, 1, 1), (2, 2, 1), (4, 4, 1), (16, 8, 2), (64, 8, 8)])
def test_default_replicas_and_threads_follow_the_cores(cores, replicas, threads, monkeypatch):
    """One single-threaded replica per core (measured best on 2 cores), at most 8, the rest as threads."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    s = StackSettings()
    assert (s.replicas, s.torch_threads) == (replicas, threads)
    assert StackSettings(replicas=3).replicas == 3


@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
def test_torch_threads_split_the_cores(replicas, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    s = StackSettings(replicas=replicas)
    assert s.torch_threads == max(1, 4 // replicas)
    assert StackSettings(replicas=replicas, threads=3).torch_threads == 3


def test_overlapping_ports_are_refused():
    with pytest.raises(ValueError):
        StackSettings(replicas=3, lb_port=50062)
    with pytest.raises(ValueError):
        StackSettings(replicas=-1)


def test_settings_round_trip_through_the_run_dir(tmp_path):
    s = StackSettings(run_dir=tmp_path, replicas=2, frontend_port=41000, drain_seconds=3.5)
    s.save()
    assert StackSettings.load(tmp_path) == s
    assert StackSettings.load(tmp_path / "nothing") is None


def test_every_process_has_a_metrics_port_that_overlaps_nothing():
    s = StackSettings(replicas=3)
    assert s.metrics_url("cacheshard") == "http://127.0.0.1:9102/metrics"
    assert [s.metrics_url(n) for n in s.replica_names()] == [
        f"http://127.0.0.1:{port}/metrics" for port in (9111, 9112, 9113)]
    assert s.metrics_url("embedding") == f"http://127.0.0.1:{s.admin_port}/metrics"
    assert s.metrics_url("haproxy") == f"http://127.0.0.1:{s.stats_port}/metrics"
    assert StackSettings(admin_port=0).metrics_url("embedding") is None
    assert {"shard_metrics", "mlbase1_metrics", "mlbase3_metrics"} <= s.ports().keys()
    with pytest.raises(ValueError, match="ports overlap"):
        StackSettings(replicas=3, shard_metrics_port=9112)
    with pytest.raises(ValueError, match="ports overlap"):
        StackSettings(replicas=2, replica_metrics_base_port=s.admin_port - 1)
    progs = {p.name: p for p in programs(StackSettings(replicas=2, internal_tls=False))}
    assert progs["cacheshard"].command[progs["cacheshard"].command.index("--metrics-port") + 1] == "9102"
    assert progs["mlbase2"].command[progs["mlbase2"].command.index("--metrics-port") + 1] == "9112"
    assert "--metrics-port" not in progs["embedding"].command
    assert {p.name: p.role for p in progs.values()} == {
        "cacheshard": "cacheshard", "mlbase1": "mlbase", "mlbase2": "mlbase", "haproxy": "haproxy",
        "embedding": "frontend"}


def with_certificates(s: StackSettings) -> StackSettings:
    """What `up` does before it plans the programs: the stack's CA and certificates."""
    s.pki.ensure([s.host])
    return s


def test_programs_cover_the_stack(tmp_path):
    s = with_certificates(StackSettings(run_dir=tmp_path, replicas=2, threads=1))
    progs = {p.name: p for p in programs(s)}
    assert list(progs) == ["cacheshard", "mlbase1", "mlbase2", "haproxy", "embedding"]
    m2 = progs["mlbase2"].command
    assert m2[m2.index("--port") + 1] == "50062" and m2[m2.index("--threads") + 1] == "1"
    assert m2[m2.index("--max-connection-age-ms") + 1] == str(s.max_connection_age_ms)
    emb = progs["embedding"].command
    assert emb[emb.index("--mlbase") + 1] == s.lb_address
    assert emb[emb.index("--cache-shards-file") + 1] == str(s.shards_file)
    assert emb[emb.index("--http-port") + 1] == "8080"
    assert progs["mlbase1"].full_name == "mlbase:mlbase1"
    # Stop waits outlast the drain, so supervisord never SIGKILLs a draining replica.
    assert progs["mlbase1"].stop_wait > s.drain_seconds
    # Mutual TLS by default: each server names the roles it answers; the frontend presents its own.
    shard = progs["cacheshard"].command
    assert shard[shard.index("--tls-client-ca") + 1] == str(s.pki.ca)
    assert shard[shard.index("--tls-allowed-clients") + 1] == "embedding,operator"
    assert m2[m2.index("--tls-allowed-clients") + 1] == "embedding"
    assert emb[emb.index("--shard-tls-cert") + 1] == emb[emb.index("--mlbase-tls-cert") + 1] == str(s.pki.cert("embedding"))
    assert all(p.tls is not None for p in progs.values() if p.kind == "grpc" and p.name != "embedding")


def test_replicas_get_the_stacks_backend_flags(tmp_path):
    """--backend auto (the default) reaches every replica with the tuner's record to read; an explicit
    backend and precision reach them as given, and impossible pairs stop `up` before anything starts."""
    auto = {p.name: p.command for p in programs(StackSettings(run_dir=tmp_path, replicas=2, internal_tls=False))}
    for name in ("mlbase1", "mlbase2"):
        argv = auto[name]
        assert argv[argv.index("--backend") + 1] == "auto" and "--precision" not in argv
        assert argv[argv.index("--tuned") + 1] == StackSettings().tuned
    chosen = programs(StackSettings(run_dir=tmp_path, replicas=1, backend="onnx", precision="int8-static",
                                    tuned=str(tmp_path / "t.json"), internal_tls=False))
    argv = next(p.command for p in chosen if p.name == "mlbase1")
    assert argv[argv.index("--backend") + 1] == "onnx" and argv[argv.index("--precision") + 1] == "int8-static"
    assert argv[argv.index("--tuned") + 1] == str(tmp_path / "t.json")
    for bad, message in (({"backend": "tensorrt"}, "--backend must be auto or one of"),
                         ({"precision": "int8"}, "takes its precision from --tuned"),
                         ({"backend": "torch", "precision": "int8"}, "--precision int8 needs --backend onnx")):
        with pytest.raises(ValueError, match=message):
            StackSettings(run_dir=tmp_path, replicas=1, **bad)


def test_no_internal_tls_starts_plaintext_hops(tmp_path):
    s = StackSettings(run_dir=tmp_path, replicas=1, internal_tls=False)
    commands = [" ".join(p.command) for p in programs(s)]
    assert not any("--tls" in c or "-tls-" in c for c in commands)
    assert stack.lb_render.check_ssl_options(stack.lb_settings(s)) == ""


@pytest.mark.parametrize("timings", [{}, {"drain_seconds": 0.0, "grace_seconds": 3.0, "writeback_flush_seconds": 0.0},
                                     {"drain_seconds": 7.5, "grace_seconds": 45.0, "writeback_flush_seconds": 12.0}])
def test_stop_waits_outlast_each_programs_shutdown(tmp_path, timings):
    """supervisord's SIGKILL comes only after drain + grace (+ the frontend's write-back flush),
    read back from each command line by the program's own parser, so the stop wait can never
    drift from what the program does. A timing in supervisord's environment changes nothing:
    every program gets its timings as flags."""
    s = with_certificates(StackSettings(run_dir=tmp_path, replicas=2, **timings))
    env = {**stack.CHILD_ENV, "SUTRA_DRAIN_SECONDS": "99", "SUTRA_GRACE_SECONDS": "99", "SUTRA_WRITEBACK_FLUSH": "99"}
    progs = programs(s)
    checked = {}
    for prog in progs:
        parsed = program_args(prog.command, env)
        if parsed is None:
            assert prog.kind == "haproxy"
            continue
        module, args = parsed
        assert prog.stop_wait > shutdown_budget(args), (prog.name, prog.stop_wait, shutdown_budget(args))
        assert args.grace_seconds == s.grace_seconds
        checked[module] = args
    assert set(checked) == {"cacheshard", "mlbase", "embedding"}
    assert checked["embedding"].drain_seconds == checked["mlbase"].drain_seconds == s.drain_seconds
    assert checked["embedding"].writeback_flush == s.writeback_flush_seconds
    # supervisord stops one priority after another; a whole shutdown fits their sum.
    assert shutdown_seconds(progs) == sum(p.stop_wait for p in progs if p.group is None) + \
        max(p.stop_wait for p in progs if p.group)


def test_up_flags_set_the_shutdown_timings(tmp_path):
    from deploy.cli import load_settings

    s = load_settings(["--run-dir", str(tmp_path), "--drain-seconds", "1", "--grace-seconds", "4",
                       "--writeback-flush", "2"], {})
    assert (s.drain_seconds, s.grace_seconds, s.writeback_flush_seconds) == (1.0, 4.0, 2.0)
    with pytest.raises(ValueError, match="--grace-seconds"):
        StackSettings(run_dir=tmp_path, grace_seconds=-1)


def test_supervisord_accepts_the_generated_config(tmp_path):
    from supervisor.options import ServerOptions

    with pytest.raises(ValueError):
        StackSettings(run_dir=tmp_path / "run 100%")
    s = with_certificates(StackSettings(run_dir=tmp_path / "run dir", replicas=2))
    s.log_dir.mkdir(parents=True)
    progs = programs(s)
    path = s.run_dir / "supervisord.conf"
    path.write_text(render_config(s, progs, stack.CHILD_ENV))
    options = ServerOptions()
    options.realize(["-c", str(path)])
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"cacheshard", "mlbase", "haproxy", "embedding"}
    replicas = {p.name: p for p in groups["mlbase"].process_configs}
    assert set(replicas) == {"mlbase1", "mlbase2"}
    r1 = replicas["mlbase1"]
    from supervisor.datatypes import RestartUnconditionally
    assert r1.autostart is False and r1.autorestart is RestartUnconditionally
    assert r1.environment["HF_HUB_OFFLINE"] == "1"
    assert "--port 50061" in r1.command
    # A path with a space survives supervisord's parsing.
    assert str(s.run_dir) in r1.stdout_logfile
    assert options.pidfile == str(s.supervisor_pidfile)
    assert groups["cacheshard"].priority < groups["mlbase"].priority < groups["haproxy"].priority \
        < groups["embedding"].priority


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=cwd, capture_output=True, text=True)


def test_help_explains_every_up_flag():
    result = run_cli("up", "--help")
    assert result.returncode == 0
    for flag in ("--replicas", "--run-dir", "--frontend-port", "--shard-port", "--lb-port", "--stats-port",
                 "--replica-base-port", "--threads", "--drain-seconds", "--grace-seconds", "--writeback-flush",
                 "--max-connection-age-ms", "--shard-metrics-port", "--replica-metrics-base-port"):
        assert flag in result.stdout
    assert "default" in result.stdout


def test_status_and_down_without_a_stack(tmp_path):
    status = run_cli("status", "--run-dir", str(tmp_path))
    assert status.returncode == 3 and "not running" in status.stdout
    status = run_cli("status", "--json", "--run-dir", str(tmp_path))
    assert status.returncode == 3 and json.loads(status.stdout) == {
        "running": False, "run_dir": str(tmp_path.resolve()), "processes": []}
    assert run_cli("top", "--once", "--run-dir", str(tmp_path)).returncode == 3
    down = run_cli("down", "--run-dir", str(tmp_path))
    assert down.returncode == 0 and "nothing running" in down.stdout


def test_up_refuses_ports_in_use(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("up", "--run-dir", str(tmp_path), "--frontend-port", str(port),
                         "--replica-base-port", "0", "--replicas", "1")
        assert result.returncode != 0
        result = run_cli("up", "--run-dir", str(tmp_path), "--frontend-port", str(port), "--replicas", "1")
        assert result.returncode == 1 and "already in use" in result.stderr
    assert not (tmp_path / "supervisor.sock").exists()


def test_validate_rejects_unknown_phases(tmp_path):
    result = run_cli("validate", "--run-dir", str(tmp_path), "--phases", "3")
    assert result.returncode == 2


def test_several_shards_get_their_own_ports_data_and_the_frontends_list(tmp_path):
    """`sutra up --shards 3 --l2-copies 2`: shard i on port and metrics port base + i - 1, its own
    directory; the frontend gets the list as a file it re-reads, and the copies."""
    from deploy.stack import write_shards_file
    from embedding.shard_source import parse_shard_list

    s = StackSettings(run_dir=tmp_path, replicas=1, shards=3, l2_copies=2, internal_tls=False)
    progs = {p.name: p for p in programs(s)}
    shards = [progs[n].command for n in ("cacheshard", "cacheshard2", "cacheshard3")]
    assert [c[c.index("--port") + 1] for c in shards] == ["50052", "50053", "50054"]
    assert [c[c.index("--metrics-port") + 1] for c in shards] == ["9102", "9103", "9104"]
    assert len({c[c.index("--path") + 1] for c in shards}) == 3
    assert all(progs[n].role == "cacheshard" for n in ("cacheshard", "cacheshard2", "cacheshard3"))
    emb = progs["embedding"].command
    assert emb[emb.index("--l2-copies") + 1] == "2"
    write_shards_file(s)
    assert parse_shard_list(s.shards_file.read_text()) == tuple(s.shard_addresses())
    assert s.metrics_port("cacheshard3") == 9104
    with pytest.raises(ValueError, match="l2-copies"):
        StackSettings(run_dir=tmp_path, replicas=1, shards=1, l2_copies=2)
    with pytest.raises(ValueError, match="overlap"):
        StackSettings(run_dir=tmp_path, replicas=1, shards=9)  # shard 9 would take HAProxy's 50060
