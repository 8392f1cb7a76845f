"""The operations layer: the Helm chart, the alert rules and the Grafana dashboard.

The chart is rendered and linted with helm-python-sdk (Helm's Go SDK, no helm binary), and every
manifest is checked against the Kubernetes 1.30 schemas of kubernetes-validate. The monitoring and
Strimzi objects (ServiceMonitor, PrometheusRule, KafkaTopic) are custom resources with no schema
there, so they are checked for structure only. The rules go through `promtool check rules` and
`promtool test rules`. Every metric the dashboard and the rules name must be registered somewhere
in the Python source, so the dashboards cannot drift from the code.
"""

import ast
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from cli.config import REPO_ROOT, FlywheelConfig, ServeConfig, load_config
from server.config import ServerSettings

CHART = REPO_ROOT / "helm" / "flywheel"
RULES = CHART / "rules" / "flywheel-alerts.yaml"
RULE_TESTS = CHART / "rules" / "flywheel-alerts.test.yaml"
DASHBOARD = CHART / "dashboards" / "flywheel.json"
KUBERNETES_VERSION = "1.30.0"
SOURCE_PACKAGES = ("server", "feedback", "trainer", "gate", "flywheel")

CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    ("kubeflow.org/v1", "PyTorchJob"),
}
ALL_OPTIONAL_OBJECTS = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "kafkaTopics": {"enabled": True},
}
DNS_1123_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def gpu_values() -> dict:
    return yaml.safe_load((CHART / "values-gpu.yaml").read_text())


# TLS with client certificates, a NetworkPolicy, and Kafka over SASL_SSL with a CA, a client
# certificate and a password from Secrets of Strimzi's shapes.
LOCKED_DOWN = {
    "tls": {"enabled": True, "secretName": "fw-grpc-tls", "clientCASecretName": "fw-grpc-clients"},
    "networkPolicy": {
        "enabled": True,
        "grpcFrom": [{"namespaceSelector": {"matchLabels": {"flywheel/client": "true"}}}],
        "kafka": {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}]},
    },
    "config": {
        "kafka": {
            "bootstrap_servers": "kafka-bootstrap.kafka:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "flywheel",
        }
    },
    "kafkaAuth": {
        "caSecret": {"name": "kafka-cluster-ca-cert", "key": "ca.crt"},
        "clientCertSecret": {"name": "flywheel-user", "certKey": "user.crt", "keyKey": "user.key"},
        "saslPasswordSecret": {"name": "flywheel-user", "key": "password"},
    },
}

# The trainer on two ranks in its pod, and across a Kubeflow PyTorchJob of two pods.
TRAINER_RANKS = {"trainer": {"nprocPerNode": 2}}
TRAINER_PYTORCHJOB = {"trainer": {"nprocPerNode": 2, "pytorchJob": {"enabled": True, "workers": 1}}}

# Whole weights with one canary replica beside the two live ones.
CANARY_REPLICAS = {"server": {"canaryReplicas": 1}, "config": {"policy": {"adapter": "none"}}}

VALUE_SETS = {
    "defaults": {},
    "canary-replicas": CANARY_REPLICAS,
    "trainer-ranks": TRAINER_RANKS,
    "trainer-pytorchjob": TRAINER_PYTORCHJOB,
    "gpu": gpu_values(),
    "all-optional-objects": ALL_OPTIONAL_OBJECTS,
    "locked-down": LOCKED_DOWN,
}


@functools.cache
def _render(values_json: str) -> tuple[dict, ...]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(json.loads(values_json), name="fw", namespace="flywheel")
    return tuple(
        document
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    )


def render(values: dict) -> list[dict]:
    """Every object the chart renders with `values`, in template order."""
    return list(_render(json.dumps(values, sort_keys=True)))


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, (
        f"expected one {kind} {name}, got {[o['metadata']['name'] for o in objects if o['kind'] == kind]}"
    )
    return matches[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def rendered_config(values: dict) -> str:
    return find(render(values), "ConfigMap", "fw-flywheel-config")["data"]["config.toml"]


def env_of(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(deployment)["env"]}


def volume_files(deployment: dict, mount_path: str) -> dict[str, tuple[str, str]]:
    """File name under `mount_path` -> (Secret, key) it comes from, for a projected volume of Secrets."""
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }


