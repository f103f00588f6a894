{{/* Names */}}
{{- define "chatvault.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chatvault.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", component names stay whole (the fullname is cut to fit). */}}
{{- define "chatvault.componentName" -}}
{{- $root := index . 0 -}}{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "chatvault.fullname" $root | trunc (int (sub 62 (len $component))) | trimSuffix "-") $component -}}
{{- end -}}

{{- define "chatvault.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chatvault.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels */}}
{{- define "chatvault.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatvault.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chatvault.labels" -}}
helm.sh/chart: {{ include "chatvault.chart" . }}
{{ include "chatvault.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatvault
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* (list $ "gateway") */}}
{{- define "chatvault.componentSelectorLabels" -}}
{{ include "chatvault.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "chatvault.componentLabels" -}}
{{ include "chatvault.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "chatvault.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Image */}}
{{- define "chatvault.image" -}}
{{- $registry := default .Values.image.registry .Values.global.imageRegistry -}}
{{- $repository := .Values.image.repository -}}
{{- $ref := printf "%s/%s" $registry $repository | trimPrefix "/" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $ref .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "chatvault.imagePullSecrets" -}}
{{- $secrets := concat .Values.global.imagePullSecrets .Values.image.pullSecrets -}}
{{- with $secrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "chatvault.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chatvault.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secret names */}}
{{- define "chatvault.tokensSecretName" -}}
{{- default (include "chatvault.componentName" (list . "tokens")) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "chatvault.keyringSecretName" -}}
{{- default (include "chatvault.componentName" (list . "keyring")) .Values.keyring.existingSecret -}}
{{- end -}}
{{- define "chatvault.keyringSecretKey" -}}
{{- if .Values.keyring.existingSecret }}{{ .Values.keyring.existingSecretKey }}{{ else }}keyring.json{{ end -}}
{{- end -}}
{{- define "chatvault.credentialsSecretName" -}}
{{- include "chatvault.componentName" (list . "credentials") -}}
{{- end -}}
{{- define "chatvault.webhooksSecretName" -}}
{{- include "chatvault.componentName" (list . "webhooks") -}}
{{- end -}}
{{- define "chatvault.configMapName" -}}
{{- default (include "chatvault.fullname" .) .Values.existingConfigmap -}}
{{- end -}}

{{- define "chatvault.hasTokens" -}}
{{- if or .Values.auth.existingSecret .Values.auth.tokens }}true{{ end -}}
{{- end -}}
{{/* Whether some tenant's keys are in the keyring ("true" or empty): the default provider, or a tenant's. */}}
{{- define "chatvault.usesKeyring" -}}
{{- $keys := .Values.config.keys | default dict -}}
{{- if or (eq (default "local" $keys.provider) "local") (has "local" (values ($keys.tenant_providers | default dict))) }}true{{ end -}}
{{- end -}}
{{- define "chatvault.usesKms" -}}
{{- $keys := .Values.config.keys | default dict -}}
{{- if or (eq (default "local" $keys.provider) "aws_kms") (has "aws_kms" (values ($keys.tenant_providers | default dict))) }}true{{ end -}}
{{- end -}}
{{- define "chatvault.hasKeyring" -}}
{{- if or .Values.keyring.existingSecret .Values.keyring.json }}true{{ end -}}
{{- end -}}

{{/* A webhook's files, (list $ $webhook) -> JSON {"sources": [sources of a projected volume], "secretFiles": [...],
"certificates": [{"id", "file"}], "jwksFile": "..." or ""}. All are mounted under /etc/chatvault/webhooks/<name>/:
- secrets: the keys of its existingSecret under their own names, or its clear secrets (chart Secret keys
  "<name>.<i>") as secret-<i>;
- Teams certificates' private keys as certificates/<i>.key: key existingSecretKey of the certificate's
  existingSecret (default the webhook's), or its clear privateKey (chart Secret key "<name>.certificate-<i>");
- the Teams JWKS as jwks/<key>: from jwks.existingConfigmap or jwks.existingSecret (key jwks.key, default
  keys.json), or its clear json (chart Secret key "<name>.jwks").
Items of one Secret are grouped into one source. */}}
{{- define "chatvault.webhookFiles" -}}
{{- $ := index . 0 -}}{{- $webhook := index . 1 -}}
{{- $dir := printf "/etc/chatvault/webhooks/%s" $webhook.name -}}
{{- $chartSecret := include "chatvault.webhooksSecretName" $ -}}
{{- $bySecret := dict -}}{{- $secretOrder := list -}}
{{- $secretFiles := list -}}{{- $certificates := list -}}{{- $jwksFile := "" -}}{{- $configMapSources := list -}}
{{- $entries := list -}}
{{- if $webhook.existingSecret -}}
{{- range $key := $webhook.secretKeys -}}
{{- $entries = append $entries (list $webhook.existingSecret $key $key) -}}
{{- $secretFiles = append $secretFiles (printf "%s/%s" $dir $key) -}}
{{- end -}}
{{- else -}}
{{- range $index, $secret := $webhook.secrets -}}
{{- $entries = append $entries (list $chartSecret (printf "%s.%d" $webhook.name $index) (printf "secret-%d" $index)) -}}
{{- $secretFiles = append $secretFiles (printf "%s/secret-%d" $dir $index) -}}
{{- end -}}
{{- end -}}
{{- range $index, $certificate := $webhook.certificates -}}
{{- $path := printf "certificates/%d.key" $index -}}
{{- if $certificate.privateKey -}}
{{- $entries = append $entries (list $chartSecret (printf "%s.certificate-%d" $webhook.name $index) $path) -}}
{{- else -}}
{{- $entries = append $entries (list (default $webhook.existingSecret $certificate.existingSecret) $certificate.existingSecretKey $path) -}}
{{- end -}}
{{- $certificates = append $certificates (dict "id" $certificate.id "file" (printf "%s/%s" $dir $path)) -}}
{{- end -}}
{{- with $webhook.jwks -}}
{{- $key := default "keys.json" .key -}}
{{- if .json -}}
{{- $jwksFile = printf "%s/jwks/keys.json" $dir -}}
{{- $entries = append $entries (list $chartSecret (printf "%s.jwks" $webhook.name) "jwks/keys.json") -}}
{{- else if .existingConfigmap -}}
{{- $jwksFile = printf "%s/jwks/%s" $dir $key -}}
{{- $configMapSources = append $configMapSources (dict "configMap" (dict "name" .existingConfigmap "items" (list (dict "key" $key "path" (printf "jwks/%s" $key))))) -}}
{{- else if .existingSecret -}}
{{- $jwksFile = printf "%s/jwks/%s" $dir $key -}}
{{- $entries = append $entries (list .existingSecret $key (printf "jwks/%s" $key)) -}}
{{- end -}}
{{- end -}}
{{- range $entry := $entries -}}
{{- $name := index $entry 0 -}}
{{- if not (hasKey $bySecret $name) -}}
{{- $secretOrder = append $secretOrder $name -}}
{{- $_ := set $bySecret $name (list) -}}
{{- end -}}
{{- $_ := set $bySecret $name (append (get $bySecret $name) (dict "key" (index $entry 1) "path" (index $entry 2))) -}}
{{- end -}}
{{- $sources := list -}}
{{- range $name := $secretOrder -}}
{{- $sources = append $sources (dict "secret" (dict "name" $name "items" (get $bySecret $name))) -}}
{{- end -}}
{{- $sources = concat $sources $configMapSources -}}
{{- toJson (dict "sources" $sources "secretFiles" $secretFiles "certificates" $certificates "jwksFile" $jwksFile) -}}
{{- end -}}

{{/* Whether a webhook keeps a value in the chart-generated webhooks Secret (clear secrets, Teams private keys or
JWKS). */}}
{{- define "chatvault.hasChartWebhookSecrets" -}}
{{- range $webhook := .Values.gateway.webhooks -}}
{{- if not $webhook.existingSecret }}true{{ end -}}
{{- range $certificate := $webhook.certificates }}{{ if $certificate.privateKey }}true{{ end }}{{ end -}}
{{- if and $webhook.jwks (($webhook.jwks).json) }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* The OTLP endpoint's port (explicit, or 443 / 80 by scheme), for the egress NetworkPolicy. */}}
{{- define "chatvault.otelPort" -}}
{{- $url := urlParse .Values.otel.endpoint -}}
{{- $hostPort := splitList ":" $url.host -}}
{{- if gt (len $hostPort) 1 -}}{{ last $hostPort }}{{- else if eq $url.scheme "https" -}}443{{- else -}}80{{- end -}}
{{- end -}}

{{/* Telemetry environment of a chatvault container, (list $ $component): the [telemetry] listen address when
the config file is not the chart's, and the standard OTEL_* variables (otel). */}}
{{- define "chatvault.telemetryEnv" -}}
{{- $ := index . 0 -}}{{- $component := index . 1 -}}
{{- $o := $.Values.otel -}}
{{- if and $.Values.existingConfigmap (ne $component "standalone") }}
# The probes and Services use metrics.port: keep the operations listener on it whatever existingConfigmap says.
- name: CHATVAULT__TELEMETRY__METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int64 $.Values.metrics.port) | quote }}
{{- end }}
{{- if $o.enabled }}
- name: OTEL_SDK_DISABLED
  value: "false"
- name: OTEL_SERVICE_NAME
  value: {{ printf "chatvault-%s" $component | quote }}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- $attributes := dict "k8s.namespace.name" (include "chatvault.namespace" $) "k8s.pod.name" "$(K8S_POD_NAME)" "k8s.deployment.name" (include "chatvault.componentName" (list $ $component)) }}
{{- $attributes = merge (deepCopy $o.resourceAttributes) $attributes }}
{{- $pairs := list }}
{{- range $key := keys $attributes | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (get $attributes $key)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $o.protocol | quote }}
- name: OTEL_EXPORTER_OTLP_TIMEOUT
  value: {{ int64 $o.timeout | toString | quote }}
{{- if $o.headersExistingSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $o.headersExistingSecret }}
      key: {{ $o.headersExistingSecretKey }}
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $o.tracesSampler | quote }}
{{- if ne (toString $o.tracesSamplerArg) "" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ toString $o.tracesSamplerArg | quote }}
{{- end }}
- name: OTEL_METRIC_EXPORT_INTERVAL
  value: {{ int64 $o.metricExportInterval | toString | quote }}
