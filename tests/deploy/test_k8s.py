"""Kubernetes manifests: schema-valid, lint-clean, and consistent with each other and with the service settings
(a renamed group, port or secret in one file must not silently break probes, scaling or scraping)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stream.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
# Kinds that need a CRD (no schema in kubernetes-validate): checked structurally below.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "KafkaTopic", "Kustomization"}
# Upper bound of model time for one batch of batch.max_posts on the target GPU, cold (generous).
INFERENCE_BUDGET_S = 20.0


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def name(doc: dict[str, Any]) -> str | None:
    return doc.get("metadata", {}).get("name")


def _path(field_path: str) -> list[str | int]:
    """A kustomize fieldPath (``a.b.0.[x.y/z]``) as keys and list indices."""
    parts = re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", field_path)
    return [bracketed or (int(plain) if plain.isdigit() else plain) for bracketed, plain in parts]


def rendered() -> list[dict[str, Any]]:
    """The manifests as ``kubectl apply -k`` sends them: the kustomization's replacements applied."""
    docs = [doc for _, doc in manifests()]
    kustomization = next(doc for doc in docs if doc["kind"] == "Kustomization")
    for replacement in kustomization.get("replacements", []):
        source = replacement["source"]
        [origin] = [d for d in docs if d["kind"] == source["kind"] and name(d) == source["name"]]
        value: Any = origin
        for key in _path(source["fieldPath"]):
            value = value[key]
        for target in replacement["targets"]:
            select = target["select"]
            matched = [d for d in docs if d["kind"] == select["kind"] and name(d) == select["name"]]
            assert matched, f"replacement target {select} selects nothing"
            for doc in matched:
                for field_path in target["fieldPaths"]:
                    *parents, last = _path(field_path)
                    node = doc
                    for key in parents:
                        node = node[key]
                    assert last in node if isinstance(node, dict) else last < len(node), field_path
                    node[last] = value
    return docs


def one(kind: str) -> dict[str, Any]:
    """The one manifest of ``kind`` (the ConfigMap: the service's, not kafka.yaml's)."""
    [doc] = [
        doc
        for doc in rendered()
        if doc["kind"] == kind and (kind, name(doc)) != ("ConfigMap", "postsense-kafka")
    ]
    return doc


def secret_keys() -> set[str]:
    return set(one("Secret")["stringData"])


def kafka_configmap() -> dict[str, str]:
    [doc] = [d for d in rendered() if d["kind"] == "ConfigMap" and name(d) == "postsense-kafka"]
    return doc["data"]


def container_args() -> list[str]:
    """The container's args with ``$(VAR)`` resolved from its env, as the kubelet does."""
    env = {}
    for var in container()["env"]:
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        env[var["name"]] = kafka_configmap()[ref["key"]] if ref else var["value"]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container()["args"]]


def settings_from_configmap(tmp_path: Path) -> Settings:
    """The pod's settings loaded by the real loader and CLI flags; stand-in files for the mounted Secrets."""
    from stream.cli import build_parser, flags_from_args

    config = tmp_path / "config.toml"
    config.write_text(one("ConfigMap")["data"]["config.toml"])
    args, _ = build_parser().parse_known_args(container_args())
    flags: dict[str, dict[str, str]] = flags_from_args(args)
    for section, fields in tomllib.loads(config.read_text()).items():
        for field, value in fields.items():
            if field.endswith("_file") or field == "ssl_cafile":
                stand_in = tmp_path / Path(value).name
                stand_in.write_text("redis://user:pw@redis:6379/0" if section == "redis" else "secret")
                flags.setdefault(section, {})[field] = str(stand_in)
    return load_settings(config, flags)


def container() -> dict[str, Any]:
    [c] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def pod_labels() -> dict[str, str]:
    return one("Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_yamllint_passes_on_everything_in_deploy() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "-f",
            "parsable",
            "-c",
            str(DEPLOY / ".yamllint.yaml"),
            str(DEPLOY),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_builtin_kinds_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for path, doc in manifests():
        kinds.add(doc["kind"])
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}: {exc.message} at {list(exc.path)}")
    assert {
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "ServiceMonitor",
    } <= kinds