def config_in_pod(objects: list[dict], deployment: dict, tmp_path: Path, monkeypatch) -> FlywheelConfig:
    """The config the pod's process would load: its config file, and its environment (Secrets as placeholders)."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(find(objects, "ConfigMap", "fw-flywheel-config")["data"]["config.toml"])
    placeholders = {"FLYWHEEL_SERVER__API_KEYS": "[]"}
    for name, variable in env_of(deployment).items():
        if name.startswith("FLYWHEEL_"):
            monkeypatch.setenv(name, variable.get("value", placeholders.get(name, "from-a-secret")))
    return load_config(config_file)


def without_nulls(table: dict) -> dict:
    return {k: without_nulls(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing: install the Debian package 'prometheus' (scripts/install.sh does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# ---------------------------------------------------------------------------------------- chart


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_chart_lints_clean(value_set):
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors; 1 is info
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(value_set):
    objects = render(VALUE_SETS[value_set])
    assert objects
    for manifest in objects:
        where = f"{manifest['kind']} {manifest['metadata']['name']}"
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCES:
            # kubernetes-validate has no schemas for custom resources: their structure is checked here
            # and in test_optional_objects_match_the_chart_files.
            assert DNS_1123_NAME.match(manifest["metadata"]["name"]), where
            assert isinstance(manifest.get("spec"), dict), where
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{where} is not valid Kubernetes {KUBERNETES_VERSION}: {path}: {error.message}")


def test_default_render_has_no_custom_resources():
    kinds = {(o["apiVersion"], o["kind"]) for o in render({})}
    assert not kinds & CUSTOM_RESOURCES
    assert {kind for _, kind in kinds} == {
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }


def test_config_file_is_the_values_config_block():
    awkward = {
        "config": {
            "gate": {
                "ratio": 1e-05,
                "quoted key": 3,
                "safety": {
                    "must_not_contain": ["<b>&", 'naïve "quote"\n'],
                    "rules": [{"name": "x", "limit": 2, "weight": 0.5}, {}],
                },
            }
        }
    }
    for values in ({}, gpu_values(), awkward):
        with helm.Chart.load(CHART) as chart:
            merged = chart.merge_values(values)
        # Whole numbers stay integers (toToml would write 1.073741824e+09) and nulls are left out.
        assert tomllib.loads(rendered_config(values)) == without_nulls(merged["config"])


def test_rendered_config_loads_into_the_processes_config(tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text(rendered_config({}))
    config = load_config(config_file)
    assert str(config.state_dir) == "/var/lib/flywheel"
    # Every process must be reachable from outside its pod.
    assert config.server.host == config.trainer.host == config.gate.host == "0.0.0.0"

    config_file.write_text(rendered_config(gpu_values()))
    engine = load_config(config_file).engine
    assert (engine.dtype, engine.enforce_eager, engine.gpu_memory_utilization) == ("bfloat16", False, 0.9)
    assert engine.kv_cache_bytes == 0, "values-gpu.yaml must let vLLM size the KV cache (kv_cache_bytes 0)"


def test_server_pods_probe_grpc_health_and_drain_before_they_are_killed():
    objects = render({})
    server = find(objects, "Deployment", "fw-flywheel-server")
    pod = server["spec"]["template"]["spec"]
    main = container(server)
    assert main["command"] + main["args"] == ["flywheel", "serve", "--config", "/etc/flywheel/config.toml"]
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"grpc": 50051, "metrics": 9400}
    assert main["readinessProbe"]["grpc"] == {"port": 50051, "service": "flywheel.v1.Flywheel"}
    assert main["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert main["startupProbe"]["grpc"] == {"port": 50051, "service": ""}

    pre_stop_seconds = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
    grace_seconds = tomllib.loads(rendered_config({}))["server"]["grace_period_seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + grace_seconds > grace_seconds

    budget = find(objects, "PodDisruptionBudget", "fw-flywheel-server")
    assert budget["spec"]["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]


def test_pods_run_as_non_root_with_a_read_only_root_filesystem():
    for deployment in (o for o in render(gpu_values()) if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        main = container(deployment)
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/etc/flywheel"} <= mounts


def test_registry_volume_is_shared_and_read_only_on_the_servers():
    objects = render({})
    claim = find(objects, "PersistentVolumeClaim", "fw-flywheel-registry")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    expected = {
        "fw-flywheel-server": (["serve"], True, 9400),
        "fw-flywheel-trainer": (["train"], False, 9401),
        "fw-flywheel-gate": (["gate"], False, 9402),
    }
    for name, (command, read_only, metrics_port) in expected.items():
        deployment = find(objects, "Deployment", name)
        main = container(deployment)
        assert main["command"] + main["args"] == ["flywheel", *command, "--config", "/etc/flywheel/config.toml"]
        (registry,) = [m for m in main["volumeMounts"] if m["name"] == "registry"]
        assert (registry["mountPath"], registry["readOnly"]) == ("/var/lib/flywheel", read_only), name
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "fw-flywheel-registry"
        metrics = find(objects, "Service", f"{name}-metrics")
        assert metrics["spec"]["ports"][0]["port"] == metrics_port
        assert metrics["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    # Read-only servers cannot seed an empty registry: they wait for the trainer or the gate to.
    server = find(objects, "Deployment", "fw-flywheel-server")
    (wait,) = server["spec"]["template"]["spec"]["initContainers"]
    assert wait["command"][-1] == "/var/lib/flywheel/registry"
    # Each replica spools to its own emptyDir, not to the shared (and read-only) volume.
    env = {e["name"]: e.get("value") for e in container(server)["env"]}
    (spool,) = [m for m in container(server)["volumeMounts"] if m["name"] == "spool"]
    assert env["FLYWHEEL_SPOOL__DIRECTORY"] == spool["mountPath"]
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["spool"]

    writable = find(render({"server": {"registryReadOnly": False}}), "Deployment", "fw-flywheel-server")
    assert "initContainers" not in writable["spec"]["template"]["spec"]
    (registry,) = [m for m in container(writable)["volumeMounts"] if m["name"] == "registry"]
    assert registry["readOnly"] is False

    with_claim = render({"persistence": {"existingClaim": "registry"}})
    assert not [o for o in with_claim if o["kind"] == "PersistentVolumeClaim"]
    server = find(with_claim, "Deployment", "fw-flywheel-server")
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "registry"


def test_gpu_values_ask_for_a_gpu_and_the_cuda_image():
    objects = render(gpu_values())
    for name in ("fw-flywheel-server", "fw-flywheel-trainer", "fw-flywheel-gate"):
        main = container(find(objects, "Deployment", name))
        assert main["image"] == "flywheel:0.1.0-cuda"
        gpus = main["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if name == "fw-flywheel-server" else None), (
            "the trainer and gate keep their models on the CPU"
        )
    cpu_server = container(find(render({}), "Deployment", "fw-flywheel-server"))
    assert cpu_server["image"] == "flywheel:0.1.0"
    assert "nvidia.com/gpu" not in cpu_server["resources"].get("limits", {})


def test_secrets_reach_the_servers_environment():
    api_keys = [{"principal": "acme", "sha256": "a" * 64}, {"principal": "globex", "sha256": "b" * 64}]
    objects = render({"secrets": {"feedbackTokenSecret": "k" * 32, "apiKeys": api_keys, "kafkaSaslPassword": "pw"}})
    secret = find(objects, "Secret", "fw-flywheel-secrets")
    keys = ServerSettings.model_validate({"api_keys": json.loads(base64.b64decode(secret["data"]["api-keys"]))})
    assert keys.principals_by_key_digest() == {"a" * 64: "acme", "b" * 64: "globex"}, (
        "the server reads what the chart writes"
    )
    assert {"feedback-token-secret", "api-keys", "kafka-sasl-password"} == set(secret["data"])
    env = {e["name"]: e for e in container(find(objects, "Deployment", "fw-flywheel-server"))["env"]}
    secret_refs = {
        name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secret_refs == {
        "FLYWHEEL_SERVER__FEEDBACK_TOKEN_SECRET": {"name": "fw-flywheel-secrets", "key": "feedback-token-secret"},
        "FLYWHEEL_SERVER__API_KEYS": {"name": "fw-flywheel-secrets", "key": "api-keys", "optional": True},
        "FLYWHEEL_KAFKA__SASL_PASSWORD": {
            "name": "fw-flywheel-secrets",
            "key": "kafka-sasl-password",
            "optional": True,
        },
    }
    trainer_env = {e["name"] for e in container(find(objects, "Deployment", "fw-flywheel-trainer"))["env"]}
    assert "FLYWHEEL_KAFKA__SASL_PASSWORD" in trainer_env
    assert not {"FLYWHEEL_SERVER__FEEDBACK_TOKEN_SECRET", "FLYWHEEL_SERVER__API_KEYS"} & trainer_env

    generated = find(render({}), "Secret", "fw-flywheel-secrets")
    assert len(generated["data"]["feedback-token-secret"]) > 40  # a random key shared by all replicas

    existing = render({"secrets": {"existingSecret": "mine"}})
    assert not [o for o in existing if o["kind"] == "Secret"]
    env = {e["name"]: e for e in container(find(existing, "Deployment", "fw-flywheel-server"))["env"]}
    assert env["FLYWHEEL_SERVER__FEEDBACK_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "mine"


def test_feedback_token_secret_is_the_same_on_every_render():
    """helm template and Argo CD render without a cluster, so `lookup` cannot keep the key: the value (or
    existingSecret) must, and nothing that reaches a pod may change from one render to the next."""
    given = {"secrets": {"feedbackTokenSecret": "k" * 48}}
    assert render(given) == list(_render.__wrapped__(json.dumps(given, sort_keys=True)))
    secret = find(render(given), "Secret", "fw-flywheel-secrets")
    assert secret["data"]["feedback-token-secret"] == base64.b64encode(b"k" * 48).decode()

    existing = {"secrets": {"existingSecret": "mine"}}
    assert render(existing) == list(_render.__wrapped__(json.dumps(existing, sort_keys=True)))

    # With neither, each offline render generates a key (the README says to give one there); the pods'
    # templates must not change with it, or every Argo CD sync would restart them all.
    first, second = render({}), list(_render.__wrapped__(json.dumps({})))

    def key(objects: list[dict]) -> str:
        return find(objects, "Secret", "fw-flywheel-secrets")["data"]["feedback-token-secret"]

    assert key(first) != key(second)
    assert [o for o in first if o["kind"] != "Secret"] == [o for o in second if o["kind"] != "Secret"]


def test_tls_mounts_the_certificate_secret_and_the_server_serves_it(tmp_path, monkeypatch):
    objects = render(LOCKED_DOWN)
    server = find(objects, "Deployment", "fw-flywheel-server")
    settings = config_in_pod(objects, server, tmp_path, monkeypatch).server
    files = volume_files(server, "/etc/flywheel-tls")
    assert files == {
        "tls.crt": ("fw-grpc-tls", "tls.crt"),
        "tls.key": ("fw-grpc-tls", "tls.key"),
        "client-ca.crt": ("fw-grpc-clients", "ca.crt"),
    }
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == (
        Path("/etc/flywheel-tls/tls.crt"),
        Path("/etc/flywheel-tls/tls.key"),
        Path("/etc/flywheel-tls/client-ca.crt"),
    )
    # The kubelet's gRPC probes speak no TLS: with TLS on they only connect.
    main = container(server)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["tcpSocket"] == {"port": 50051} and "grpc" not in main[probe], probe

    plain = find(render({}), "Deployment", "fw-flywheel-server")
    assert not {name for name in env_of(plain) if "TLS" in name}
    assert "/etc/flywheel-tls" not in {m["mountPath"] for m in container(plain)["volumeMounts"]}
    assert container(plain)["readinessProbe"]["grpc"]["service"] == "flywheel.v1.Flywheel"

    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match="secretName"):
            chart.validate_schema({"tls": {"enabled": True}})
        with pytest.raises(helm.HelmValuesError, match="tls_cert_file"):
            chart.validate_schema({"config": {"server": {"tls_cert_file": "/x"}}})


def test_kafka_sasl_and_tls_reach_every_pod_from_their_secrets(tmp_path, monkeypatch):
    objects = render(LOCKED_DOWN)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) == 3
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        password = env_of(deployment)["FLYWHEEL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        # Not optional once SASL is on: a missing password stops the pod before the process starts.
        assert password == {"name": "flywheel-user", "key": "password", "optional": False}, name
        assert volume_files(deployment, "/etc/flywheel-kafka-tls") == {
            "ca.crt": ("kafka-cluster-ca-cert", "ca.crt"),
            "client.crt": ("flywheel-user", "user.crt"),
            "client.key": ("flywheel-user", "user.key"),
        }, name
        kafka = config_in_pod(objects, deployment, tmp_path, monkeypatch).kafka
        assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == (
            "SASL_SSL",
            "SCRAM-SHA-512",
            "flywheel",
        )
        assert kafka.sasl_password.get_secret_value() == "from-a-secret"
        assert (kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile) == (
            Path("/etc/flywheel-kafka-tls/ca.crt"),
            Path("/etc/flywheel-kafka-tls/client.crt"),
            Path("/etc/flywheel-kafka-tls/client.key"),
        ), name

    # The chart's own Secret when no Secret of yours is named; optional while Kafka asks no password.
    plain = env_of(find(render({}), "Deployment", "fw-flywheel-gate"))
    assert plain["FLYWHEEL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fw-flywheel-secrets",
        "key": "kafka-sasl-password",
        "optional": True,
    }
    assert not {name for name in plain if name.startswith("FLYWHEEL_KAFKA__SSL_")}

    sasl = {"kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"}}
    with pytest.raises(helm.HelmRenderError, match="needs a SASL password: kafkaAuth.saslPasswordSecret.name"):
        render({"config": sasl})
    with pytest.raises(helm.HelmRenderError, match="needs config.kafka.sasl_mechanism and config.kafka.sasl_username"):
        render({"config": {"kafka": {"security_protocol": "SASL_SSL"}}, "secrets": {"kafkaSaslPassword": "pw"}})
    with pytest.raises(helm.HelmRenderError, match="set config.kafka.security_protocol to SSL or SASL_SSL"):
        render({"kafkaAuth": {"caSecret": {"name": "kafka-cluster-ca-cert"}}})


def test_network_policy_opens_grpc_to_clients_metrics_to_prometheus_and_kafka():
    assert not [o for o in render({}) if o["kind"] == "NetworkPolicy"]  # off by default
    objects = render(LOCKED_DOWN)
    policy = find(objects, "NetworkPolicy", "fw-flywheel")["spec"]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for deployment in deployments:
        assert (
            policy["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
    assert policy["policyTypes"] == ["Ingress", "Egress"]

    grpc_rule, metrics_rule = policy["ingress"]
    assert grpc_rule == {
        "ports": [{"port": "grpc", "protocol": "TCP"}],
        "from": LOCKED_DOWN["networkPolicy"]["grpcFrom"],
    }
    # Named ports: only the servers name one grpc; every pod names its metrics port.
    named = {d["metadata"]["name"]: {p["name"] for p in container(d)["ports"]} for d in deployments}
    assert {name for name, ports in named.items() if "grpc" in ports} == {"fw-flywheel-server"}
    assert all("metrics" in ports for ports in named.values())
    assert metrics_rule == {
        "ports": [{"port": "metrics", "protocol": "TCP"}],
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}}
        ],
    }

    dns, kafka = policy["egress"]
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"] and {p["port"] for p in dns["ports"]} == {53}
    assert kafka == {"ports": [{"port": 9093, "protocol": "TCP"}], "to": LOCKED_DOWN["networkPolicy"]["kafka"]["to"]}

    def kafka_ports(values: dict) -> list[int]:
        (policy,) = [o for o in render({"networkPolicy": {"enabled": True}} | values) if o["kind"] == "NetworkPolicy"]
        return [p["port"] for p in policy["spec"]["egress"][1]["ports"]]

    assert kafka_ports({"config": {"kafka": {"bootstrap_servers": "a:9092, b:9094,c:9092"}}}) == [9092, 9094]
    explicit = {"networkPolicy": {"enabled": True, "kafka": {"ports": [19092, 19093]}}}
    assert kafka_ports(explicit) == [19092, 19093]
    with pytest.raises(helm.HelmRenderError, match="networkPolicy.kafka.ports"):
        kafka_ports({"config": {"kafka": {"bootstrap_servers": "kafka-bootstrap"}}})


def test_optional_objects_match_the_chart_files():
    objects = render(ALL_OPTIONAL_OBJECTS)

    rule = find(objects, "PrometheusRule", "fw-flywheel")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())

    dashboard = find(objects, "ConfigMap", "fw-flywheel-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["flywheel.json"]) == json.loads(DASHBOARD.read_text())

    monitor = find(objects, "ServiceMonitor", "fw-flywheel")
    selected = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
    ]
    assert sorted(selected) == ["fw-flywheel-gate-metrics", "fw-flywheel-server-metrics", "fw-flywheel-trainer-metrics"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    topics = [o for o in objects if o["kind"] == "KafkaTopic"]
    config_topics = yaml.safe_load((CHART / "values.yaml").read_text())["config"]["kafka"]["topics"]
    assert sorted(t["spec"]["topicName"] for t in topics) == sorted(config_topics.values())
    for topic in topics:
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "kafka"
        assert (topic["spec"]["partitions"], topic["spec"]["replicas"]) == (3, 3)


# ---------------------------------------------------------------------------------------- rules


@pytest.mark.subprocess
def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.subprocess
def test_promtool_unit_tests_pass():
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_documented():
    alerts = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    for alert in alerts:
        assert alert["alert"] in tested, f"{alert['alert']} has no firing case in {RULE_TESTS.name}"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert "for" in alert
        assert alert["annotations"]["summary"] and "Runbook:" in alert["annotations"]["description"]


# ------------------------------------------------------------------------------------ dashboard


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    annotations = [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]] + annotations


def test_dashboard_panels_have_a_datasource_and_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = dashboard_panels()
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {p["title"] for p in dashboard["panels"] if p["type"] == "row"} == {
        "Serving",
        "Feedback",
        "Training",
        "Gate and swaps",
    }
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


@pytest.mark.subprocess
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses them as recording rules, with Grafana's variables filled in."""
    filled = [
        expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$namespace", ".*")
        for expr in dashboard_expressions()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{number}", "expr": expr} for number, expr in enumerate(filled)],
            }
        ]
    }
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------- metric names

