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
  [[gateway.webhooks]] of the rendered chatvault.toml reading its secrets (and, for Microsoft Teams, its
  certificates' private keys and its JWKS) from mounted files of the right Secret/ConfigMap keys, with no secret
  value in the ConfigMap;
- telemetry: the metrics port (GET /metrics, /healthz, /readyz) on every component's container, metrics Service
  and NetworkPolicy, [telemetry] in chatvault.toml, the archiver's HTTP probes, every probe following its values
  (enabled, timing, custom*Probe), the OTEL_* environment (or OTEL_SDK_DISABLED=true), the OTLP egress rule, and
  the ServiceMonitor as rendered on a cluster that serves monitoring.coreos.com/v1;
- completeness: every key of config/chatvault.example.toml (its commented Teams example included) and every
  field of config/src/lib.rs's Config (and the sections it holds) can be produced by the chart (ci/all-settings-values.yaml renders them
  all), and README.md's values table lists every value of values.yaml;
- the rendered chatvault.toml parsed and validated by the chatvault binary itself when one is built
  (target/debug or target/release), so the chart cannot drift from the configuration's structs unnoticed.

Run: .venv/bin/python scripts/test_helm_chart.py  (scripts/setup-test-deps.sh installs the packages)
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
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


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of values: maps merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def effective(values: dict) -> dict:
    return deep_merge(DEFAULTS, values)


def component(document: dict) -> str:
    return document["metadata"]["labels"]["app.kubernetes.io/component"]


def chatvault_container(document: dict) -> dict:
    return pod_spec(document)["containers"][0]


def env_map(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def chatvault_toml(documents: list[dict]) -> dict | None:
    config_maps = [d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d.get("data", {})]
    return tomllib.loads(config_maps[0]["data"]["chatvault.toml"]) if config_maps else None


def volume_files(volume: dict) -> dict[str, tuple[str, str, str]]:
    """File path inside a secret/configMap/projected volume -> (kind, object name, key)."""
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    files = {}
    for source in sources:
        for source_kind, name_field in (("secret", "secretName"), ("configMap", "name")):
            if source_kind in source:
                body = source[source_kind]
                name = body.get(name_field, body.get("name"))
                for item in body.get("items", []):
                    files[item["path"]] = (source_kind, name, item["key"])
    return files


def duration_seconds(text: str) -> float:
    """A duration setting as the binary reads it ("500ms", "10s", "1m30s", "0")."""
    if str(text) == "0":
        return 0.0
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(number) * scale[unit] for number, unit in parts)


