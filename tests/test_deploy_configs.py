"""What deploy/ ships: the kustomize base validates against the Kubernetes schemas (offline, from the
kubernetes-validate package) and its parts agree with each other; the Envoy config hashes on the
delta header; the nginx config passes the real ``nginx -t``."""
from __future__ import annotations

import re
import tomllib

import kubernetes_validate
import pytest
import yaml

from server.client import DELTA_HEADER
from server.config import ServerConfig
from tests.deploy_helpers import DEPLOY, KUSTOMIZE_BASE, NGINX_CONF, nginx_binary, nginx_main_conf, nginx_test, render_kustomization
from tests.services import missing

OLDEST_K8S = "1.27.0"  # native gRPC probes are GA from 1.27


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def docs():
    return render_kustomization()


@pytest.mark.parametrize("version", [OLDEST_K8S, kubernetes_validate.utils.latest_version()])
def test_kustomize_base_validates_against_the_kubernetes_schemas(docs, version):
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, on any error


def test_the_schema_check_catches_a_misspelt_field(docs):
    bad = yaml.safe_load(yaml.safe_dump(by_kind(docs, "Deployment")["deltaserve"]))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, OLDEST_K8S, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(by_kind(docs, "PodDisruptionBudget")["deltaserve"]))
    bad["spec"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST_K8S, strict=True)


def test_replicas_deployment_has_gpu_probes_drain_and_scrape_annotations(docs):
    dep = by_kind(docs, "Deployment")["deltaserve"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], f"{probe} must use the native grpc.health.v1 probe"
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    config = tomllib.loads((KUSTOMIZE_BASE / "config.toml").read_text())
    ServerConfig.from_dict(config)  # every key is a ServerConfig field, every value in range
    assert config["blobs"].startswith("s3://") and "catalogue" not in config, "the URL with a password is a Secret"
    drain = config.get("health_grace_seconds", ServerConfig().health_grace_seconds) + config["grace_seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(sleep[1]) + drain, \
        "the kubelet must not SIGKILL a replica before its drain ends"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    assert config["metrics_listen"].endswith(f":{ports['metrics']}") and config["listen"].endswith(f":{ports['grpc']}")
    assert selects(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])


def test_services_budgets_secrets_and_config_maps_refer_to_what_exists(docs):
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    secrets, config_maps = by_kind(docs, "Secret"), by_kind(docs, "ConfigMap")
    replica_labels = deployments["deltaserve"]["spec"]["template"]["metadata"]["labels"]
    front_labels = deployments["deltaserve-front"]["spec"]["template"]["metadata"]["labels"]
    assert services["deltaserve"]["spec"]["clusterIP"] == "None", "the front needs every replica's address"
    assert selects(services["deltaserve"]["spec"]["selector"], replica_labels)
    assert not selects(services["deltaserve"]["spec"]["selector"], front_labels)
    assert selects(services["deltaserve-front"]["spec"]["selector"], front_labels)
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert selects(budgets["deltaserve"]["spec"]["selector"]["matchLabels"], replica_labels)
    assert budgets["deltaserve"]["spec"]["maxUnavailable"] == 1
    assert selects(budgets["deltaserve-front"]["spec"]["selector"]["matchLabels"], front_labels)
    for dep in deployments.values():
        spec = dep["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{env['name']}: no such secret key"
    assert "DELTASERVE_CATALOGUE" in {e["name"] for e in deployments["deltaserve"]["spec"]["template"]["spec"]
                                      ["containers"][0]["env"]}
    assert secrets["deltaserve-catalogue"]["stringData"]["url"].startswith("postgresql://")


def test_envoy_rings_on_the_delta_header_over_the_headless_service(docs):
    assert (DEPLOY / "envoy" / "envoy.yaml").resolve() == (KUSTOMIZE_BASE / "envoy.yaml").resolve(), "one copy"
    envoy = yaml.safe_load(by_kind(docs, "ConfigMap")["deltaserve-envoy"]["data"]["envoy.yaml"])
    (listener,) = [x for x in envoy["static_resources"]["listeners"] if x["name"] == "grpc"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": DELTA_HEADER}}]
    assert set(route["route"]["retry_policy"]["retry_on"].split(",")) <= {"connect-failure", "refused-stream"}, \
        "never retry a call a replica may have started (an upload or a generation would run twice)"
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    cluster = clusters[route["route"]["cluster"]]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    assert "grpc_health_check" in cluster["health_checks"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    service = by_kind(docs, "Service")["deltaserve"]
    assert address["address"] == service["metadata"]["name"]
    assert address["port_value"] == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    front = by_kind(docs, "Deployment")["deltaserve-front"]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in front["spec"]["containers"][0]["ports"]}
    assert listener["address"]["socket_address"]["port_value"] == ports["grpc"]
    assert int(front["metadata"]["annotations"]["prometheus.io/port"]) == ports["probes"]
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", "the admin API stays private"


def test_nginx_config_passes_nginx_t_and_routes_by_the_delta_header(tmp_path):
    if nginx_binary() is None:
        missing("nginx", "apt-get install -y nginx")
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*hash \$deltaserve_affinity consistent;", text, re.M)
    assert re.search(r"^map \$http_" + DELTA_HEADER.replace("-", "_") + r" \$deltaserve_affinity", text, re.M)
    for directive in ("grpc_pass grpc://deltaserve;", "grpc_next_upstream error timeout;", "keepalive 64;"):
        assert directive in text
    assert "non_idempotent" not in re.sub(r"#.*", "", text), "a started call must never be sent twice"
    done = nginx_test(nginx_main_conf(tmp_path / "ok", NGINX_CONF))
    assert done.returncode == 0, done.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(text.replace("consistent;", "consistant;"))
    assert nginx_test(nginx_main_conf(tmp_path / "broken", broken)).returncode != 0, "nginx -t must be able to fail"