METRIC_NAME = re.compile(r"flywheel_[a-z_]+")
EXPOSITION_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def metric_names_used() -> dict[str, set[str]]:
    """Metric name (as registered in code) -> where the dashboard or the rules use it."""
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    texts = [(f"alert {rule['alert']}", rule["expr"]) for rule in rules]
    texts += [(f"alert {rule['alert']} annotations", " ".join(rule["annotations"].values())) for rule in rules]
    texts += [("dashboard", expr) for expr in dashboard_expressions()]
    used: dict[str, set[str]] = {}
    for where, text in texts:
        for name in METRIC_NAME.findall(text):
            for suffix in EXPOSITION_SUFFIXES:
                if name.endswith(suffix):
                    name = name.removesuffix(suffix)
                    break
            used.setdefault(name, set()).add(where)
    return used


def string_literals_in_source() -> set[str]:
    literals: set[str] = set()
    for package in SOURCE_PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    literals.add(node.value)
    return literals


def test_every_metric_in_dashboard_and_rules_is_registered_in_code():
    literals = string_literals_in_source()
    used = metric_names_used()
    assert len(used) > 30
    missing = {
        name: sorted(where)
        for name, where in sorted(used.items())
        if name not in literals and f"{name}_total" not in literals
    }
    assert not missing, (
        f"metrics the dashboard or alerts use but no Python source under {', '.join(SOURCE_PACKAGES)}/ registers "
        f"(as a string literal): {json.dumps(missing, indent=2)}"
    )


