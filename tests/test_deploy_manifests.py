"""deploy/compose.yaml and deploy/k8s/: parse, carry the required pieces, and
agree with the local stack's ports and the generated HAProxy configuration."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import yaml

import cacheshard.settings
import embedding.settings
import mlbase.settings
from deploy import manifests
from deploy.settings import ROOT, StackSettings
from embedding.server import SERVICE_NAME as EMBEDDING_SERVICE

K8S = ROOT / "deploy" / "k8s"
D = StackSettings()
HAPROXY = "/usr/sbin/haproxy"


def load_k8s() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs, kind, name):
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(doc) -> dict:
    [c] = doc["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# Each program's own parser: its flags, environment and defaults decide what a command line means.
PARSERS = {"embedding": embedding.settings.build_parser, "mlbase": mlbase.settings.build_parser,
           "cacheshard": cacheshard.settings.build_parser}
# What kubelet and Docker wait between SIGTERM and SIGKILL when a manifest says nothing.
K8S_DEFAULT_GRACE = 30
COMPOSE_DEFAULT_GRACE = 10


def program_args(command: list[str], env: dict[str, str]) -> tuple[str, argparse.Namespace] | None:
    """(module, parsed flags) for a `python -m <one of ours> ...` command line, parsed by that
    program's own parser in exactly `env`; None for any other command."""
    if len(command) < 3 or command[1] != "-m" or command[2] not in PARSERS:
        return None
    with mock.patch.dict(os.environ, env, clear=True):
        return command[2], PARSERS[command[2]]().parse_args(command[3:])


def shutdown_budget(args: argparse.Namespace) -> float:
    """Seconds from SIGTERM to the end of the program's own shutdown: drain, then the grace for
    in-flight RPCs, then (frontend only) the write-back flush."""
    return args.drain_seconds + args.grace_seconds + getattr(args, "writeback_flush", 0.0)


def seconds(duration: str | int | float) -> float:
    """A compose duration (`45s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def container_env(c: dict) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}


@pytest.fixture(scope="module")
def docs():
    return load_k8s()


def test_every_document_has_the_basic_fields(docs):
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == manifests.K8S_NAMESPACE


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_workloads_and_services_fit_together(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
    pods = [d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [p for p in pods if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        port_names = {p["name"] for pod in selected for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)


def test_ports_match_the_local_defaults(docs):
    def svc_ports(name):
        return {p["name"]: p["port"] for p in find(docs, "Service", name)["spec"]["ports"]}
    assert svc_ports("embedding") == {"grpc": D.frontend_port, "admin": D.admin_port}
    assert svc_ports("cacheshard") == {"grpc": D.shard_port}
    assert svc_ports("haproxy") == {"grpc": D.lb_port, "stats": D.stats_port}
    assert svc_ports("mlbase-headless") == {"grpc": D.replica_base_port}

    emb = container(find(docs, "Deployment", "embedding"))["args"]
    assert flag(emb, "--port") == str(D.frontend_port)
    assert flag(emb, "--mlbase") == f"haproxy:{D.lb_port}"
    assert flag(emb, "--cache-shard") == f"cacheshard-0.cacheshard:{D.shard_port}"
    ml = container(find(docs, "Deployment", "mlbase"))["args"]
    assert flag(ml, "--port") == str(D.replica_base_port)
    assert int(flag(ml, "--max-connection-age-ms")) > 0
    shard = container(find(docs, "StatefulSet", "cacheshard"))["args"]
    assert flag(shard, "--port") == str(D.shard_port)


def test_grpc_services_have_native_grpc_probes(docs):
    for kind, name, port in [("Deployment", "mlbase", D.replica_base_port),
                             ("Deployment", "embedding", D.frontend_port),
                             ("StatefulSet", "cacheshard", D.shard_port)]:
        c = container(find(docs, kind, name))
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (name, probe)


def test_mlbase_drains_within_its_grace_period(docs):
    dep = find(docs, "Deployment", "mlbase")
    args = container(dep)["args"]
    drain = float(flag(args, "--drain-seconds"))
    # Drain must outlast HAProxy's detection (1.5 s) and fit the grace period.
    assert 1.5 < drain < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_hpa_targets_mlbase_within_haproxy_slots(docs):
    hpa = find(docs, "HorizontalPodAutoscaler", "mlbase")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "mlbase")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= manifests.DNS_SLOTS
    assert hpa["spec"]["metrics"]
    # Utilization targets need CPU requests on the pods.
    assert container(find(docs, "Deployment", "mlbase"))["resources"]["requests"]["cpu"]


def test_cacheshard_statefulset_keeps_its_data_on_a_claim(docs):
    sts = find(docs, "StatefulSet", "cacheshard")
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    c = container(sts)
    [mount] = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert flag(c["args"], "--path").startswith(mount["mountPath"] + "/")
    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_haproxy_deployment_mounts_the_generated_configmap(docs, tmp_path):
    dep = find(docs, "Deployment", "haproxy")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == "haproxy-config"
    cm = find(docs, "ConfigMap", "haproxy-config")
    text = cm["data"]["haproxy.cfg"]
    assert text == manifests.k8s_config()
    assert "server-template replica" in text and "mlbase-headless.sutra.svc.cluster.local:50061" in text
    (tmp_path / "haproxy.cfg").write_text(text)
    result = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "deploy", "manifests", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_file(tmp_path):
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"cacheshard", "mlbase", "haproxy", "embedding", "prometheus", "grafana"}
    # Prometheus and Grafana start only with `--profile observability`.
    assert {name for name, svc in services.items() if svc.get("profiles")} == {"prometheus", "grafana"}
    emb = services["embedding"]["command"]
    assert flag(emb, "--port") == str(D.frontend_port)
    assert flag(emb, "--mlbase") == f"haproxy:{D.lb_port}"
    assert flag(emb, "--cache-shard") == f"cacheshard:{D.shard_port}"
    assert flag(services["mlbase"]["command"], "--port") == str(D.replica_base_port)
    # Compose runs its own count (three, so a killed replica leaves two); `sutra up` follows the cores.
    assert services["mlbase"]["deploy"]["replicas"] == 3
    assert flag(services["cacheshard"]["command"], "--port") == str(D.shard_port)
    assert any(v.startswith("cache-data:") for v in services["cacheshard"]["volumes"])
    [mount] = services["haproxy"]["volumes"]
    source = (ROOT / "deploy" / mount.split(":")[0]).resolve()
    assert source == manifests.COMPOSE_CFG
    assert source.read_text() == manifests.compose_config()
    assert "mlbase:50061" in source.read_text()
    result = subprocess.run([HAPROXY, "-c", "-f", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, svc in services.items():
        if name in ("cacheshard", "mlbase", "embedding"):
            assert svc["image"] == "sutra-embed:latest" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / "deploy" / "Dockerfile").exists()


def test_pods_get_sigkilled_only_after_their_own_shutdown(docs):
    """terminationGracePeriodSeconds outlasts drain + grace (+ the frontend's write-back flush)."""
    checked = set()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            parsed = program_args(c["args"], container_env(c))
            if parsed is None:
                continue
            module, args = parsed
            period = pod.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE)
            assert period > shutdown_budget(args), (doc["metadata"]["name"], period, shutdown_budget(args))
            checked.add(module)
    assert checked == set(PARSERS)