- name: OTEL_TRACES_EXPORTER
  value: {{ $o.tracesExporter | quote }}
- name: OTEL_METRICS_EXPORTER
  value: {{ $o.metricsExporter | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end -}}

{{/* A container's probes, (list $values $defaults): each of liveness/readiness/startup is the custom*Probe
when set, else the chart's probe (a dict of its handler, e.g. {"httpGet": {...}}) with the timing of
<name>Probe when enabled. */}}
{{- define "chatvault.probes" -}}
{{- $v := index . 0 -}}{{- $handlers := index . 1 -}}
{{- range $name := list "startup" "liveness" "readiness" }}
{{- $custom := get $v (printf "custom%sProbe" (title $name)) }}
{{- $probe := get $v (printf "%sProbe" $name) }}
{{- if $custom }}
{{ $name }}Probe:
  {{- toYaml $custom | nindent 2 }}
{{- else if and $probe $probe.enabled }}
{{ $name }}Probe:
  {{- toYaml (get $handlers $name) | nindent 2 }}
  {{- toYaml (omit $probe "enabled") | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "chatvault.distributed" -}}
{{- if eq .Values.mode "distributed" }}true{{ end -}}
{{- end -}}

{{/* A TOML scalar: strings JSON-quoted (a valid TOML basic string), whole numbers without a fraction (values
arrive as float64), booleans as is. */}}
{{- define "chatvault.tomlScalar" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else -}}
{{- fail (printf "chatvault config: unsupported value %v (%s)" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* A duration setting in milliseconds: (list $section "<name>" <default millis>). The binary's syntax: "500ms",
"10s", "2m", "1h" or combined ("1m30s"), or 0. Until the old names are removed, an integer `<name>_ms` is read
when `<name>` is unset; otherwise the binary's default. */}}
{{- define "chatvault.durationMillis" -}}
{{- $section := index . 0 | default dict -}}{{- $name := index . 1 -}}
{{- $old := printf "%s_ms" $name -}}
{{- $value := get $section $name -}}
{{- if and (not (hasKey $section $name)) (hasKey $section $old) -}}
{{- int64 (get $section $old) -}}
{{- else if not (hasKey $section $name) -}}
{{- index . 2 -}}
{{- else if eq (toString $value) "0" -}}
0
{{- else if regexMatch "^([0-9]+(ms|s|m|h))+$" (toString $value) -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" (toString $value) -1 -}}
{{- $number := int64 (regexFind "^[0-9]+" .) -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $scale := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit -}}
{{- $total = add $total (mul $number $scale) -}}
{{- end -}}
{{- $total -}}
{{- else -}}
{{- fail (printf "%s = %v: expected a duration with a unit, such as \"500ms\", \"10s\", \"2m\" or \"1h\"" $name $value) -}}
{{- end -}}
{{- end -}}

{{/* Fails unless terminationGracePeriodSeconds exceeds preStop plus what the role may spend shutting down:
(list $role $values $shutdownMillis $what). */}}
{{- define "chatvault.validateGrace" -}}
{{- $role := index . 0 -}}{{- $v := index . 1 -}}{{- $shutdown := int64 (index . 2) -}}{{- $what := index . 3 -}}
{{- $grace := int64 $v.terminationGracePeriodSeconds -}}{{- $preStop := int64 $v.preStopSleepSeconds -}}
{{- if le (mul $grace 1000) (add (mul $preStop 1000) $shutdown) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + %s (%.1fs)" $role $grace $preStop $what (divf $shutdown 1000)) -}}
{{- end -}}
{{- end -}}

{{/* Settings checks that a schema cannot express; called from the ConfigMap and NOTES. */}}
{{- define "chatvault.validate" -}}
{{- if and (not (include "chatvault.distributed" .)) .Values.gateway.webhooks -}}
{{- fail "gateway.webhooks: webhook integrations need mode distributed (the standalone pod has no config for them)" -}}
{{- end -}}
{{- if and .Values.otel.enabled (not .Values.otel.endpoint) -}}
{{- fail "otel.endpoint: otel.enabled needs the collector's URL (OTLP export happens only with an endpoint), e.g. http://otel-collector.observability:4317" -}}
{{- end -}}
{{- $metricsPort := int64 .Values.metrics.port -}}
{{- $otherPorts := dict -}}
{{- if include "chatvault.distributed" . -}}
{{- $otherPorts = dict "gateway.containerPorts.grpc" .Values.gateway.containerPorts.grpc "gateway.containerPorts.http" .Values.gateway.containerPorts.http "restorer.containerPorts.grpc" .Values.restorer.containerPorts.grpc -}}
{{- else -}}
{{- $otherPorts = dict "standalone.containerPorts.gateway" .Values.standalone.containerPorts.gateway "standalone.containerPorts.restorer" .Values.standalone.containerPorts.restorer "the standalone webhook listener (127.0.0.1:8080)" 8080 -}}
{{- end -}}
{{- range $setting, $port := $otherPorts -}}
{{- if eq (int64 $port) $metricsPort -}}
{{- fail (printf "metrics.port (%d) is also %s: the metrics listener needs a port of its own" $metricsPort $setting) -}}
{{- end -}}
{{- end -}}
{{- if not (include "chatvault.distributed" .) -}}
{{- /* The standalone pod runs on the binary's defaults and stops its roles in order: the gateway drains
(2 + 20 s), the archiver archives the rest of the in-process topic and leaves the group (30 + 10 s), then the
restorer drains (20 s). */ -}}
{{- include "chatvault.validateGrace" (list "standalone" (dict "terminationGracePeriodSeconds" .Values.standalone.terminationGracePeriodSeconds "preStopSleepSeconds" 0) 82000 "the gateway's, archiver's and restorer's default shutdown deadlines in sequence") -}}
{{- end -}}
{{- if include "chatvault.distributed" . -}}
{{- $v := .Values -}}
{{- if not (or $v.gateway.enabled $v.archiver.enabled $v.restorer.enabled) -}}
{{- fail "mode distributed: enable at least one of gateway, archiver, restorer" -}}
{{- end -}}
{{- if and (or $v.archiver.enabled $v.restorer.enabled) (not $v.existingConfigmap) -}}
{{- if not (hasPrefix "s3://" $v.config.storage.url) -}}
{{- fail "config.storage.url: mode distributed needs shared object storage (s3://bucket[/prefix]); file:// and memory:// would be per pod" -}}
{{- end -}}
{{- end -}}
{{- $keys := $v.config.keys | default dict -}}
{{- if and (or $v.archiver.enabled $v.restorer.enabled) (include "chatvault.usesKeyring" .) (not (include "chatvault.hasKeyring" .)) -}}
{{- fail "keyring: archiver and restorer need the shared keyring: set keyring.existingSecret (or keyring.json for evaluation), or hold the keys in a KMS (config.keys.provider: aws_kms)" -}}
{{- end -}}
{{- $pkcs11InUse := or (eq (default "local" $keys.provider) "pkcs11") (has "pkcs11" (values ($keys.tenant_providers | default dict))) -}}
{{- if and $pkcs11InUse (or $v.archiver.enabled $v.restorer.enabled) (not $v.existingConfigmap) -}}
{{- if not (($keys.pkcs11 | default dict).module) -}}
{{- fail "config.keys.pkcs11.module: a tenant's keys are in an HSM (pkcs11): name the token's PKCS#11 library in the container" -}}
{{- end -}}
{{- if not (($keys.pkcs11 | default dict).token_label) -}}
{{- fail "config.keys.pkcs11.token_label: name the HSM token that holds the keys" -}}
{{- end -}}
{{- if not $v.hsm.existingSecret -}}
{{- fail "hsm.existingSecret: a tenant's keys are in an HSM (pkcs11): name the Secret holding the PIN" -}}
{{- end -}}
{{- end -}}
{{- if and (eq (default "local" $keys.provider) "aws_kms") (not (($keys.aws_kms | default dict).key_id)) (not $v.existingConfigmap) -}}
{{- fail "config.keys.aws_kms.key_id: keys.provider aws_kms needs the KMS key (id, ARN or alias/...) that wraps data keys" -}}
{{- end -}}
{{- $integrity := $v.config.integrity | default dict -}}
{{- if and $integrity.signing_key_pkcs11_label $v.checkpointSigningKey.existingSecret -}}
{{- fail "config.integrity.signing_key_pkcs11_label: the checkpoint key is either on the HSM or in checkpointSigningKey.existingSecret, not both" -}}
{{- end -}}
{{- if and $integrity.signing_key_pkcs11_label (not $v.hsm.existingSecret) (not $v.existingConfigmap) -}}
{{- fail "config.integrity.signing_key_pkcs11_label: a signing key on the HSM needs the PIN: set hsm.existingSecret (and config.keys.pkcs11.module, token_label)" -}}
{{- end -}}
{{- if and $integrity.signing_key_pkcs11_label (not $integrity.origin) -}}
{{- fail "config.integrity.origin: a signing key on the HSM needs the log's origin" -}}
{{- end -}}
{{- if $v.drill.enabled -}}
{{- if not $v.restorer.enabled -}}
{{- fail "drill.enabled: restore drills restore through the restorer: enable restorer" -}}
{{- end -}}
{{- if not (or $v.checkpointSigningKey.existingSecret $integrity.signing_key_pkcs11_label) -}}
{{- fail "drill.enabled: drill reports are signed with the checkpoint key: set checkpointSigningKey.existingSecret (or config.integrity.signing_key_pkcs11_label)" -}}
{{- end -}}
{{- if not $v.drill.tenants -}}
{{- fail "drill.tenants: name the tenants to drill, each with its drill token ([{tenant: acme, token: acme-drill}])" -}}
{{- end -}}
{{- range $entry := $v.drill.tenants -}}
{{- if gt (len (include "chatvault.componentName" (list $ (printf "drill-%s" $entry.tenant)))) 52 -}}
{{- fail (printf "drill.tenants (%s): the CronJob name %s is longer than Kubernetes' 52 characters: shorten fullnameOverride" $entry.tenant (include "chatvault.componentName" (list $ (printf "drill-%s" $entry.tenant)))) -}}
{{- end -}}
{{- if not (include "chatvault.hasTokens" $) -}}
{{- fail (printf "drill.tenants (%s): the drill token %s comes from the tokens Secret: set auth.existingSecret (or auth.tokens)" $entry.tenant $entry.token) -}}
{{- end -}}
{{- if and (not $v.auth.existingSecret) (not (hasKey $v.auth.tokens $entry.token)) -}}
{{- fail (printf "auth.tokens: no value for drill token %s" $entry.token) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.disposition.enabled -}}
{{- if not $v.restorer.enabled -}}
{{- fail "disposition.enabled: disposition runs in the restorer: enable restorer" -}}
{{- end -}}
{{- if not (or $v.checkpointSigningKey.existingSecret $integrity.signing_key_pkcs11_label) -}}
{{- fail "disposition.enabled: disposition reports are signed with the checkpoint key: set checkpointSigningKey.existingSecret (or config.integrity.signing_key_pkcs11_label)" -}}
{{- end -}}
{{- if not $v.disposition.tenants -}}
{{- fail "disposition.tenants: name the tenants, each with a token granting the policy role ([{tenant: acme, token: acme-retention}])" -}}
{{- end -}}
{{- range $entry := $v.disposition.tenants -}}
{{- if gt (len (include "chatvault.componentName" (list $ (printf "dispose-%s" $entry.tenant)))) 52 -}}
{{- fail (printf "disposition.tenants (%s): the CronJob name %s is longer than Kubernetes' 52 characters: shorten fullnameOverride" $entry.tenant (include "chatvault.componentName" (list $ (printf "dispose-%s" $entry.tenant)))) -}}
{{- end -}}
{{- if not (include "chatvault.hasTokens" $) -}}
{{- fail (printf "disposition.tenants (%s): the token %s comes from the tokens Secret: set auth.existingSecret (or auth.tokens)" $entry.tenant $entry.token) -}}
{{- end -}}
{{- if and (not $v.auth.existingSecret) (not (hasKey $v.auth.tokens $entry.token)) -}}
{{- fail (printf "auth.tokens: no value for disposition token %s" $entry.token) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $entry := $v.imports.jobs -}}
{{- if not $v.gateway.enabled -}}
{{- fail (printf "imports.jobs (%s): imports go through the gateway: enable gateway" $entry.name) -}}
{{- end -}}
{{- if gt (len (include "chatvault.componentName" (list $ (printf "import-%s" $entry.name)))) 63 -}}
{{- fail (printf "imports.jobs (%s): the Job name %s is longer than Kubernetes' 63 characters: shorten the name or fullnameOverride" $entry.name (include "chatvault.componentName" (list $ (printf "import-%s" $entry.name)))) -}}
{{- end -}}
{{- if not (include "chatvault.hasTokens" $) -}}
{{- fail (printf "imports.jobs (%s): the token %s comes from the tokens Secret: set auth.existingSecret (or auth.tokens)" $entry.name $entry.token) -}}
{{- end -}}
{{- if and (not $v.auth.existingSecret) (not (hasKey $v.auth.tokens $entry.token)) -}}
{{- fail (printf "auth.tokens: no value for import token %s" $entry.token) -}}
{{- end -}}
{{- if eq $entry.source "teams" -}}
{{- if not (and $entry.directory $entry.clientId $entry.clientSecret $entry.from) -}}
{{- fail (printf "imports.jobs (%s): a teams import needs directory, clientId, clientSecret {secretName, key} and from" $entry.name) -}}
{{- end -}}
{{- if not (or $entry.users $entry.teams) -}}
{{- fail (printf "imports.jobs (%s): a teams import needs users or teams" $entry.name) -}}
{{- end -}}
{{- else if not $entry.path -}}
{{- fail (printf "imports.jobs (%s): a %s import needs the export's path within the claim" $entry.name $entry.source) -}}
{{- end -}}
{{- if and $entry.workspace (ne $entry.source "slack-export") -}}
{{- fail (printf "imports.jobs (%s): workspace is a Slack team id; %s exports take none" $entry.name $entry.source) -}}
{{- end -}}
{{- end -}}
{{- if and (or $v.gateway.enabled $v.restorer.enabled) (not $v.tenants) (not $v.existingConfigmap) -}}
{{- fail "tenants: gateway and restorer accept no request without tenants and tokens" -}}
{{- end -}}
{{- range $tenant := $v.tenants -}}
{{- range $token := $tenant.tokens -}}
{{- if and (not $token.tokenSha256) (not (include "chatvault.hasTokens" $)) -}}
{{- fail (printf "tenants: token %s has no tokenSha256, so its value comes from the tokens Secret: set auth.existingSecret (or auth.tokens)" $token.name) -}}
{{- end -}}
{{- if and (not $token.tokenSha256) (not $v.auth.existingSecret) (not (hasKey $v.auth.tokens $token.name)) -}}
{{- fail (printf "auth.tokens: no value for token %s" $token.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $tenantIds := list -}}
{{- range $tenant := $v.tenants }}{{ $tenantIds = append $tenantIds $tenant.id }}{{ end -}}
{{- $webhookNames := list -}}
{{- range $index, $webhook := $v.gateway.webhooks -}}
{{- $setting := printf "gateway.webhooks[%d] (%s)" $index $webhook.name -}}
{{- if has $webhook.name $webhookNames -}}
{{- fail (printf "%s: name is used by another webhook" $setting) -}}
{{- end -}}
{{- $webhookNames = append $webhookNames $webhook.name -}}
{{- if and $v.tenants (not (has $webhook.tenant $tenantIds)) -}}
{{- fail (printf "%s: tenant %s is not in tenants" $setting $webhook.tenant) -}}
{{- end -}}
{{- if ne $webhook.platform "teams" -}}
{{- range $key := list "appId" "tenantIds" "certificates" "jwks" -}}
{{- if get $webhook $key -}}
{{- fail (printf "%s: %s is only for platform teams" $setting $key) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if and $webhook.certificates (not $webhook.appId) -}}
{{- fail (printf "%s: appId is required with certificates (Graph's validation tokens are issued for this app)" $setting) -}}
{{- end -}}
{{- if and $webhook.certificates (not $webhook.jwks) -}}
{{- fail (printf "%s: jwks is required with certificates (the keys that sign Graph's validation tokens)" $setting) -}}
{{- end -}}
{{- $certificateIds := list -}}
{{- range $index, $certificate := $webhook.certificates -}}
{{- $where := printf "%s.certificates[%d] (%s)" $setting $index $certificate.id -}}
{{- if has $certificate.id $certificateIds -}}
{{- fail (printf "%s: id is used by another certificate" $where) -}}
{{- end -}}
{{- $certificateIds = append $certificateIds $certificate.id -}}
{{- if $certificate.privateKey -}}
{{- if or $certificate.existingSecret $certificate.existingSecretKey -}}
{{- fail (printf "%s: set either existingSecret/existingSecretKey or privateKey, not both" $where) -}}
{{- end -}}
{{- else -}}
{{- if not $certificate.existingSecretKey -}}
{{- fail (printf "%s: needs its private key: existingSecretKey (a key of existingSecret, default the webhook's) or privateKey for evaluation" $where) -}}
{{- end -}}
{{- if not (or $certificate.existingSecret $webhook.existingSecret) -}}
{{- fail (printf "%s: existingSecretKey %s needs existingSecret (the certificate's or the webhook's)" $where $certificate.existingSecretKey) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $webhook.jwks -}}
{{- $sources := 0 -}}
{{- range $key := list "existingConfigmap" "existingSecret" "json" }}{{ if get $webhook.jwks $key }}{{ $sources = add1 $sources }}{{ end }}{{ end -}}
{{- if ne (int $sources) 1 -}}
{{- fail (printf "%s: jwks needs exactly one of existingConfigmap, existingSecret or json" $setting) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $webhook.existingSecret -}}
{{- if not $webhook.secretKeys -}}
{{- fail (printf "%s: secretKeys must name the keys of existingSecret %s that hold the secrets" $setting $webhook.existingSecret) -}}
{{- end -}}
{{- if $webhook.secrets -}}
{{- fail (printf "%s: set either existingSecret (with secretKeys) or secrets, not both" $setting) -}}
{{- end -}}
{{- else -}}
{{- if not $webhook.secrets -}}
{{- fail (printf "%s: needs its secrets: existingSecret with secretKeys (or secrets for evaluation)" $setting) -}}
{{- end -}}
{{- if $webhook.secretKeys -}}
{{- fail (printf "%s: secretKeys needs existingSecret" $setting) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.gateway.enabled -}}
{{- $shutdown := add (include "chatvault.durationMillis" (list $v.config.gateway "shutdown_delay" 2000)) (include "chatvault.durationMillis" (list $v.config.gateway "drain_timeout" 20000)) -}}
{{- include "chatvault.validateGrace" (list "gateway" $v.gateway $shutdown "config.gateway.shutdown_delay + drain_timeout") -}}
{{- end -}}
{{- if $v.restorer.enabled -}}
{{- $shutdown := include "chatvault.durationMillis" (list $v.config.restorer "drain_timeout" 20000) -}}
{{- include "chatvault.validateGrace" (list "restorer" $v.restorer $shutdown "config.restorer.drain_timeout") -}}
{{- end -}}
{{- if $v.archiver.enabled -}}
{{- $shutdown := add (include "chatvault.durationMillis" (list $v.config.archiver "shutdown_timeout" 30000)) (include "chatvault.durationMillis" (list $v.config.archiver "session_timeout" 10000)) -}}
{{- include "chatvault.validateGrace" (list "archiver" $v.archiver $shutdown "config.archiver.shutdown_timeout + session_timeout") -}}
{{- end -}}
{{- $partitions := int64 $v.archiver.topicPartitions -}}
{{- if and $v.archiver.enabled (gt $partitions 0) -}}
{{- if gt (int64 $v.archiver.replicaCount) $partitions -}}
{{- fail (printf "archiver.replicaCount (%d) exceeds archiver.topicPartitions (%d): the extra archivers would own no partition" (int64 $v.archiver.replicaCount) $partitions) -}}
{{- end -}}
{{- if and $v.archiver.autoscaling.enabled (gt (int64 $v.archiver.autoscaling.maxReplicas) $partitions) -}}
{{- fail (printf "archiver.autoscaling.maxReplicas (%d) exceeds archiver.topicPartitions (%d)" (int64 $v.archiver.autoscaling.maxReplicas) $partitions) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