def test_trainer_ranks_start_under_torchrun_in_one_pod_or_a_pytorchjob():
    (one_process,) = [
        o for o in render({}) if o["kind"] == "Deployment" and o["metadata"]["name"] == "fw-flywheel-trainer"
    ]
    assert one_process["spec"]["template"]["spec"]["containers"][0]["command"] == ["flywheel"]

    (deployment,) = [
        o for o in render(TRAINER_RANKS) if o["kind"] == "Deployment" and o["metadata"]["name"] == "fw-flywheel-trainer"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    assert container["args"] == [
        "--standalone", "--nproc_per_node", "2", "--no-python", "flywheel", "train", "--config", "/etc/flywheel/config.toml",
    ]  # fmt: skip

    objects = render(TRAINER_PYTORCHJOB)
    assert not [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "fw-flywheel-trainer"]
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    assert job["spec"]["nprocPerNode"] == "2"
    master, worker = (job["spec"]["pytorchReplicaSpecs"][kind] for kind in ("Master", "Worker"))
    assert (master["replicas"], worker["replicas"]) == (1, 1)
    for replica in (master, worker):
        (container,) = replica["template"]["spec"]["containers"]
        # The training operator finds its container by this name and gives torchrun its rendezvous (PET_*).
        assert container["name"] == "pytorch"
        assert container["args"][:4] == ["--nproc_per_node", "2", "--no-python", "flywheel"]
        assert {"name": "registry", "mountPath": "/var/lib/flywheel"} in [
            {key: mount[key] for key in ("name", "mountPath")} for mount in container["volumeMounts"]
        ]
    # Only rank 0's pod (the Master) receives the metrics Service's traffic.
    (service,) = [
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "fw-flywheel-trainer-metrics"
    ]
    selector = service["spec"]["selector"].items()
    assert selector <= master["template"]["metadata"]["labels"].items()
    assert not selector <= worker["template"]["metadata"]["labels"].items()


def test_the_openai_door_is_a_named_port_on_the_servers_their_service_and_the_network_policy():
    closed = render({})
    assert "http" not in {p["name"] for p in container(find(closed, "Deployment", "fw-flywheel-server"))["ports"]}
    values = LOCKED_DOWN | {"config": LOCKED_DOWN["config"] | {"server": {"http_port": 8000}}}
    objects = render(values)
    ports = {
        p["name"]: p["containerPort"] for p in container(find(objects, "Deployment", "fw-flywheel-server"))["ports"]
    }
    assert ports["http"] == 8000
    service_ports = {p["name"]: p for p in find(objects, "Service", "fw-flywheel-server")["spec"]["ports"]}
    assert service_ports["http"]["port"] == 8000 and service_ports["http"]["targetPort"] == "http"
    callers_rule = find(objects, "NetworkPolicy", "fw-flywheel")["spec"]["ingress"][0]
    assert callers_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]
    assert "http_port = 8000" in find(objects, "ConfigMap", "fw-flywheel-config")["data"]["config.toml"]


