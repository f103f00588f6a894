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
{{- define "chatvault.hasKeyring" -}}
{{- if or .Values.keyring.existingSecret .Values.keyring.json }}true{{ end -}}
{{- end -}}

{{/* A webhook's secret files, (list $ $webhook) -> JSON [{"key": <Secret key>, "path": <file name>}]: the keys of
its existingSecret under their own names, or its clear secrets (chart Secret keys "<name>.<i>") as secret-<i>.
The files are mounted under /etc/chatvault/webhooks/<name>/. */}}
{{- define "chatvault.webhookSecretItems" -}}
{{- $ := index . 0 -}}{{- $webhook := index . 1 -}}
{{- $items := list -}}
{{- if $webhook.existingSecret -}}
{{- range $key := $webhook.secretKeys -}}
{{- $items = append $items (dict "key" $key "path" $key) -}}
{{- end -}}
{{- else -}}
{{- range $index, $secret := $webhook.secrets -}}
{{- $items = append $items (dict "key" (printf "%s.%d" $webhook.name $index) "path" (printf "secret-%d" $index)) -}}
{{- end -}}
{{- end -}}
{{- toJson $items -}}
{{- end -}}

{{- define "chatvault.hasChartWebhookSecrets" -}}
{{- range $webhook := .Values.gateway.webhooks }}{{ if not $webhook.existingSecret }}true{{ end }}{{ end -}}
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

{{/* Drain time of the gateway in whole seconds (the binary's default when unset). */}}
{{- define "chatvault.gatewayDrainSeconds" -}}
{{- div (int64 (default 20000 .Values.config.gateway.drain_timeout_ms)) 1000 -}}
{{- end -}}

{{/* Settings checks that a schema cannot express; called from the ConfigMap and NOTES. */}}
{{- define "chatvault.validate" -}}
{{- if and (not (include "chatvault.distributed" .)) .Values.gateway.webhooks -}}
{{- fail "gateway.webhooks: webhook integrations need mode distributed (the standalone pod has no config for them)" -}}
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
{{- if and (or $v.archiver.enabled $v.restorer.enabled) (not (include "chatvault.hasKeyring" .)) -}}
{{- fail "keyring: archiver and restorer need the shared keyring: set keyring.existingSecret (or keyring.json for evaluation)" -}}
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
{{- $drain := int64 (include "chatvault.gatewayDrainSeconds" .) -}}
{{- if le (int64 $v.gateway.terminationGracePeriodSeconds) (add $drain (int64 $v.gateway.preStopSleepSeconds)) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + config.gateway.drain_timeout_ms (%ds)" (int64 $v.gateway.terminationGracePeriodSeconds) (int64 $v.gateway.preStopSleepSeconds) $drain) -}}
{{- end -}}
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