def test_kustomization_lists_every_manifest_of_the_directory() -> None:
    listed = set(one("Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_configmap_holds_valid_settings_and_its_secrets_come_from_the_secret(tmp_path: Path) -> None:
    settings = settings_from_configmap(tmp_path)
    assert settings.model.device.startswith("cuda")
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    secret_dir = mounts["secrets"]
    for section, fields in tomllib.loads(one("ConfigMap")["data"]["config.toml"]).items():
        for field, value in fields.items():
            if field.endswith("_file"):
                assert Path(value).parent == Path(secret_dir), f"{section}.{field}"
                assert Path(value).name in secret_keys(), f"{section}.{field}: no such key in the Secret"


def test_deployment_reads_the_configmap_it_ships_with() -> None:
    c = container()
    config_arg = c["args"][c["args"].index("--config") + 1]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == config_arg and mount["subPath"] in one("ConfigMap")["data"]
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] == one("Secret")["metadata"]["name"]


def test_probes_hit_the_metrics_server_endpoints(tmp_path: Path) -> None:
    settings = settings_from_configmap(tmp_path)
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports[get["port"]] == settings.metrics.port, probe
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics.port)


def test_pod_asks_for_a_gpu_and_runs_unprivileged() -> None:
    c = container()
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod_security = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_termination_grace_outlasts_the_worst_batch_plus_commit(tmp_path: Path) -> None:
    s = settings_from_configmap(tmp_path)
    worst = (
        s.batch.max_wait_ms / 1000
        + INFERENCE_BUDGET_S
        + s.kafka.produce_timeout_s
        + s.kafka.request_timeout_ms / 1000
    )
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > worst, f"grace {grace} s <= worst batch + publish + commit {worst} s"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["postsense"]["stop_grace_period"] == f"{grace}s"


