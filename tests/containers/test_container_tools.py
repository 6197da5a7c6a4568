"""The pieces the containers run, run here as real processes: the `pki` init step's file
layout, the health check the compose healthchecks and Kubernetes exec probes use (against
a cache shard started with compose's own command line and certificates), and the reading
of HAProxy's stats page that `make compose-check` relies on (against a real HAProxy).
`make compose-check` runs the whole stack in containers; these need no Docker."""

from __future__ import annotations

import os
import sys
import stat
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from cacheshard.settings import build_parser as shard_parser
from deploy import manifests
from deploy.pki import CLIENT_ROLES, SERVER_ROLES, StackPki
from harness.procs import Proc, free_port, wait_until
from lb import render
from sutra.cache.v1 import cache_shard_service_pb2 as cache_pb
from sutra.cache.v1 import cache_shard_service_pb2_grpc as cache_grpc
from common.tls import open_channel
from tests.support import serving
from tools.containers import haproxy_stats, pki

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = "/usr/sbin/haproxy"


def test_pki_layout_gives_the_service_user_its_files_and_keeps_the_ca_key(tmp_path):
    tls = tmp_path / "tls"
    owner = os.getuid()
    made = pki.lay_out(tls, ["cacheshard", "mlbase"], owner)
    assert "ca" in made and set(SERVER_ROLES + CLIENT_ROLES) <= set(made)
    layout = StackPki(tls)
    for role in (*SERVER_ROLES, *CLIENT_ROLES):
        for path in (layout.cert(role), layout.key(role)):
            assert path.stat().st_uid == owner, path
        assert stat.S_IMODE(layout.key(role).stat().st_mode) == 0o600, role
    ca_key = tls / pki.CA_KEY
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    assert ca_key.stat().st_uid == (0 if os.geteuid() == 0 else owner)
    assert stat.S_IMODE(tls.stat().st_mode) == 0o750
    # A second run (every `compose up`) reuses everything, so running services keep valid peers.
    before = layout.cert("mlbase").read_bytes()
    assert pki.lay_out(tls, ["cacheshard", "mlbase"], owner) == []
    assert layout.cert("mlbase").read_bytes() == before


@pytest.fixture(scope="module")
def compose_shard(tmp_path_factory):
    """A cache shard started with the compose file's own command line: its certificate paths
    pointed at certificates made by the `pki` step, data and ports moved to this test's."""
    tmp = tmp_path_factory.mktemp("compose-shard")
    tls = tmp / "tls"
    pki.lay_out(tls, list(pki.DEFAULT_HOSTS), os.getuid())
    command = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["cacheshard-0"]["command"]
    assert command[:3] == ["python", "-m", "cacheshard"]
    port, metrics = free_port(), free_port()
    moved = {"--port": str(port), "--metrics-port": str(metrics), "--path": str(tmp / "cache"),
             "--host": "127.0.0.1", "--metrics-host": "127.0.0.1"}
    args = []
    for i, word in enumerate(command[3:]):
        previous = command[3:][i - 1] if i else ""
        if previous in moved:
            args.append(moved[previous])
        else:
            args.append(word.replace(f"{manifests.TLS_DIR}/", f"{tls}/"))
    shard_parser().parse_args(args)  # the shard's own parser accepts what compose passes
    operator = StackPki(tls).client("operator")
    proc = Proc("cacheshard", args, tmp / "shard.log", port, credentials=operator.credentials())
    yield from serving(proc)


def run_health(*args: str) -> subprocess.CompletedProcess:
    """The health check as the containers run it: a fresh `python -m` process."""
    return subprocess.run([sys.executable, "-m", "tools.containers.health", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_health_check_passes_over_mutual_tls_and_fails_without_it(compose_shard, tmp_path_factory):
    tls = Path(compose_shard.args[compose_shard.args.index("--tls-client-ca") + 1]).parent
    port = str(compose_shard.port)
    ok = run_health(port, "--tls-dir", str(tls))
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stdout + ok.stderr
    live = run_health(port, "--service", "liveness", "--tls-dir", str(tls))
    assert live.returncode == 0, live.stdout + live.stderr
    # Plaintext against a TLS-only port: not healthy.
    plain = run_health(port)
    assert plain.returncode == 1 and plain.stdout.startswith("DOWN")
    # Certificates of another CA: refused as well.
    other = tmp_path_factory.mktemp("other-ca")
    pki.lay_out(other, ["cacheshard"], os.getuid())
    foreign = run_health(port, "--tls-dir", str(other))
    assert foreign.returncode == 1 and foreign.stdout.startswith("DOWN")
    # Nothing listening: not healthy.
    assert run_health(str(free_port()), "--tls-dir", str(tls)).returncode == 1


def test_compose_shard_answers_only_the_roles_compose_allows(compose_shard):
    tls = StackPki(Path(compose_shard.args[compose_shard.args.index("--tls-client-ca") + 1]).parent)

    def stats(role: str):
        with open_channel(compose_shard.address, tls.client(role), max_message_bytes=1 << 20, aio=False) as ch:
            return cache_grpc.CacheShardServiceStub(ch).GetStats(cache_pb.GetStatsRequest(), timeout=10)

    assert stats("embedding") is not None and stats("operator") is not None
    with pytest.raises(grpc.RpcError) as refused:
        stats("haproxy")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def run_haproxy(config: str, tmp_path: Path, stats_port: int) -> subprocess.Popen:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def answering() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(answering, 30, "HAProxy stats page")
    return proc


def container_config(settings: render.LbSettings, tmp_path: Path) -> str:
    tls = tmp_path / "tls"
    StackPki(tls).ensure(["mlbase"])
    text = render.render(settings)
    return text.replace(f" {manifests.TLS_DIR}/", f" {tls}/")


def test_stats_page_lists_the_replicas_and_leaves_out_unresolved_slots(tmp_path):
    stats_port, lb_port = free_port(), free_port()
    down = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    # Two replicas by address, nothing listening: listed, with their addresses, not UP.
    fixed = render.LbSettings(replicas=tuple(down), server_names=("replica1", "replica2"),
                              socket=str(tmp_path / "a.sock"), host="127.0.0.1", port=lb_port,
                              stats_host="127.0.0.1", stats_port=stats_port)
    proc = run_haproxy(render.render(fixed), tmp_path, stats_port)
    try:
        url = f"http://127.0.0.1:{stats_port}/stats"
        views = wait_until(lambda: [v for v in haproxy_stats.servers(url) if v.status.startswith("DOWN")]
                           and haproxy_stats.servers(url), 30, "both replicas checked")
        assert [(v.name, v.address) for v in views] == [("replica1", down[0]), ("replica2", down[1])]
        assert not any(v.up for v in views)
    finally:
        proc.terminate()
        proc.wait()
    # The compose configuration: ten DNS slots for `mlbase`, which resolves to nothing here.
    dns = manifests.container_settings("mlbase.invalid:50061")
    dns = render.LbSettings(**{**dns.__dict__, "port": lb_port, "stats_port": stats_port,
                               "socket": str(tmp_path / "b.sock"), "host": "127.0.0.1", "stats_host": "127.0.0.1"})
    proc = run_haproxy(container_config(dns, tmp_path), tmp_path, stats_port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).read().decode()
        assert text.count("replica") == manifests.DNS_SLOTS  # the slots exist...
        assert haproxy_stats.parse(text) == []               # ...but none is a replica
    finally:
        proc.terminate()
        proc.wait()


def test_stats_parse_refuses_what_is_not_haproxy_csv():
    with pytest.raises(ValueError):
        haproxy_stats.parse("<html>not the csv</html>")