def test_canary_replicas_are_a_second_deployment_behind_the_same_service_and_the_gate_knows_their_share(
    tmp_path, monkeypatch
):
    assert [
        o["metadata"]["name"] for o in render({}) if o["kind"] == "Deployment" and "server" in o["metadata"]["name"]
    ] == ["fw-flywheel-server"]
    objects = render(CANARY_REPLICAS)
    live, canary = (
        find(objects, "Deployment", "fw-flywheel-server"),
        find(objects, "Deployment", "fw-flywheel-server-canary"),
    )
    assert (live["spec"]["replicas"], canary["spec"]["replicas"]) == (2, 1)
    live_pods, canary_pods = (d["spec"]["template"]["metadata"]["labels"].items() for d in (live, canary))
    assert (dict(live_pods)["flywheel/role"], dict(canary_pods)["flywheel/role"]) == ("live", "canary")
    for selects_both in (
        find(objects, "Service", "fw-flywheel-server"),
        find(objects, "Service", "fw-flywheel-server-metrics"),
    ):
        assert selects_both["spec"]["selector"].items() <= live_pods & canary_pods
    assert find(objects, "PodDisruptionBudget", "fw-flywheel-server")["spec"]["selector"]["matchLabels"].items() <= (
        live_pods & canary_pods
    )
    canary_selector = canary["spec"]["selector"]["matchLabels"].items()
    assert canary_selector <= canary_pods and not canary_selector <= live_pods
    assert live["spec"]["selector"] == find(render({}), "Deployment", "fw-flywheel-server")["spec"]["selector"], (
        "a Deployment's selector cannot change: an upgrade would fail"
    )

    def config_of(deployment: dict) -> FlywheelConfig:
        with monkeypatch.context() as patched:
            return config_in_pod(objects, deployment, tmp_path, patched)

    assert config_of(canary).for_process(ServeConfig).server.canary_replica
    assert not config_of(live).for_process(ServeConfig).server.canary_replica
    assert config_of(find(objects, "Deployment", "fw-flywheel-gate")).gate.canary.replica_share == pytest.approx(1 / 3)
    default = render({})
    with monkeypatch.context() as patched:
        assert (
            config_in_pod(
                default, find(default, "Deployment", "fw-flywheel-gate"), tmp_path, patched
            ).gate.canary.replica_share
            == 0
        )

    with pytest.raises(helm.HelmRenderError, match="server.canaryReplicas needs server.replicas above 0"):
        render({"server": {"replicas": 0, "canaryReplicas": 1}})
    with pytest.raises(helm.HelmRenderError, match="server.canaryReplicas is for whole weights"):
        render(CANARY_REPLICAS | {"config": {"policy": {"adapter": "lora"}}})
    # Unsaid, the model directory decides, and the demo model's settings choose adapters.
    with pytest.raises(helm.HelmRenderError, match="set config.policy.adapter to none"):
        render({"server": {"canaryReplicas": 1}})