def test_pdb_service_and_servicemonitor_select_the_pods(tmp_path: Path) -> None:
    labels = pod_labels()
    assert selects(one("Deployment")["spec"]["selector"]["matchLabels"], labels)
    pdb = one("PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels) and pdb["maxUnavailable"] == 1
    service = one("Service")
    assert selects(service["spec"]["selector"], labels)
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container()["ports"]}
    monitor = one("ServiceMonitor")["spec"]
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    [endpoint] = monitor["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # The consumer_group label the dashboard and alerts group by comes from a pod label equal to the group id.
    [relabel] = [r for r in endpoint["relabelings"] if r["targetLabel"] == "consumer_group"]
    [source] = relabel["sourceLabels"]
    # Prometheus turns every character outside [a-zA-Z0-9_] of a pod label name into "_".
    pod_label = next(k for k in labels if "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k) == source)
    assert labels[pod_label] == settings_from_configmap(tmp_path).kafka.group_id


def test_keda_scales_the_deployment_on_this_groups_lag_within_the_partition_count(tmp_path: Path) -> None:
    s = settings_from_configmap(tmp_path)
    scaled = one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    [trigger] = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    # The CRD types trigger metadata as map[string]string: an unquoted number or boolean is rejected on apply.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["consumerGroup"] == s.kafka.group_id
    assert meta["topic"] == s.kafka.input_topic
    assert meta["bootstrapServers"] == ",".join(s.kafka.bootstrap_servers)
    assert (
        meta["sasl"]
        == {"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext"}[
            s.kafka.sasl_mechanism
        ]
    )
    assert (meta["tls"] == "enable") == s.kafka.security_protocol.value.endswith("SSL")
    assert meta["allowIdleConsumers"] == "false"  # KEDA then never scales past the partition count itself
    assert int(meta["lagThreshold"]) > 0
    topics = {doc["metadata"]["name"]: doc["spec"] for _, doc in manifests() if doc["kind"] == "KafkaTopic"}
    assert (
        1
        <= scaled["minReplicaCount"]
        <= scaled["maxReplicaCount"]
        <= topics[s.kafka.input_topic]["partitions"]
    )
    assert {s.kafka.output_topic, s.kafka.dead_letter_topic} <= set(topics)
    auth = one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password", "ca"}
    for ref in (refs["username"], refs["password"]):
        assert ref["name"] == one("Secret")["metadata"]["name"] and ref["key"] in secret_keys()
    assert one("Secret")["stringData"][refs["username"]["key"]] == s.kafka.sasl_username


def test_kafka_names_are_defined_once_and_reach_the_service_keda_and_the_metrics_label(
    tmp_path: Path,
) -> None:
    kafka = kafka_configmap()
    s = settings_from_configmap(tmp_path)
    assert (
        s.kafka.group_id == kafka["group-id"]
        and ",".join(s.kafka.bootstrap_servers) == kafka["bootstrap-servers"]
    )
    meta = one("ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert (meta["consumerGroup"], meta["bootstrapServers"]) == (
        kafka["group-id"],
        kafka["bootstrap-servers"],
    )
    assert pod_labels()["postsense.io/consumer-group"] == kafka["group-id"]
    # Nowhere else: the service's config file leaves them out, and the bootstrap address appears in no other file.
    assert not {"group_id", "bootstrap_servers"} & set(
        tomllib.loads(one("ConfigMap")["data"]["config.toml"])["kafka"]
    )
    others = "".join(p.read_text() for p in K8S.glob("*.yaml") if p.name != "kafka.yaml")
    assert kafka["bootstrap-servers"] not in others
    # Strimzi's names: <cluster>-kafka-bootstrap is the bootstrap Service, <cluster>-cluster-ca-cert the CA Secret.
    cluster = kafka["bootstrap-servers"].split("-kafka-bootstrap")[0]
    topics = [doc for _, doc in manifests() if doc["kind"] == "KafkaTopic"]
    assert {t["metadata"]["labels"]["strimzi.io/cluster"] for t in topics} == {cluster}


def test_a_tls_listener_with_a_private_ca_is_trusted_by_the_service_and_keda(tmp_path: Path) -> None:
    s = settings_from_configmap(tmp_path)
    assert s.kafka.security_protocol.value.endswith("SSL") and s.kafka.ssl_cafile is not None
    cafile = tomllib.loads(one("ConfigMap")["data"]["config.toml"])["kafka"]["ssl_cafile"]
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    [ca_volume] = [name for name, path in mounts.items() if Path(cafile).parent == Path(path)]
    secret = volumes[ca_volume]["secret"]
    assert Path(cafile).name in {item["path"] for item in secret["items"]}
    [key] = [item["key"] for item in secret["items"] if item["path"] == Path(cafile).name]
    refs = {r["parameter"]: r for r in one("TriggerAuthentication")["spec"]["secretTargetRef"]}
    assert (refs["ca"]["name"], refs["ca"]["key"]) == (secret["secretName"], key)
    cluster = kafka_configmap()["bootstrap-servers"].split("-kafka-bootstrap")[0]
    assert secret["secretName"] == f"{cluster}-cluster-ca-cert" and key == "ca.crt"


def test_topic_limits_fit_the_largest_accepted_record_and_outputs_are_not_compacted(tmp_path: Path) -> None:
    from connectors.kafka import _DEAD_LETTER_HEADROOM_BYTES

    s = settings_from_configmap(tmp_path)
    topics = {
        doc["metadata"]["name"]: doc["spec"]["config"]
        for _, doc in manifests()
        if doc["kind"] == "KafkaTopic"
    }
    largest_letter = (
        s.limits.max_record_bytes + _DEAD_LETTER_HEADROOM_BYTES
    )  # the producer's max_request_size
    for name in (s.kafka.input_topic, s.kafka.dead_letter_topic):
        assert int(topics[name]["max.message.bytes"]) >= largest_letter, name
    # De-duplicate on source (topic, partition, offset): a compacted output would drop posts sharing an id.
    for name in (s.kafka.output_topic, s.kafka.dead_letter_topic):
        assert topics[name].get("cleanup.policy", "delete") == "delete", name