def toml_paths(table: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every key of a parsed TOML document; arrays of tables as `name[]`."""
    paths = set()
    for key, value in table.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict):
            paths |= toml_paths(value, f"{path}.")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:
                paths |= toml_paths(item, f"{path}[].")
    return paths


EXAMPLE_CONFIG = ROOT / "config" / "chatvault.example.toml"


def example_config_text() -> str:
    """config/chatvault.example.toml with its commented Microsoft Teams example uncommented (as
    config/src/lib.rs's test commented_teams_example_is_valid does)."""
    text = EXAMPLE_CONFIG.read_text()
    start = text.find("# [[gateway.webhooks]]")
    assert start >= 0, f"{EXAMPLE_CONFIG.relative_to(ROOT)}: no commented Teams example '# [[gateway.webhooks]]'"
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").lstrip())
    return text + "\n" + "\n".join(block) + "\n"


# Where the configuration's structs are defined: the whole file (config/src/lib.rs), the shared sections and
# the loader (core), and each service's section next to its service.
CONFIG_SOURCES = [
    "config/src/lib.rs",
    "core/src/config.rs",
    "core/src/event.rs",
    "ingest-gateway/src/config.rs",
    "archiver/src/config.rs",
    "restorer/src/config.rs",
]


def config_struct_paths() -> set[str]:
    """Dotted paths of every field of `Config` (config/src/lib.rs, following its structs into CONFIG_SOURCES),
    nested structs followed, `Vec<Struct>` as `name[]`; honours #[serde(rename = ...)], #[serde(skip...)] and
    #[serde(flatten)] on fields."""
    source = "\n".join((ROOT / name).read_text() for name in CONFIG_SOURCES)
    structs: dict[str, list[tuple[str, str, bool]]] = {}
    for match in re.finditer(r"^pub struct (\w+)\s*\{(.*?)^\}", source, re.S | re.M):
        fields, rename, skip, flatten = [], None, False, False
        for line in match.group(2).splitlines():
            line = line.strip()
            attribute = re.match(r"#\[serde\((.*)\)\]", line)
            if attribute:
                renamed = re.search(r'\brename\s*=\s*"([^"]+)"', attribute.group(1))
                rename = renamed.group(1) if renamed else rename
                skip = skip or re.search(r"\bskip(_deserializing)?\b(?!_)", attribute.group(1)) is not None
                flatten = flatten or re.search(r"\bflatten\b", attribute.group(1)) is not None
                continue
            field = re.match(r"pub (\w+)\s*:\s*(.+?),?$", line)
            if field:
                if not skip:
                    fields.append((rename or field.group(1), field.group(2).strip(), flatten))
                rename, skip, flatten = None, False, False
        structs[match.group(1)] = fields
    assert "Config" in structs, "config/src/lib.rs: no `pub struct Config`"

    def walk(name: str, prefix: str) -> set[str]:
        paths = set()
        for field, type_, flatten in structs[name]:
            if flatten:
                paths |= walk(type_, prefix)
                continue
            inner, array = type_, False
            while True:
                wrapped = re.fullmatch(r"(Option|Vec|Box)<(.+)>", inner)
                if not wrapped:
                    break
                array = array or wrapped.group(1) == "Vec"
                inner = wrapped.group(2)
            path = f"{prefix}{field}"
            paths.add(path)
            if inner in structs:
                paths |= walk(inner, f"{path}[]." if array else f"{path}.")
        return paths

    return walk("Config", "")


# Config fields the chart deliberately never renders: clear secrets. It writes the file forms instead
# (secret_files, token_file / token_sha256), and the check below makes sure these stay out of the ConfigMap.
NOT_RENDERED = {
    "gateway.webhooks[].secrets": "clear webhook secrets (the chart renders secret_files)",
    "tenants[].tokens[].token": "clear tokens (the chart renders token_file or token_sha256)",
    "keys.pkcs11.pin": "the clear HSM PIN (the chart renders pin_file from hsm.existingSecret)",
}


# Config fields one chatvault.toml cannot hold together with another (the binary refuses both): each is checked
# in the chatvault.toml of the CI values file named instead of ci/all-settings-values.yaml.
EXCLUSIVE = {
    "integrity.signing_key_path": "ci/production-values.yaml",  # all-settings has signing_key_pkcs11_label
}


def values_table_paths(values, schema: dict, definitions: dict, prefix: str = "") -> list[str]:
    """The rows README.md's values table needs: every leaf of values.yaml; maps the schema describes property by
    property are expanded, free-form ones (and lists) are one row."""
    if "$ref" in schema:
        schema = definitions[schema["$ref"].split("/")[-1]]
    if isinstance(values, dict) and values and "properties" in schema:
        rows = []
        for key, value in values.items():
            rows += values_table_paths(value, schema["properties"].get(key, {}), definitions, f"{prefix}{key}.")
        return rows
    return [prefix.rstrip(".")]


def chatvault_binary() -> Path | None:
    for profile in ("debug", "release"):
        candidate = ROOT / "target" / profile / "chatvault"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def load_config_with_binary(binary: Path, toml_text: str) -> subprocess.CompletedProcess:
    """Makes the binary load and validate `toml_text` (`chatvault config check`: unknown settings and invalid
    values are errors naming the setting), with no CHATVAULT variables from this environment."""
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "chatvault.toml"
        config.write_text(toml_text)
        environment = {key: value for key, value in os.environ.items() if not key.startswith("CHATVAULT")}
        return subprocess.run(
            [str(binary), "config", "check", "--config", str(config)],
            capture_output=True, text=True, env=environment, timeout=60, check=False,
        )


def accepted(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "configuration valid" in result.stdout


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
                    drain = duration_seconds(values.get("config", {}).get("gateway", {}).get("drain_timeout", "20s"))
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
                if service["metadata"]["name"].endswith("-metrics"):
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

        settings = effective(values)

        @check(f"metrics port on every component: container, Service, NetworkPolicy, [telemetry] ({case})")
        def _metrics_port():
            port = settings["metrics"]["port"]
            deployments = kind(documents, "Deployment")
            assert deployments, "no Deployment"
            services = kind(documents, "Service")
            policies = {component(p): p for p in kind(documents, "NetworkPolicy")}
            for deployment in deployments:
                role = component(deployment)
                container = chatvault_container(deployment)
                named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                assert named.get("metrics") == port, f"{role}: container port metrics is {named.get('metrics')}, not {port}"
                assert len(set(named.values())) == len(named), f"{role}: two container ports share a number: {named}"
                labels = deployment["spec"]["template"]["metadata"]["labels"]
                if settings["metrics"]["enabled"]:
                    carrying = [s for s in services if s["spec"]["selector"].items() <= labels.items()
                                and any(p["name"] == "metrics" and p["port"] == port and p["targetPort"] == "metrics"
                                        for p in s["spec"]["ports"])]
                    assert len(carrying) == 1, f"{role}: {len(carrying)} Services carry the metrics port (want one)"
                    assert carrying[0]["spec"].get("clusterIP") == "None", f"{role}: metrics Service is not headless"
                    assert component(carrying[0]) == role, f"{role}: metrics Service labelled {component(carrying[0])}"
                    if settings["networkPolicy"]["enabled"]:
                        rules = [r for r in policies[role]["spec"].get("ingress") or []
                                 if any(p["port"] == port for p in r.get("ports", []))]
                        assert rules, f"{role}: NetworkPolicy does not admit the metrics port {port}"
                        scrape = settings["networkPolicy"]["metrics"]
                        if scrape["allowExternal"]:
                            assert any("from" not in r for r in rules), f"{role}: metrics port not open to scrapers"
                        else:
                            peers = [peer for r in rules for peer in r.get("from", [])]
                            assert peers and all("from" in r for r in rules), f"{role}: metrics port open to all"
                            if scrape["ingressNSMatchLabels"]:
                                assert any(peer.get("namespaceSelector", {}).get("matchLabels")
                                           == scrape["ingressNSMatchLabels"] for peer in peers), peers
                if role == "standalone":
                    assert f"--metrics-listen=0.0.0.0:{port}" in container["args"], container["args"]
                    log_format = env_map(container).get("CHATVAULT__TELEMETRY__LOG_FORMAT", {}).get("value")
                    assert log_format == settings["telemetry"]["logFormat"], f"standalone: log format {log_format}"
            config = chatvault_toml(documents)
            if config is not None:
                assert config.get("telemetry") == {"metrics_listen": f"0.0.0.0:{port}",
                                                   "log_format": settings["telemetry"]["logFormat"]}, config.get("telemetry")

        @check(f"probes follow their values; the archiver's are HTTP on the metrics port ({case})")
        def _probes():
            grpc_service = {"gateway": "chatvault.v1.IngestService", "restorer": "chatvault.v1.RestoreService"}
            for deployment in kind(documents, "Deployment"):
                role = component(deployment)
                container = chatvault_container(deployment)
                role_values = settings[role]
                if role == "archiver":
                    handlers = {"liveness": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                                "readiness": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                                "startup": {"httpGet": {"path": "/healthz", "port": "metrics"}}}
                elif role == "standalone":
                    ports = role_values["containerPorts"]
                    handlers = {"liveness": {"grpc": {"port": ports["gateway"], "service": ""}},
                                "readiness": {"grpc": {"port": ports["gateway"], "service": grpc_service["gateway"]}},
                                "startup": {"grpc": {"port": ports["restorer"], "service": grpc_service["restorer"]}}}
                else:
                    check_ = {"grpc": {"port": role_values["containerPorts"]["grpc"], "service": grpc_service[role]}}
                    liveness = ({"httpGet": {"path": "/healthz", "port": "http"}} if role == "gateway"
                                else {"grpc": {"port": role_values["containerPorts"]["grpc"], "service": ""}})
                    handlers = {"liveness": liveness, "readiness": check_, "startup": check_}
                for name, handler in handlers.items():
                    probe = container.get(f"{name}Probe")
                    custom = role_values.get(f"custom{name.title()}Probe")
                    timing = role_values.get(f"{name}Probe", {})
                    if custom:
                        assert probe == custom, f"{role}: {name}Probe is not custom{name.title()}Probe: {probe}"
                    elif timing.get("enabled"):
                        expected = {**handler, **{k: v for k, v in timing.items() if k != "enabled"}}
                        assert probe == expected, f"{role}: {name}Probe {probe}, want {expected}"
                    else:
                        assert probe is None, f"{role}: {name}Probe is disabled but rendered: {probe}"

        @check(f"OpenTelemetry environment on every chatvault container ({case})")
        def _otel():
            otel = settings["otel"]
            for deployment in kind(documents, "Deployment"):
                role = component(deployment)
                container = chatvault_container(deployment)
                env = env_map(container)
                value = lambda name: env.get(name, {}).get("value")  # noqa: E731
                if not otel["enabled"]:
                    assert value("OTEL_SDK_DISABLED") == "true", f"{role}: OTEL_SDK_DISABLED is {value('OTEL_SDK_DISABLED')}"
                    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env, f"{role}: an OTLP endpoint with otel disabled"
                    continue
                expected = {
                    "OTEL_SDK_DISABLED": "false",
                    "OTEL_SERVICE_NAME": f"chatvault-{role}",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": otel["endpoint"],
                    "OTEL_EXPORTER_OTLP_PROTOCOL": otel["protocol"],
                    "OTEL_EXPORTER_OTLP_TIMEOUT": str(otel["timeout"]),
                    "OTEL_TRACES_SAMPLER": otel["tracesSampler"],
                    "OTEL_METRIC_EXPORT_INTERVAL": str(otel["metricExportInterval"]),
                    "OTEL_TRACES_EXPORTER": otel["tracesExporter"],
                    "OTEL_METRICS_EXPORTER": otel["metricsExporter"],
                }
                if str(otel["tracesSamplerArg"]) != "":
                    expected["OTEL_TRACES_SAMPLER_ARG"] = str(otel["tracesSamplerArg"])
                for name, wanted in expected.items():
                    assert value(name) == wanted, f"{role}: {name} = {value(name)!r}, want {wanted!r}"
                names = [entry["name"] for entry in container["env"]]
                attributes = dict(pair.split("=", 1) for pair in value("OTEL_RESOURCE_ATTRIBUTES").split(","))
                assert attributes.get("k8s.pod.name") == "$(K8S_POD_NAME)", attributes
                assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "K8S_POD_NAME after use"
                assert env["K8S_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                assert attributes.get("k8s.namespace.name") == NAMESPACE, attributes
                assert attributes.get("k8s.deployment.name") == deployment["metadata"]["name"], attributes
                for key, wanted in otel["resourceAttributes"].items():
                    assert attributes.get(key) == wanted, f"{role}: resource attribute {key}: {attributes}"
                if otel["headersExistingSecret"]:
                    reference = env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"]
                    assert reference == {"name": otel["headersExistingSecret"], "key": otel["headersExistingSecretKey"]}
                else:
                    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env
            if otel["enabled"] and settings["networkPolicy"]["enabled"] and not settings["networkPolicy"]["allowExternalEgress"]:
                endpoint = re.match(r"(https?)://[^/:]+(?::(\d+))?", otel["endpoint"])
                port = int(endpoint.group(2) or (443 if endpoint.group(1) == "https" else 80))
                for policy in kind(documents, "NetworkPolicy"):
                    allowed = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
                    assert port in allowed, f"{policy['metadata']['name']}: egress to the collector port {port}: {allowed}"

        config_maps = [d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d.get("data", {})]
        binary = chatvault_binary()
        if config_maps and binary is not None:
            @check(f"chatvault binary accepts the rendered chatvault.toml ({case})")
            def _binary():
                result = load_config_with_binary(binary, config_maps[0]["data"]["chatvault.toml"])
                assert accepted(result), (
                    f"{binary.relative_to(ROOT)} rejected the configuration: {result.stderr.strip()}")

    distributed = cases["ci/distributed-values.yaml"]
    binary = chatvault_binary()
    if binary is None:
        print("skip chatvault binary checks: no target/debug/chatvault (run cargo build first)")
    else:
        @check("the binary check itself rejects a bad setting (guards the check above)")
        def _binary_negative():
            result = load_config_with_binary(binary, '[archiver]\nzstd_levl = 3\n')
            assert not accepted(result) and "zstd_levl" in result.stderr, result.stderr

        @check("the binary reads the rendered [[gateway.webhooks]] (a wrong platform is rejected)")
        def _binary_webhooks():
            configmap = next(d for d in kind(rendered["ci/distributed-values.yaml"], "ConfigMap")
                             if "chatvault.toml" in d.get("data", {}))
            text = configmap["data"]["chatvault.toml"]
            assert 'platform = "standard_webhooks"' in text, text
            result = load_config_with_binary(binary, text.replace('platform = "standard_webhooks"', 'platform = "slak"'))
            assert not accepted(result) and "slak" in result.stderr, result.stderr

        @check("the binary knows every flag the chart passes to `chatvault standalone`")
        def _binary_standalone_flags():
            standalone = next(d for d in kind(rendered["default values"], "Deployment") if component(d) == "standalone")
            args = chatvault_container(standalone)["args"]
            assert args[0] == "standalone", args
            help_text = subprocess.run([str(binary), "standalone", "--help"], capture_output=True, text=True,
                                       timeout=60, check=True).stdout
            flags = [arg.split("=", 1)[0] for arg in args[1:]]
            unknown = [flag for flag in flags if not re.search(rf"(^|\s){re.escape(flag)}(\s|$)", help_text, re.M)]
            assert not unknown, f"chatvault standalone does not accept {unknown}"

        @check("the binary reads the rendered Teams settings (app_id on a non-Teams webhook is rejected)")
        def _binary_teams():
            configmap = next(d for d in kind(rendered["ci/production-values.yaml"], "ConfigMap")
                             if "chatvault.toml" in d.get("data", {}))
            text = configmap["data"]["chatvault.toml"]
            assert 'platform = "teams"' in text and "[[gateway.webhooks.certificates]]" in text, text
            result = load_config_with_binary(binary, text.replace('platform = "teams"', 'platform = "slack"'))
            assert not accepted(result) and "only for platform teams" in result.stderr, result.stderr

    all_settings = "ci/all-settings-values.yaml"

    @check("the example config (with its commented Teams example) is valid TOML with the Teams keys")
    def _example_config():
        paths = toml_paths(tomllib.loads(example_config_text()))
        for key in ("telemetry.metrics_listen", "gateway.webhooks[].app_id", "gateway.webhooks[].certificates[].id"):
            assert key in paths, f"{EXAMPLE_CONFIG.relative_to(ROOT)}: {key} missing"

    @check(f"every key of config/chatvault.example.toml is in the chatvault.toml rendered from {all_settings}")
    def _example_keys_rendered():
        config = chatvault_toml(rendered[all_settings])
        assert config is not None, f"{all_settings}: no chatvault.toml"
        missing = sorted(toml_paths(tomllib.loads(example_config_text())) - toml_paths(config))
        assert not missing, (f"the chart cannot produce (or {all_settings} does not set) these settings of "
                             f"{EXAMPLE_CONFIG.relative_to(ROOT)}: {missing}")

    @check(f"every field of Config (config/src/lib.rs) is rendered from {all_settings}; clear secrets never")
    def _config_fields_rendered():
        fields = config_struct_paths()
        for expected in ("kafka.brokers", "gateway.limits.max_text_bytes", "gateway.webhooks[].certificates[].id",
                         "telemetry.log_format", "tenants[].tokens[].roles"):
            assert expected in fields, f"config struct parsing lost {expected}: {sorted(fields)}"
        stale = sorted(set(NOT_RENDERED) - fields)
        assert not stale, f"NOT_RENDERED names fields Config no longer has: {stale}"
        rendered_paths = toml_paths(chatvault_toml(rendered[all_settings]))
        for field, case in EXCLUSIVE.items():
            assert field not in rendered_paths, f"{all_settings} renders {field}: drop it from EXCLUSIVE"
            if field in toml_paths(chatvault_toml(rendered[case])):
                rendered_paths.add(field)
        missing = sorted(fields - set(NOT_RENDERED) - rendered_paths)
        assert not missing, (f"Config fields the chart cannot produce (or {all_settings} does not set): {missing}; "
                             "add them to values.schema.json, the templates, README.md and that file")
        for case, documents in rendered.items():
            config = chatvault_toml(documents)
            leaked = sorted(set(NOT_RENDERED) & toml_paths(config or {}))
            assert not leaked, f"{case}: rendered {leaked}"

    @check("archiver probes by default: GET /healthz liveness and start-up, GET /readyz readiness, metrics port")
    def _archiver_probes():
        archiver = next(d for d in kind(rendered["ci/distributed-values.yaml"], "Deployment")
                        if component(d) == "archiver")
        container = chatvault_container(archiver)
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, container["livenessProbe"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, container["readinessProbe"]
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, container["startupProbe"]
        assert [p["name"] for p in container["ports"]] == ["metrics"], container["ports"]

    @check("OTEL_SDK_DISABLED=true on every container with the default values; OTLP env with otel.enabled")
    def _otel_switch():
        for case in ("default values", "ci/distributed-values.yaml"):
            for deployment in kind(rendered[case], "Deployment"):
                env = env_map(chatvault_container(deployment))
                assert env["OTEL_SDK_DISABLED"]["value"] == "true", f"{case}: {deployment['metadata']['name']}"
        names = {component(d): env_map(chatvault_container(d))["OTEL_SERVICE_NAME"]["value"]
                 for d in kind(rendered["ci/production-values.yaml"], "Deployment")}
        assert names == {r: f"chatvault-{r}" for r in ("gateway", "archiver", "restorer")}, names
        enabled = render(chart, {"otel": {"enabled": True, "endpoint": "http://collector:4318",
                                          "protocol": "http/protobuf"}})
        standalone = next(d for d in enabled if d["kind"] == "Deployment")
        env = env_map(chatvault_container(standalone))
        assert env["OTEL_SERVICE_NAME"]["value"] == "chatvault-standalone", env
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf", env

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
        "misspelt otel key": {"otel": {"enabled": True, "endpiont": "http://collector:4317"}},
        "OTLP protocol http/json (the binary speaks grpc and http/protobuf)": {"otel": {"protocol": "http/json"}},
        "OTLP endpoint without a scheme": {"otel": {"endpoint": "collector:4317"}},
        "unknown traces sampler": {"otel": {"tracesSampler": "ratio"}},
        "resource attribute value with a comma": {"otel": {"resourceAttributes": {"team": "a,b"}}},
        "log format xml": {"telemetry": {"logFormat": "xml"}},
        "telemetry setting typo": {"telemetry": {"log_format": "json"}},
        "metrics port out of range": {"metrics": {"port": 70000}},
        "metrics service typo": {"metrics": {"service": {"annotation": {}}}},
        "networkPolicy.metrics typo": {"networkPolicy": {"metrics": {"allowExternals": False}}},
        "unknown key in a custom probe's place": {"archiver": {"livenessProbe": {"path": "/healthz"}}},
        "Teams setting in snake_case": {"gateway": {"webhooks": [
            {"name": "t", "platform": "teams", "tenant": "acme", "secrets": ["x"], "app_id": "a"}]}},
        "Teams certificate without id": {"gateway": {"webhooks": [
            {"name": "t", "platform": "teams", "tenant": "acme", "secrets": ["x"],
             "certificates": [{"privateKey": "k"}]}]}},
        "Teams certificate key typo": {"gateway": {"webhooks": [
            {"name": "t", "platform": "teams", "tenant": "acme", "secrets": ["x"],
             "certificates": [{"id": "c", "existingSecretkey": "tls.key"}]}]}},
        "JWKS source typo": {"gateway": {"webhooks": [
            {"name": "t", "platform": "teams", "tenant": "acme", "secrets": ["x"],
             "jwks": {"existingConfigMap": "keys"}}]}},
        "a secretKey named like the certificates directory": {"gateway": {"webhooks": [
            {"name": "t", "platform": "teams", "tenant": "acme", "existingSecret": "s",
             "secretKeys": ["certificates"]}]}},
        "signing_key_path in config.integrity (the chart sets it)": {"config": {"integrity": {
            "signing_key_path": "/key"}}},
        "a trusted key that is not <origin>+<id>+<key>": {"config": {"integrity": {
            "trusted_keys": ["PRIVATE+KEY+origin+714deb62+AAAA"]}}},
        "clear credentials in the witness's options": {"config": {"integrity": {"witness": {
            "url": "s3://w", "options": {"aws_secret_access_key": "x"}}}}},
        "a file:// witness": {"config": {"integrity": {"witness": {"url": "file:///tmp/w"}}}},
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

    def teams_webhook(**overrides) -> dict:
        webhook = {"name": "t", "platform": "teams", "tenant": "demo", "secrets": ["client-state"], "appId": "app",
                   "certificates": [{"id": "c", "privateKey": "k"}], "jwks": {"json": "{}"}}
        webhook.update(overrides)
        return {key: value for key, value in webhook.items() if value is not None}

    refused = {
        "distributed without a keyring": (with_distributed(keyring={"json": ""}), ["keyring"]),
        "keys in AWS KMS without a key": (
            with_distributed(config={**distributed["config"], "keys": {"provider": "aws_kms"}}),
            ["config.keys.aws_kms.key_id"]),
        "keys in an HSM without the PIN Secret": (
            with_distributed(config={**distributed["config"], "keys": {
                "provider": "pkcs11", "pkcs11": {"module": "/m.so", "token_label": "t"}}}),
            ["hsm.existingSecret"]),
        "keys in an HSM without a module": (
            with_distributed(hsm={"existingSecret": "pin"}, config={**distributed["config"], "keys": {
                "provider": "pkcs11", "pkcs11": {"token_label": "t"}}}),
            ["config.keys.pkcs11.module"]),
        "a tenant on the keyring without one": (
            with_distributed(keyring={"json": ""}, config={**distributed["config"], "keys": {
                "provider": "aws_kms", "tenant_providers": {"demo": "local"}, "aws_kms": {"key_id": "alias/k"}}}),
            ["keyring"]),
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
        "otel enabled without an endpoint": ({"otel": {"enabled": True}}, ["otel.endpoint"]),
        "the metrics port on the gateway's gRPC port": (
            with_distributed(metrics={"port": 50051}), ["metrics.port", "gateway.containerPorts.grpc"]),
        "the metrics port on a standalone port": ({"metrics": {"port": 50052}}, ["metrics.port", "standalone"]),
        "the metrics port on the standalone webhook port": ({"metrics": {"port": 8080}}, ["metrics.port", "8080"]),
        "an archiver grace period shorter than its shutdown": (
            with_distributed(archiver={"terminationGracePeriodSeconds": 30}),
            ["archiver.terminationGracePeriodSeconds", "shutdown_timeout"]),
        "an archiver shutdown written with units beyond its grace period": (
            with_distributed(config={**distributed["config"], "archiver": {"shutdown_timeout": "2m"}}),
            ["archiver.terminationGracePeriodSeconds", "shutdown_timeout", "130.0s"]),
        "an archiver shutdown under its old millisecond name beyond its grace period": (
            with_distributed(config={**distributed["config"], "archiver": {"shutdown_timeout_ms": 120000}}),
            ["archiver.terminationGracePeriodSeconds", "130.0s"]),
        "a duration without a unit": (
            with_distributed(config={**distributed["config"], "archiver": {"shutdown_timeout": "30"}}),
            ["shutdown_timeout"]),
        "a standalone grace period shorter than its roles' deadlines in sequence": (
            {"standalone": {"terminationGracePeriodSeconds": 60}},
            ["standalone.terminationGracePeriodSeconds", "in sequence"]),
        "a restorer grace period shorter than its drain": (
            with_distributed(restorer={"terminationGracePeriodSeconds": 20}),
            ["restorer.terminationGracePeriodSeconds", "drain_timeout"]),
        "Teams settings on a Slack webhook": (
            with_distributed(gateway={"webhooks": [
                {"name": "w", "platform": "slack", "tenant": "demo", "secrets": ["x"], "appId": "a"}]}),
            ["gateway.webhooks[0]", "appId", "only for platform teams"]),
        "Teams certificates without appId": (
            with_distributed(gateway={"webhooks": [teams_webhook(appId=None)]}), ["gateway.webhooks[0]", "appId"]),
        "Teams certificates without jwks": (
            with_distributed(gateway={"webhooks": [teams_webhook(jwks=None)]}), ["gateway.webhooks[0]", "jwks"]),
        "a Teams certificate with no private key": (
            with_distributed(gateway={"webhooks": [teams_webhook(certificates=[{"id": "c"}])]}),
            ["certificates[0]", "existingSecretKey"]),
        "a Teams certificate key with no Secret": (
            with_distributed(gateway={"webhooks": [teams_webhook(certificates=[{"id": "c", "existingSecretKey": "k"}])]}),
            ["certificates[0]", "needs existingSecret"]),
        "a Teams certificate with both privateKey and existingSecretKey": (
            with_distributed(gateway={"webhooks": [teams_webhook(
                certificates=[{"id": "c", "privateKey": "k", "existingSecret": "s", "existingSecretKey": "k"}])]}),
            ["certificates[0]", "not both"]),
        "two Teams certificates with one id": (
            with_distributed(gateway={"webhooks": [teams_webhook(
                certificates=[{"id": "c", "privateKey": "k"}, {"id": "c", "privateKey": "l"}])]}),
            ["certificates[1]", "another certificate"]),
        "a JWKS from two sources": (
            with_distributed(gateway={"webhooks": [teams_webhook(jwks={"json": "{}", "existingConfigmap": "j"})]}),
            ["gateway.webhooks[0]", "exactly one"]),
    }
    for what, (values, needles) in refused.items():
        @check(f"render refuses {what}")
        def _refuses():
            expect_failure(what, lambda: chart.render(values, name=RELEASE, namespace=NAMESPACE), *needles)

    def webhook_wiring(case: str, secret_values: list[str]):
        """The rendered [[gateway.webhooks]] read every secret (and, for Teams, every certificate's private key and
        the JWKS) from a file that the gateway container mounts from the right Secret/ConfigMap key, and no secret
        value is in the ConfigMap."""
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
        gateway = next(d for d in kind(documents, "Deployment") if component(d) == "gateway")
        spec = pod_spec(gateway)
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        secrets = {d["metadata"]["name"]: d for d in kind(documents, "Secret")}

        def chart_value(name: str, key: str) -> str:
            assert name in secrets, f"{name} is not a chart-generated Secret"
            assert key in secrets[name]["data"], f"{name} lacks {key}"
            return base64.b64decode(secrets[name]["data"][key]).decode()

        for webhook, wanted in zip(webhooks, expected):
            assert webhook["platform"] == wanted["platform"] and webhook["tenant"] == wanted["tenant"], webhook
            assert "secrets" not in webhook, f"{webhook['name']}: clear secrets in the ConfigMap"
            directory = f"/etc/chatvault/webhooks/{webhook['name']}"
            mount = mounts.get(directory)
            assert mount and mount.get("readOnly") is True, f"{directory} is not mounted read-only: {list(mounts)}"
            mounted = volume_files(volumes[mount["name"]])

            def source_of(path: str) -> tuple[str, str, str]:
                assert path.startswith(directory + "/"), f"{path} is not under {directory}"
                source = mounted.get(path[len(directory) + 1:])
                assert source is not None, f"{path}: no Secret/ConfigMap item mounts it ({mounted})"
                return source

            files = webhook["secret_files"]
            assert len(files) == len(wanted.get("secretKeys") or wanted.get("secrets")), files
            for index, path in enumerate(files):
                source_kind, name, key = source_of(path)
                assert source_kind == "secret", path
                if wanted.get("existingSecret"):
                    assert (name, key) == (wanted["existingSecret"], wanted["secretKeys"][index]), (path, name, key)
                else:
                    assert chart_value(name, key) == wanted["secrets"][index], path
            if wanted["platform"] != "teams":
                assert not {"app_id", "jwks_file", "tenant_ids", "certificates"} & webhook.keys(), webhook
                continue
            assert webhook.get("app_id") == wanted.get("appId"), webhook
            assert webhook.get("tenant_ids", []) == wanted.get("tenantIds", []), webhook
            certificates = webhook.get("certificates", [])
            assert [c["id"] for c in certificates] == [c["id"] for c in wanted.get("certificates", [])], certificates
            for certificate, want in zip(certificates, wanted.get("certificates", [])):
                source_kind, name, key = source_of(certificate["private_key_file"])
                assert source_kind == "secret", certificate
                if want.get("privateKey"):
                    assert chart_value(name, key) == want["privateKey"], certificate
                else:
                    wanted_secret = want.get("existingSecret") or wanted["existingSecret"]
                    assert (name, key) == (wanted_secret, want["existingSecretKey"]), (certificate, name, key)
            jwks = wanted.get("jwks")
            if jwks:
                source_kind, name, key = source_of(webhook["jwks_file"])
                if jwks.get("json"):
                    assert source_kind == "secret" and chart_value(name, key) == jwks["json"], webhook["jwks_file"]
                elif jwks.get("existingConfigmap"):
                    assert (source_kind, name, key) == ("configMap", jwks["existingConfigmap"], jwks.get("key", "keys.json"))
                else:
                    assert (source_kind, name, key) == ("secret", jwks["existingSecret"], jwks.get("key", "keys.json"))
            else:
                assert "jwks_file" not in webhook, webhook
        for secret_value in secret_values:
            for document in kind(documents, "ConfigMap"):
                assert secret_value not in yaml.safe_dump(strip(document)), (
                    f"ConfigMap {document['metadata']['name']} holds a webhook secret")
        for other in kind(documents, "Deployment"):
            if other is not gateway:
                assert not any(v["name"].startswith("webhook-") for v in pod_spec(other).get("volumes", [])), (
                    f"{other['metadata']['name']} mounts webhook secrets")

    @check("webhooks from existing Secrets: secret_files point at mounted files; Teams certificate keys (webhook "
           "and cert-manager Secrets) and JWKS (ConfigMap) mounted and referenced (ci/production-values.yaml)")
    def _webhooks_existing():
        webhooks = cases["ci/production-values.yaml"]["gateway"]["webhooks"]
        assert any(w["platform"] == "teams" and w.get("certificates") for w in webhooks), "a Teams webhook"
        webhook_wiring("ci/production-values.yaml", [])

    @check("webhooks from chart-generated Secrets: mounted files, no secret value in the ConfigMap "
           "(ci/distributed-values.yaml)")
    def _webhooks_chart_secret():
        secret_values = [s for w in distributed["gateway"]["webhooks"] for s in w.get("secrets", [])]
        assert secret_values, "ci/distributed-values.yaml: a webhook with clear secrets"
        webhook_wiring("ci/distributed-values.yaml", secret_values)

    @check(f"Teams from chart-generated values: private key and JWKS files mounted and referenced, no private key "
           f"in the ConfigMap ({all_settings})")
    def _webhooks_teams_chart_secret():
        webhooks = cases[all_settings]["gateway"]["webhooks"]
        clear = [s for w in webhooks for s in w.get("secrets", [])]
        clear += [c["privateKey"] for w in webhooks for c in w.get("certificates", []) if c.get("privateKey")]
        assert any("PRIVATE KEY" in value for value in clear), f"{all_settings}: a Teams privateKey"
        webhook_wiring(all_settings, clear + ["CI-ONLY-NOT-A-REAL-KEY"])

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
        assert {"keyring", "tokens"} <= volume_names("restorer")
        # Every role reaches Kafka: the restorer produces its audit records there.
        for role in ("gateway", "archiver", "restorer"):
            assert "CHATVAULT__KAFKA__PROPERTIES__SASL.PASSWORD" in env_names(role), f"{role} lacks Kafka SASL"
            assert "kafka-tls" in volume_names(role), f"{role} lacks the Kafka TLS files"
        assert not kind(documents, "Secret"), "production values must create no Secret (existingSecret only)"
        sa = kind(documents, "ServiceAccount")[0]
        assert "eks.amazonaws.com/role-arn" in sa["metadata"].get("annotations", {}), "workload identity"

    @check("checkpoint signing key: mounted on the archiver only; signing_key_path, trusted keys, witness rendered")
    def _checkpoint_signing_key():
        documents = rendered["ci/production-values.yaml"]
        for deployment in kind(documents, "Deployment"):
            spec = pod_spec(deployment)
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = {m["name"]: m for m in chatvault_container(deployment).get("volumeMounts", [])}
            if component(deployment) != "archiver":
                assert "checkpoint-signing-key" not in volumes, f"{component(deployment)} mounts the signing key"
                continue
            volume = volumes["checkpoint-signing-key"]["secret"]
            assert volume["secretName"] == "chatvault-checkpoint-key", volume
            assert volume["items"] == [{"key": "signing-key", "path": "signing-key"}], volume
            mount = mounts["checkpoint-signing-key"]
            assert mount["readOnly"] and mount["mountPath"] == "/etc/chatvault/checkpoint", mount
        integrity = chatvault_toml(documents)["integrity"]
        assert integrity["signing_key_path"] == "/etc/chatvault/checkpoint/signing-key", integrity
        assert integrity["trusted_keys"][0].startswith("chatvault.ci.example.com/archive+714deb62+"), integrity
        assert integrity["witness"]["url"] == "", integrity
        # Without the Secret nothing is signed: no key path, no mount.
        plain = chatvault_toml(render(chart, distributed))["integrity"]
        assert "signing_key_path" not in plain and plain["trusted_keys"] == [], plain
        hsm = chatvault_toml(rendered["ci/all-settings-values.yaml"])["integrity"]
        assert hsm["signing_key_pkcs11_label"] == "chatvault-ci-checkpoints" and "signing_key_path" not in hsm, hsm
        for deployment in kind(rendered["ci/all-settings-values.yaml"], "Deployment"):
            volumes = {v["name"] for v in pod_spec(deployment).get("volumes", [])}
            assert "checkpoint-signing-key" not in volumes, "a key on the HSM mounts no key file"
        expect_failure("a key file and an HSM label", lambda: render(chart, with_distributed(
            checkpointSigningKey={"existingSecret": "k"}, hsm={"existingSecret": "pin"},
            config={**distributed["config"], "integrity": {"signing_key_pkcs11_label": "l", "origin": "o"}})),
            "not both")
        witnessed = chatvault_toml(rendered["ci/all-settings-values.yaml"])["integrity"]["witness"]
        assert witnessed == {"url": "s3://chatvault-ci-witness/checkpoints", "object_lock": "off",
                             "options": {"aws_region": "us-west-2"}}, witnessed

    @check("restore drills: one CronJob per drilled tenant, restricted, with the signing key, keyring and token")
    def _drill_cronjobs():
        documents = rendered["ci/production-values.yaml"]
        jobs = kind(documents, "CronJob")
        fullname = next(d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d["data"])["metadata"]["name"]
        assert [j["metadata"]["name"] for j in jobs] == [f"{fullname}-drill-acme"], jobs
        job = jobs[0]
        assert job["spec"]["concurrencyPolicy"] == "Forbid", job["spec"]
        pod = job["spec"]["jobTemplate"]["spec"]["template"]
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never" and spec["securityContext"]["runAsNonRoot"], spec
        container = spec["containers"][0]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"], security
        assert security["capabilities"]["drop"] == ["ALL"], security
        args = container["args"]
        assert args[:3] == ["drill", "--restorer", f"http://{fullname}-restorer:50052"], args
        assert args[3:] == ["--tenant", "acme", "--per-tenant", "3"], args
        env = env_map(container)
        assert env["CHATVAULT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "chatvault-tokens", "key": "acme-legal"}
        assert env["CHATVAULT_CONFIG"]["value"] == "/etc/chatvault/config/chatvault.toml"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoint-signing-key"]["secret"]["secretName"] == "chatvault-checkpoint-key"
        assert volumes["keyring"]["secret"]["secretName"] == "chatvault-keyring"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        # signing_key_path in the shared chatvault.toml names the file the drill's mount provides.
        key_path = chatvault_toml(documents)["integrity"]["signing_key_path"]
        assert key_path.startswith(mounts["checkpoint-signing-key"] + "/"), (key_path, mounts)
        assert pod["metadata"]["labels"][f"{fullname}-client"] == "true", "the NetworkPolicy's client label"
        assert not kind(render(chart, distributed), "CronJob"), "drills are off by default"
        for values, needle in [
            (with_distributed(drill={"enabled": True, "tenants": [{"tenant": "demo", "token": "t"}]}),
             "checkpointSigningKey.existingSecret"),
            (with_distributed(checkpointSigningKey={"existingSecret": "k"}, drill={"enabled": True}),
             "drill.tenants"),
            (with_distributed(checkpointSigningKey={"existingSecret": "k"}, auth={"tokens": {}},
                              drill={"enabled": True, "tenants": [{"tenant": "demo", "token": "missing"}]}),
             "missing"),
        ]:
            expect_failure(f"render {values['drill']}", lambda: render(chart, values), needle)

    @check("scheduled disposition: one CronJob per tenant with only its policy token; the restorer gets the signing key")
    def _disposition_cronjobs():
        values = with_distributed(
            checkpointSigningKey={"existingSecret": "chatvault-checkpoint-key"},
            auth={**distributed["auth"],
                  "tokens": {**distributed["auth"].get("tokens", {}), "acme-retention": "secret-value"}},
            disposition={"enabled": True, "tenants": [{"tenant": "acme", "token": "acme-retention"}]})
        documents = render(chart, values)
        jobs = [j for j in kind(documents, "CronJob") if "-dispose-" in j["metadata"]["name"]]
        fullname = next(d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d["data"])["metadata"]["name"]
        assert [j["metadata"]["name"] for j in jobs] == [f"{fullname}-dispose-acme"], jobs
        job = jobs[0]
        assert job["spec"]["concurrencyPolicy"] == "Forbid" and job["spec"]["schedule"] == "0 4 * * 0", job["spec"]
        spec = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["args"] == ["retention", "plan", "--apply", "--restorer", f"http://{fullname}-restorer:50052",
                                     "--tenant", "acme", "--reason", "scheduled disposition"], container["args"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"], security
        env = env_map(container)
        assert env["CHATVAULT_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "acme-retention", env
        # Least privilege: the job holds a token and nothing else (no storage credentials, keys or config).
        assert set(env) == {"CHATVAULT_TOKEN", "OTEL_SDK_DISABLED"}, env
        assert {v["name"] for v in spec["volumes"]} == {"tmp"}, spec["volumes"]
        deployments = {d["metadata"]["name"]: d for d in kind(documents, "Deployment")}
        restorer_volumes = {v["name"] for v in deployments[f"{fullname}-restorer"]["spec"]["template"]["spec"]["volumes"]}
        assert "checkpoint-signing-key" in restorer_volumes, restorer_volumes
        plain = {d["metadata"]["name"]: d for d in kind(render(chart, with_distributed(
            checkpointSigningKey={"existingSecret": "chatvault-checkpoint-key"})), "Deployment")}
        plain_volumes = {v["name"] for v in plain[f"{fullname}-restorer"]["spec"]["template"]["spec"]["volumes"]}
        assert "checkpoint-signing-key" not in plain_volumes, "the restorer gets the signing key only for disposition"
        for bad, needle in [
            (with_distributed(disposition={"enabled": True, "tenants": [{"tenant": "acme", "token": "t"}]}),
             "checkpointSigningKey.existingSecret"),
            (with_distributed(checkpointSigningKey={"existingSecret": "k"}, disposition={"enabled": True}),
             "disposition.tenants"),
            (with_distributed(checkpointSigningKey={"existingSecret": "k"}, auth={"tokens": {}},
                              disposition={"enabled": True, "tenants": [{"tenant": "acme", "token": "missing"}]}),
             "missing"),
        ]:
            expect_failure(f"render {bad['disposition']}", lambda: render(chart, bad), needle)

    @check("back-fill: one Job per imports.jobs entry, the export's claim and the ingest token only")
    def _import_jobs():
        values = with_distributed(
            auth={**distributed["auth"],
                  "tokens": {**distributed["auth"].get("tokens", {}), "acme-ingest": "secret-value"}},
            imports={"jobs": [
                {"name": "slack-2024", "source": "slack-export", "tenant": "acme", "token": "acme-ingest",
                 "claim": "exports", "path": "slack/export.zip", "workspace": "T0123"},
                {"name": "mm", "source": "mattermost", "tenant": "acme", "token": "acme-ingest",
                 "claim": "exports", "path": "mm/export.zip"},
                {"name": "teams-h1", "source": "teams", "tenant": "acme", "token": "acme-ingest", "claim": "exports",
                 "directory": "dir-1", "clientId": "app-1",
                 "clientSecret": {"secretName": "graph-app", "key": "secret"},
                 "users": ["u1", "u2"], "teams": ["t1"], "from": "2024-01-01T00:00:00Z", "model": "A"}]})
        documents = render(chart, values)
        fullname = next(d for d in kind(documents, "ConfigMap") if "chatvault.toml" in d["data"])["metadata"]["name"]
        jobs = {j["metadata"]["name"]: j for j in kind(documents, "Job") if "-import-" in j["metadata"]["name"]}
        assert sorted(jobs) == [f"{fullname}-import-mm", f"{fullname}-import-slack-2024",
                                f"{fullname}-import-teams-h1"], sorted(jobs)
        teams = jobs[f"{fullname}-import-teams-h1"]["spec"]["template"]["spec"]["containers"][0]
        assert teams["args"] == ["import", "teams", "--directory", "dir-1", "--client-id", "app-1", "--user", "u1",
                                 "--user", "u2", "--team", "t1", "--from", "2024-01-01T00:00:00Z", "--model", "A",
                                 "--checkpoint", "/export/teams-h1.chatvault-import", "--gateway",
                                 f"http://{fullname}-gateway:50051", "--tenant", "acme"], teams["args"]
        secret = env_map(teams)["CHATVAULT_TEAMS_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "graph-app", "key": "secret"}, secret
        spec = jobs[f"{fullname}-import-slack-2024"]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["args"] == ["import", "slack-export", "/export/slack/export.zip", "--gateway",
                                     f"http://{fullname}-gateway:50051", "--tenant", "acme",
                                     "--workspace", "T0123"], container["args"]
        assert "--workspace" not in jobs[f"{fullname}-import-mm"]["spec"]["template"]["spec"]["containers"][0]["args"]
        env = env_map(container)
        assert env["CHATVAULT_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "acme-ingest", env
        assert set(env) == {"CHATVAULT_TOKEN", "OTEL_SDK_DISABLED"}, env
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert set(volumes) == {"export", "tmp"}, volumes
        assert volumes["export"]["persistentVolumeClaim"] == {"claimName": "exports"}, volumes
        assert container["securityContext"]["readOnlyRootFilesystem"], container["securityContext"]
        assert not [j for j in kind(render(chart, distributed), "Job") if "-import-" in j["metadata"]["name"]]
        job = {"name": "x", "source": "slack-export", "tenant": "acme", "token": "acme-ingest", "claim": "c",
               "path": "e.zip"}
        for bad, needle in [
            (with_distributed(auth={"tokens": {}}, imports={"jobs": [job]}), "the token acme-ingest"),
            (with_distributed(auth={**values["auth"]},
                              imports={"jobs": [{**job, "source": "mattermost", "workspace": "T1"}]}),
             "workspace is a Slack team id"),
            (with_distributed(auth={**values["auth"]}, imports={"jobs": [{**job, "source": "discord"}]}), "source"),
            (with_distributed(auth={**values["auth"]}, imports={"jobs": [{**job, "source": "teams"}]}),
             "a teams import needs directory"),
            (with_distributed(auth={**values["auth"]}, imports={"jobs": [{k: v for k, v in job.items() if k != "path"}]}),
             "needs the export's path"),
        ]:
            expect_failure(f"render {bad['imports']}", lambda: render(chart, bad), needle)

    @check("storage.object_lock reaches chatvault.toml (default off); other modes are refused by the schema")
    def _object_lock():
        assert chatvault_toml(render(chart, with_distributed()))["storage"]["object_lock"] == "off"
        locked = with_distributed(config={**distributed["config"],
                                          "storage": {**distributed["config"]["storage"], "object_lock": "compliance"}})
        assert chatvault_toml(render(chart, locked))["storage"]["object_lock"] == "compliance"
        bad = with_distributed(config={**distributed["config"],
                                       "storage": {**distributed["config"]["storage"], "object_lock": "worm"}})
        expect_failure("render object_lock=worm", lambda: render(chart, bad), "object_lock")

    @check("keys in AWS KMS: no keyring needed or mounted; the provider and key reach chatvault.toml")
    def _kms_keys():
        values = with_distributed(keyring={"json": ""}, config={**distributed["config"], "keys": {
            "provider": "aws_kms", "aws_kms": {"region": "eu-west-1", "key_id": "alias/chatvault"}}})
        documents = render(chart, values)
        for deployment in kind(documents, "Deployment"):
            volumes = {v["name"] for v in pod_spec(deployment).get("volumes", [])}
            assert "keyring" not in volumes, f"{component(deployment)} mounts a keyring it does not use"
        assert not [s for s in kind(documents, "Secret") if s["metadata"]["name"].endswith("-keyring")]
        keys = chatvault_toml(documents)["keys"]
        assert keys["provider"] == "aws_kms" and keys["aws_kms"]["key_id"] == "alias/chatvault", keys
        assert keys["aws_kms"]["region"] == "eu-west-1", keys

    @check("ServiceMonitor only when the cluster serves monitoring.coreos.com/v1")
    def _service_monitor():
        # Offline rendering has no such API: enabling it must not emit a ServiceMonitor a cluster would reject.
        documents = rendered["ci/production-values.yaml"]
        assert not kind(documents, "ServiceMonitor"), "ServiceMonitor rendered without the CRD"
        assert any(s["metadata"]["name"].endswith("-metrics") for s in kind(documents, "Service"))

    @check("ServiceMonitor on a cluster with monitoring.coreos.com/v1: /metrics of every component's metrics Service")
    def _service_monitor_with_crd():
        # helm-python-sdk cannot pass --api-versions: render a copy of the chart whose capability test is true.
        with tempfile.TemporaryDirectory() as directory:
            copy_path = Path(directory) / "chatvault"
            shutil.copytree(CHART, copy_path)
            template = copy_path / "templates" / "metrics.yaml"
            condition = '(.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")'
            assert condition in template.read_text(), f"metrics.yaml no longer tests {condition}"
            template.write_text(template.read_text().replace(condition, "true"))
            for case in ("ci/production-values.yaml", "default values"):
                values = deep_merge(cases[case], {"metrics": {"serviceMonitor": {"enabled": True}}})
                documents = render(helm.Chart.load(copy_path), values)
                monitors = kind(documents, "ServiceMonitor")
                assert len(monitors) == 1, f"{case}: {len(monitors)} ServiceMonitors"
                monitor = monitors[0]["spec"]
                assert monitor["jobLabel"] == "app.kubernetes.io/component", monitor
                assert monitor["namespaceSelector"] == {"matchNames": [NAMESPACE]}, monitor
                [endpoint] = monitor["endpoints"]
                assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics", endpoint
                settings = effective(values)
                assert endpoint["interval"] == settings["metrics"]["serviceMonitor"]["interval"], endpoint
                for key, label in settings["metrics"]["serviceMonitor"]["labels"].items():
                    assert monitors[0]["metadata"]["labels"].get(key) == label, monitors[0]["metadata"]["labels"]
                selector = monitor["selector"]

                def selected(service: dict) -> bool:
                    labels = service["metadata"]["labels"]
                    if not selector["matchLabels"].items() <= labels.items():
                        return False
                    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

                scraped = {component(s) for s in kind(documents, "Service") if selected(s)
                           and any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])}
                deployed = {component(d) for d in kind(documents, "Deployment")}
                assert scraped == deployed, f"{case}: the ServiceMonitor scrapes {scraped}, deployed are {deployed}"

    @check("existingConfigmap: the metrics listener is still forced onto metrics.port (CHATVAULT__TELEMETRY__...)")
    def _existing_configmap():
        documents = render(chart, with_distributed(existingConfigmap="my-chatvault-config", metrics={"port": 9500}))
        assert not chatvault_toml(documents), "a chatvault.toml was rendered despite existingConfigmap"
        for deployment in kind(documents, "Deployment"):
            env = env_map(chatvault_container(deployment))
            listen = env.get("CHATVAULT__TELEMETRY__METRICS_LISTEN", {}).get("value")
            assert listen == "0.0.0.0:9500", f"{deployment['metadata']['name']}: {listen}"
        for deployment in kind(rendered["ci/distributed-values.yaml"], "Deployment"):
            assert "CHATVAULT__TELEMETRY__METRICS_LISTEN" not in env_map(chatvault_container(deployment)), (
                "the chart's own chatvault.toml sets metrics_listen: no override needed")

    @check("README.md's values table lists every value of values.yaml")
    def _readme_values():
        schema = json.loads((CHART / "values.schema.json").read_text())
        rows = values_table_paths(DEFAULTS, schema, schema["definitions"])
        readme = (CHART / "README.md").read_text()
        assert "\n## Values\n" in readme, "README.md has no '## Values' section"
        table = set(re.findall(r"^\| `([^`]+)` \|", readme.split("\n## Values\n", 1)[1], re.M))
        missing = [row for row in rows if row not in table]
        assert not missing, f"README.md values table lacks {missing}"
        stale = sorted(table - set(rows))
        assert not stale, f"README.md values table lists values that values.yaml lacks: {stale}"

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
