#!/usr/bin/env python3
"""Offline checks of the Helm chart in helm/chatvault: no helm binary, no cluster, no network.

- `helm lint --strict` (Helm's own linter, through helm-python-sdk's bundled Helm Go SDK) for the default values
  and every ci/*.yaml;
- values.yaml and every ci/*.yaml against values.schema.json, with Helm and with check-jsonschema; misspelt or
  out-of-range values must FAIL;
- rendering (helm template) of each of those values, every manifest validated against the Kubernetes 1.30 JSON
  schemas in strict mode (kubernetes-validate; unknown fields are errors);
- chart rules: restricted security context on every pod template, labels, gRPC probes, grace periods, the
  Services' target ports, settings the chart must refuse at render time;
- webhooks: the gateway's HTTP port (Service, container, NetworkPolicy, /healthz liveness) and each
  [[gateway.webhooks]] of the rendered chatvault.toml reading its secrets from mounted Secret files, with no
  secret value in the ConfigMap;
- the rendered chatvault.toml parsed and validated by the chatvault binary itself when one is built
  (target/debug or target/release), so the chart cannot drift from core/src/config.rs unnoticed.

Run: .venv/bin/python scripts/test_helm_chart.py  (scripts/setup-test-deps.sh installs the packages)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chatvault"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "cv", "chatvault"

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as error:  # pragma: no cover - environment problem, not a test failure
    sys.exit(f"test_helm_chart: {error}; run scripts/setup-test-deps.sh and use .venv/bin/python")

passed = 0
failures: list[str] = []


def check(name: str):
    """Runs the decorated function at once as one named check."""

    def run(function):
        global passed
        try:
            function()
        except Exception as error:  # noqa: BLE001 - every failure is reported, none stops the run
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            failures.append(f"{name}: {detail}")
            print(f"FAIL {name}\n     {detail}")
        else:
            passed += 1
            print(f"ok   {name}")
        return function

    return run


def values_files() -> dict[str, dict]:
    cases = {"default values": {}}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        cases[f"ci/{path.name}"] = helm.values_from_yaml(path.read_text())
    return cases


def render(chart, values: dict) -> list[dict]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    documents = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("__template", template)
                documents.append(document)
    return documents


def strip(document: dict) -> dict:
    return {key: value for key, value in document.items() if key != "__template"}


def kind(documents: list[dict], kind_name: str) -> list[dict]:
    return [document for document in documents if document["kind"] == kind_name]


def pod_spec(document: dict) -> dict:
    return document["spec"] if document["kind"] == "Pod" else document["spec"]["template"]["spec"]


def expect_failure(what: str, function, *needles: str):
    try:
        function()
    except Exception as error:  # noqa: BLE001
        message = str(error)
        missing = [needle for needle in needles if needle not in message]
        if missing:
            raise AssertionError(f"{what}: failed, but the message lacks {missing}: {message}") from None
        return
    raise AssertionError(f"{what}: was accepted, must fail")


def chatvault_binary() -> Path | None:
    for profile in ("debug", "release"):
        candidate = ROOT / "target" / profile / "chatvault"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def load_config_with_binary(binary: Path, toml_text: str) -> subprocess.CompletedProcess:
    """Makes the binary load and validate `toml_text` (Config::load: unknown settings and invalid values are
    errors) without a cluster: `keys export` with --data-dir reads the config, then looks up a data key in an
    empty local archive, which fails with "data key ... not found" only after the configuration was accepted."""
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "chatvault.toml"
        config.write_text(toml_text)
        environment = {key: value for key, value in os.environ.items() if not key.startswith("CHATVAULT")}
        return subprocess.run(
            [str(binary), "keys", "export", "--config", str(config), "--data-dir", directory,
             "--tenant", "chart-check", "--period", "2026-01"],
            capture_output=True, text=True, env=environment, timeout=60, check=False,
        )


def main() -> int:
    chart = helm.Chart.load(CHART)
    cases = values_files()
    rendered: dict[str, list[dict]] = {}

    for case, values in cases.items():
        @check(f"helm lint --strict ({case})")
        def _lint():
            report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
            problems = [m for m in report.get("messages", []) if m["severity"] >= 2] + [
                {"severity": 3, "path": "", "error": error} for error in report.get("errors") or []
            ]
            assert not problems, "; ".join(f"{m['path']}: {m['error']}" for m in problems)

        @check(f"values.schema.json accepts {case}")
        def _schema():
            chart.validate_schema(values)

        @check(f"render {case}")
        def _render():
            rendered[case] = render(chart, values)
            assert rendered[case], "nothing rendered"

        documents = rendered.get(case, [])

        @check(f"kubernetes-validate --strict -k {KUBE_VERSION} ({case}, {len(documents)} objects)")
        def _kubernetes():
            errors, unknown = [], []
            for document in documents:
                name = f"{document['kind']}/{document['metadata']['name']}"
                try:
                    kubernetes_validate.validate(strip(document), KUBE_VERSION, strict=True)
                except kubernetes_validate.ValidationError as error:
                    path = ".".join(str(item) for item in error.path)
                    errors.append(f"{name} ({document['__template']}): {path}: {error.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    unknown.append(name)
            for name in unknown:  # CRDs: kubernetes-validate has no schema for them
                print(f"     warn: no Kubernetes schema for {name} (custom resource)")
            assert not errors, "\n       ".join(errors)

        @check(f"restricted security context on every pod template ({case})")
        def _security():
            pods = kind(documents, "Deployment") + kind(documents, "Pod")
            assert pods, "no pod templates"
            for document in pods:
                where = f"{document['kind']}/{document['metadata']['name']}"
                spec = pod_spec(document)
                pod_context = spec.get("securityContext", {})
                assert pod_context.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
                assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
                assert spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken"
                volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
                for container in spec["containers"] + spec.get("initContainers", []):
                    context = container.get("securityContext", {})
                    label = f"{where} container {container['name']}"
                    assert context.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
                    assert context.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
                    assert context.get("privileged") is not True, f"{label}: privileged"
                    assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities.drop"
                    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, f"{label}: runAsNonRoot"
                    if "chatvault" in container["image"]:
                        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
                        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{label}: /tmp emptyDir"

        @check(f"labels and selectors ({case})")
        def _labels():
            for document in documents:
                labels = document["metadata"].get("labels", {})
                where = f"{document['kind']}/{document['metadata']['name']}"
                for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                            "helm.sh/chart", "app.kubernetes.io/version"):
                    assert key in labels, f"{where}: label {key}"
                assert len(document["metadata"]["name"]) <= 63, f"{where}: name longer than 63"
            for document in kind(documents, "Deployment") + kind(documents, "PodDisruptionBudget"):
                selector = document["spec"]["selector"]["matchLabels"]
                assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector, (
                    f"{document['metadata']['name']}: mutable label in selector")
                assert "app.kubernetes.io/component" in selector, f"{document['metadata']['name']}: component"

        @check(f"Services reach a named container port; gRPC probes; grace periods ({case})")
        def _wiring():
            deployments = kind(documents, "Deployment")
            for service in kind(documents, "Service"):
                selector = service["spec"]["selector"]
                targets = [d for d in deployments
                           if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
                assert targets, f"Service {service['metadata']['name']} selects no Deployment"
                for port in service["spec"]["ports"]:
                    names = {p.get("name") for d in targets for c in pod_spec(d)["containers"]
                             for p in c.get("ports", [])}
                    assert port["targetPort"] in names, (
                        f"Service {service['metadata']['name']}: targetPort {port['targetPort']} not in {names}")
            for deployment in deployments:
                component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
                spec = pod_spec(deployment)
                container = spec["containers"][0]
                if component in ("gateway", "restorer", "standalone"):
                    for probe in ("readinessProbe", "startupProbe") + (() if component == "gateway" else ("livenessProbe",)):
                        assert "grpc" in container.get(probe, {}), f"{component}: {probe} is not a gRPC probe"
                    ports = {p["containerPort"] for p in container["ports"]}
                    assert container["readinessProbe"]["grpc"]["port"] in ports, f"{component}: probe port"
                if component == "gateway":
                    named = {p["name"]: p["containerPort"] for p in container["ports"]}
                    liveness = container.get("livenessProbe", {}).get("httpGet", {})
                    assert liveness.get("path") == "/healthz" and liveness.get("port") == "http", (
                        f"gateway: livenessProbe is not GET /healthz on the http port: {container.get('livenessProbe')}")
                    assert named.get("http") == values.get("gateway", {}).get("containerPorts", {}).get("http", 8080)
                if component == "gateway":
                    drain = values.get("config", {}).get("gateway", {}).get("drain_timeout_ms", 20000) / 1000
                    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                    assert sleep > 0, "gateway: no preStop sleep"
                    assert spec["terminationGracePeriodSeconds"] > sleep + drain, "gateway: grace period too short"
                if component == "archiver":
                    assert "ports" not in container or all(p["name"] == "metrics" for p in container["ports"])
            policies = kind(documents, "NetworkPolicy")
            assert len(policies) >= 1, "NetworkPolicy is on by default"
            for service in kind(documents, "Service"):
                if service["metadata"]["labels"].get("app.kubernetes.io/component") != "gateway":
                    continue
                ports = {p["name"]: p for p in service["spec"]["ports"]}
                if any(d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway" for d in deployments):
                    assert ports.get("http", {}).get("targetPort") == "http", f"gateway Service: no http port: {ports}"
                    policy = next(p for p in policies if p["metadata"]["name"].endswith("-gateway"))
                    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
                    http = values.get("gateway", {}).get("containerPorts", {}).get("http", 8080)
                    assert http in admitted, f"gateway NetworkPolicy does not admit the http port {http}: {admitted}"
            for hpa in kind(documents, "HorizontalPodAutoscaler"):
                assert hpa["apiVersion"] == "autoscaling/v2", hpa["apiVersion"]

        config_maps = [d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d.get("data", {})]
        binary = chatvault_binary()
        if config_maps and binary is not None:
            @check(f"chatvault binary accepts the rendered chatvault.toml ({case})")
            def _binary():
                result = load_config_with_binary(binary, config_maps[0]["data"]["chatvault.toml"])
                assert "error: data key" in result.stderr and "not found" in result.stderr, (
                    f"{binary.relative_to(ROOT)} rejected the configuration: {result.stderr.strip()}")

    distributed = cases["ci/distributed-values.yaml"]
    binary = chatvault_binary()
    if binary is None:
        print("skip chatvault binary checks: no target/debug/chatvault (run cargo build first)")
    else:
        @check("the binary check itself rejects a bad setting (guards the check above)")
        def _binary_negative():
            result = load_config_with_binary(binary, '[archiver]\nzstd_levl = 3\n')
            assert "error: data key" not in result.stderr and "zstd_levl" in result.stderr, result.stderr

        @check("the binary reads the rendered [[gateway.webhooks]] (a wrong platform is rejected)")
        def _binary_webhooks():
            configmap = next(d for d in kind(rendered["ci/distributed-values.yaml"], "ConfigMap")
                             if "chatvault.toml" in d.get("data", {}))
            text = configmap["data"]["chatvault.toml"]
            assert 'platform = "standard_webhooks"' in text, text
            result = load_config_with_binary(binary, text.replace('platform = "standard_webhooks"', 'platform = "slak"'))
            assert "error: data key" not in result.stderr and "slak" in result.stderr, result.stderr

    @check("check-jsonschema: values.yaml and ci/*.yaml match values.schema.json")
    def _check_jsonschema():
        files = [str(CHART / "values.yaml")] + [str(path) for path in sorted((CHART / "ci").glob("*.yaml"))]
        result = subprocess.run(
            [str(Path(sys.executable).with_name("check-jsonschema")), "--schemafile",
             str(CHART / "values.schema.json"), *files],
            capture_output=True, text=True, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    misspelt = {
        "top-level typo gatway": {"gatway": {}},
        "unknown key in a component": {"gateway": {"replicaCount": 1, "typo": True}},
        "unknown chatvault setting": {"config": {"archiver": {"zstd_levl": 3}}},
        "unknown key in a probe": {"restorer": {"livenessProbe": {"periodSecond": 5}}},
        "out-of-range zstd level": {"config": {"archiver": {"zstd_level": 0}}},
        "protected Kafka property": {"config": {"kafka": {"properties": {"enable.idempotence": "false"}}}},
        "clear SASL password in properties": {"config": {"kafka": {"properties": {"sasl.password": "x"}}}},
        "unknown mode": {"mode": "cluster"},
        "token role typo": {"tenants": [{"id": "acme", "tokens": [{"name": "t", "roles": ["ingset"]}]}]},
        "uppercase tenant id": {"tenants": [{"id": "Acme"}]},
        "webhook platform typo": {"gateway": {"webhooks": [
            {"name": "w", "platform": "slak", "tenant": "acme", "existingSecret": "s", "secretKeys": ["k"]}]}},
        "unknown key in a webhook": {"gateway": {"webhooks": [
            {"name": "w", "platform": "slack", "tenant": "acme", "existingSecret": "s", "secretKey": ["k"]}]}},
        "webhook without a platform": {"gateway": {"webhooks": [{"name": "w", "tenant": "acme", "secrets": ["x"]}]}},
        "webhook name with a slash": {"gateway": {"webhooks": [
            {"name": "a/b", "platform": "slack", "tenant": "acme", "secrets": ["x"]}]}},
        "webhooks with clear secrets in config": {"config": {"gateway": {"webhooks": [
            {"name": "w", "platform": "slack", "tenant": "acme", "secrets": ["x"]}]}}},
        "webhook setting typo": {"config": {"gateway": {"max_webhook_body_byte": 4096}}},
        "webhook body limit below 1 KiB": {"config": {"gateway": {"max_webhook_body_bytes": 100}}},
        "gateway http port typo": {"gateway": {"containerPorts": {"grpc": 50051, "htp": 8080}}},
    }
    for what, values in misspelt.items():
        @check(f"schema rejects {what} (helm and check-jsonschema)")
        def _rejects():
            expect_failure(f"helm schema validation of {values}", lambda: chart.validate_schema(values))
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
                yaml.safe_dump(values, handle)
                handle.flush()
                result = subprocess.run(
                    [str(Path(sys.executable).with_name("check-jsonschema")), "--schemafile",
                     str(CHART / "values.schema.json"), handle.name],
                    capture_output=True, text=True, check=False,
                )
            assert result.returncode != 0, f"check-jsonschema accepted {values}"

    @check("helm lint --strict fails on a misspelt value")
    def _lint_typo():
        report = helm.lint(CHART, {"gatway": {}}, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert report.get("errors") or any(m["severity"] >= 2 for m in report.get("messages", [])), report

    def with_distributed(**overrides) -> dict:
        values = {key: value for key, value in distributed.items()}
        values.update(overrides)
        return values

    refused = {
        "distributed without a keyring": (with_distributed(keyring={"json": ""}), ["keyring"]),
        "distributed on a file:// archive": (
            with_distributed(config={**distributed["config"], "storage": {"url": "file:///data"}}),
            ["config.storage.url"]),
        "archivers beyond the topic's partitions": (
            with_distributed(archiver={"replicaCount": 5, "topicPartitions": 4}), ["archiver.replicaCount"]),
        "grace period shorter than the gateway's drain": (
            with_distributed(gateway={"terminationGracePeriodSeconds": 20}), ["terminationGracePeriodSeconds"]),
        "a token with no value anywhere": (with_distributed(auth={"tokens": {"demo-ingest": "x"}}), ["demo-restore"]),
        "distributed without tenants": (with_distributed(tenants=[]), ["tenants"]),
        "a webhook without secrets": (
            with_distributed(gateway={"webhooks": [{"name": "w", "platform": "slack", "tenant": "demo"}]}),
            ["gateway.webhooks[0]", "secrets"]),
        "a webhook existingSecret without secretKeys": (
            with_distributed(gateway={"webhooks": [
                {"name": "w", "platform": "slack", "tenant": "demo", "existingSecret": "s"}]}),
            ["gateway.webhooks[0]", "secretKeys"]),
        "a webhook with both existingSecret and secrets": (
            with_distributed(gateway={"webhooks": [{"name": "w", "platform": "slack", "tenant": "demo",
                                                    "existingSecret": "s", "secretKeys": ["k"], "secrets": ["x"]}]}),
            ["gateway.webhooks[0]", "not both"]),
        "a webhook for an unknown tenant": (
            with_distributed(gateway={"webhooks": [
                {"name": "w", "platform": "slack", "tenant": "demo2", "secrets": ["x"]}]}),
            ["gateway.webhooks[0]", "demo2"]),
        "two webhooks with one name": (
            with_distributed(gateway={"webhooks": [
                {"name": "w", "platform": "slack", "tenant": "demo", "secrets": ["x"]},
                {"name": "w", "platform": "discord", "tenant": "demo", "secrets": ["y"]}]}),
            ["gateway.webhooks[1]", "another webhook"]),
        "webhooks in standalone mode": (
            {"gateway": {"webhooks": [{"name": "w", "platform": "slack", "tenant": "demo", "secrets": ["x"]}]}},
            ["gateway.webhooks", "distributed"]),
    }
    for what, (values, needles) in refused.items():
        @check(f"render refuses {what}")
        def _refuses():
            expect_failure(what, lambda: chart.render(values, name=RELEASE, namespace=NAMESPACE), *needles)

    def webhook_wiring(case: str, secret_values: list[str]):
        """The rendered [[gateway.webhooks]] read every secret from a file that the gateway container mounts from
        the right Secret key, and no secret value is in the ConfigMap."""
        documents = rendered[case]
        values = cases[case]
        configmap = next(d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d.get("data", {}))
        text = configmap["data"]["chatvault.toml"]
        config = tomllib.loads(text)
        gateway_values = values["gateway"]
        expected = gateway_values["webhooks"]
        assert config["gateway"]["http_listen"] == "0.0.0.0:8080", config["gateway"].get("http_listen")
        for key in ("max_webhook_body_bytes", "webhook_replay_window_secs"):
            setting = config["gateway"][key]
            assert type(setting) is int and setting == values["config"]["gateway"][key], f"{key} = {setting!r}"
        webhooks = config["gateway"].get("webhooks", [])
        assert [w["name"] for w in webhooks] == [w["name"] for w in expected], webhooks
        gateway = next(d for d in kind(documents, "Deployment")
                       if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
        spec = pod_spec(gateway)
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        secrets = {d["metadata"]["name"]: d for d in kind(documents, "Secret")}
        for webhook, wanted in zip(webhooks, expected):
            assert webhook["platform"] == wanted["platform"] and webhook["tenant"] == wanted["tenant"], webhook
            assert "secrets" not in webhook, f"{webhook['name']}: clear secrets in the ConfigMap"
            files = webhook["secret_files"]
            assert len(files) == len(wanted.get("secretKeys") or wanted.get("secrets")), files
            directory = f"/etc/chatvault/webhooks/{webhook['name']}"
            mount = mounts.get(directory)
            assert mount and mount.get("readOnly") is True, f"{directory} is not mounted read-only: {list(mounts)}"
            source = volumes[mount["name"]]["secret"]
            paths = {item["path"]: item["key"] for item in source["items"]}
            for index, path in enumerate(files):
                assert os.path.dirname(path) == directory, path
                key = paths.get(os.path.basename(path))
                assert key is not None, f"{path}: no Secret item mounts it ({paths})"
                if wanted.get("existingSecret"):
                    assert source["secretName"] == wanted["existingSecret"] and key == wanted["secretKeys"][index]
                else:
                    chart_secret = secrets[source["secretName"]]
                    assert key in chart_secret["data"], f"{source['secretName']} lacks {key}"
                    import base64
                    assert base64.b64decode(chart_secret["data"][key]).decode() == wanted["secrets"][index]
        for secret_value in secret_values:
            for document in kind(documents, "ConfigMap"):
                assert secret_value not in yaml.safe_dump(strip(document)), (
                    f"ConfigMap {document['metadata']['name']} holds a webhook secret")
        for other in kind(documents, "Deployment"):
            if other is not gateway:
                assert not any(v["name"].startswith("webhook-") for v in pod_spec(other).get("volumes", [])), (
                    f"{other['metadata']['name']} mounts webhook secrets")

    @check("webhooks from an existing Secret: secret_files point at mounted files (ci/production-values.yaml)")
    def _webhooks_existing():
        webhook_wiring("ci/production-values.yaml", [])

    @check("webhooks from chart-generated Secrets: mounted files, no secret value in the ConfigMap "
           "(ci/distributed-values.yaml)")
    def _webhooks_chart_secret():
        secret_values = [s for w in distributed["gateway"]["webhooks"] for s in w.get("secrets", [])]
        assert secret_values, "ci/distributed-values.yaml: a webhook with clear secrets"
        webhook_wiring("ci/distributed-values.yaml", secret_values)

    @check("least privilege: each role gets only its secrets")
    def _least_privilege():
        documents = rendered["ci/production-values.yaml"]
        by_role = {d["metadata"]["labels"]["app.kubernetes.io/component"]: pod_spec(d)
                   for d in kind(documents, "Deployment")}
        def env_names(role):
            return {e["name"] for e in by_role[role]["containers"][0].get("env", [])}
        def volume_names(role):
            return {v["name"] for v in by_role[role].get("volumes", [])}
        assert "keyring" not in volume_names("gateway"), "gateway mounts the keyring"
        assert "tokens" not in volume_names("archiver"), "archiver mounts tokens"
        assert "CHATVAULT__KAFKA__PROPERTIES__SASL.PASSWORD" not in env_names("restorer"), "restorer gets Kafka"
        assert {"keyring", "tokens"} <= volume_names("restorer")
        assert "CHATVAULT__KAFKA__PROPERTIES__SASL.PASSWORD" in env_names("archiver")
        assert "kafka-tls" in volume_names("gateway") and "kafka-tls" in volume_names("archiver")
        assert not kind(documents, "Secret"), "production values must create no Secret (existingSecret only)"
        sa = kind(documents, "ServiceAccount")[0]
        assert "eks.amazonaws.com/role-arn" in sa["metadata"].get("annotations", {}), "workload identity"

    @check("ServiceMonitor only when the cluster serves monitoring.coreos.com/v1")
    def _service_monitor():
        # Offline rendering has no such API: enabling it must not emit a ServiceMonitor a cluster would reject.
        documents = rendered["ci/production-values.yaml"]
        assert not kind(documents, "ServiceMonitor"), "ServiceMonitor rendered without the CRD"
        assert any(s["metadata"]["name"].endswith("-metrics") for s in kind(documents, "Service"))

    @check("standalone mode: one replica, Recreate, no distributed roles")
    def _standalone():
        documents = rendered["default values"]
        deployments = kind(documents, "Deployment")
        assert [d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments] == ["standalone"]
        assert deployments[0]["spec"]["replicas"] == 1 and deployments[0]["spec"]["strategy"]["type"] == "Recreate"
        persistent = kind(rendered["ci/standalone-values.yaml"], "PersistentVolumeClaim")
        assert len(persistent) == 1, "ci/standalone-values.yaml: PersistentVolumeClaim"

    print(f"helm chart: {passed} passed, {len(failures)} failed")
    if failures:
        print("failed checks:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