def test_compose_stops_no_one_before_their_own_shutdown():
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    checked = set()
    for name, svc in services.items():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        parsed = program_args(svc.get("command", []), {k: str(v) for k, v in env.items()})
        if parsed is None:
            continue
        module, args = parsed
        period = seconds(svc.get("stop_grace_period", COMPOSE_DEFAULT_GRACE))
        assert period > shutdown_budget(args), (name, period, shutdown_budget(args))
        checked.add(module)
    assert checked == set(PARSERS)


def test_frontend_probes_restart_only_on_liveness(docs):
    c = container(find(docs, "Deployment", "embedding"))
    # Readiness: the default service (or the API's name), which is NOT_SERVING while starting and draining.
    assert c["readinessProbe"]["grpc"].get("service", "") in ("", EMBEDDING_SERVICE)
    # Restarts: only the `liveness` service, SERVING unless the process is wedged.
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    # Startup gates liveness; on readiness it would restart a frontend waiting for slow replicas.
    assert c["startupProbe"]["grpc"]["service"] == "liveness"
    args = c["args"]
    assert float(flag(args, "--drain-seconds")) > 0


def test_every_grpc_liveness_probe_asks_the_liveness_service(docs):
    """A draining or starting process is NOT_SERVING on readiness; liveness on readiness would
    restart it mid-drain. Every gRPC service publishes `liveness` (common.grpc_server.LIVENESS)."""
    from common.grpc_server import LIVENESS

    probed = []
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        c = container(doc)
        grpc_probe = c.get("livenessProbe", {}).get("grpc")
        if grpc_probe is not None:
            assert grpc_probe.get("service") == LIVENESS, doc["metadata"]["name"]
            probed.append(doc["metadata"]["name"])
    assert len(probed) == 3, probed


# -- metrics -------------------------------------------------------------------------------------

def metrics_port(module: str, args: list[str]) -> int:
    """Where a program's command line says it serves /metrics: the frontend's admin port, else
    --metrics-port (read by the program's own parser)."""
    parsed = PARSERS[module]().parse_args(args)
    return parsed.admin_port if module == "embedding" else parsed.metrics_port


def test_k8s_pods_ask_prometheus_to_scrape_their_metrics_port(docs):
    scraped = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = doc["spec"]["template"]
        notes = template["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", doc["metadata"]["name"]
        assert notes["prometheus.io/path"] == "/metrics"
        port = int(notes["prometheus.io/port"])
        c = container(doc)
        assert port in {p["containerPort"] for p in c["ports"]}, doc["metadata"]["name"]
        parsed = program_args(c["args"], container_env(c))
        if parsed is not None:
            module = parsed[0]
            assert port == metrics_port(module, c["args"][3:]), module
            if module != "embedding":
                assert flag(c["args"], "--metrics-host") == "0.0.0.0"
        scraped[doc["metadata"]["name"]] = port
    assert scraped == {"embedding": D.admin_port, "cacheshard": D.shard_metrics_port,
                       "mlbase": D.replica_metrics_base_port, "haproxy": D.stats_port}


def test_compose_prometheus_scrapes_every_process():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    [mount] = services["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy" / mount.split(":")[0]).read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(dict(t.rsplit(":", 1) for t in static["targets"]))
        for dns in job.get("dns_sd_configs", []):
            targets.update({name: str(dns["port"]) for name in dns["names"]})
    assert set(targets) == {"embedding", "cacheshard", "mlbase", "haproxy"}
    for name in ("embedding", "cacheshard", "mlbase"):
        command = services[name]["command"]
        assert int(targets[name]) == metrics_port(name, command[3:]), name
        if name != "embedding":
            assert flag(command, "--metrics-host") == "0.0.0.0"
    assert int(targets["haproxy"]) == D.stats_port
    grafana = services["grafana"]["volumes"]
    for mount in grafana:
        assert (ROOT / "deploy" / mount.split(":")[0]).exists(), mount
    json.loads((ROOT / "deploy" / "grafana" / "sutra.json").read_text())
