{{/*
One role's Deployment (mode distributed): (list $ "gateway" | "archiver" | "restorer").
gateway: Kafka (SASL, TLS), tokens, webhook secrets.   archiver: Kafka (SASL, TLS), storage credentials, keyring,
checkpoint signing key.
restorer: storage credentials, keyring, tokens (and the checkpoint signing key when disposition is enabled: it signs
disposition reports).   Each pod gets only the secrets its role uses.
*/}}
{{- define "chatvault.roleDeployment" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
{{- $v := index $.Values $role -}}
{{- /* The restorer produces its audit records to Kafka too. */ -}}
{{- $kafka := has $role (list "gateway" "archiver" "restorer") -}}
{{- $storage := has $role (list "archiver" "restorer") -}}
{{- $tokens := and (has $role (list "gateway" "restorer")) (include "chatvault.hasTokens" $) -}}
{{- $grpc := has $role (list "gateway" "restorer") -}}
{{- $http := eq $role "gateway" -}}
{{- /* Probes. gateway, restorer: native gRPC probes (grpc.health.v1); readiness and start-up ask for the role's
       service, which turns NOT_SERVING as soon as shutdown begins; liveness asks for the server ("") on the
       restorer and is an HTTP GET /healthz on the gateway's webhook port, so that both of its listeners are
       watched. archiver: HTTP on the metrics port, GET /healthz (liveness, start-up) and GET /readyz. */ -}}
{{- $probes := dict -}}
{{- if $grpc -}}
{{- $service := get (dict "gateway" "chatvault.v1.IngestService" "restorer" "chatvault.v1.RestoreService") $role -}}
{{- $roleCheck := dict "grpc" (dict "port" (int64 $v.containerPorts.grpc) "service" $service) -}}
{{- $liveness := dict "grpc" (dict "port" (int64 $v.containerPorts.grpc) "service" "") -}}
{{- if $http }}{{ $liveness = dict "httpGet" (dict "path" "/healthz" "port" "http") }}{{ end -}}
{{- $probes = dict "startup" $roleCheck "liveness" $liveness "readiness" $roleCheck -}}
{{- else -}}
{{- $healthz := dict "httpGet" (dict "path" "/healthz" "port" "metrics") -}}
{{- $probes = dict "startup" $healthz "liveness" $healthz "readiness" (dict "httpGet" (dict "path" "/readyz" "port" "metrics")) -}}
{{- end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "chatvault.componentName" (list $ $role) }}
  namespace: {{ include "chatvault.namespace" $ }}
  labels:
    {{- include "chatvault.componentLabels" (list $ $role) | nindent 4 }}
  {{- with include "chatvault.annotations" $ }}{{ . | nindent 2 }}{{ end }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "chatvault.componentSelectorLabels" (list $ $role) | nindent 6 }}
  {{- with $v.updateStrategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "chatvault.componentLabels" (list $ $role) | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
        checksum/secrets: {{ include (print $.Template.BasePath "/secrets.yaml") $ | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "chatvault.serviceAccountName" $ }}
      automountServiceAccountToken: {{ $.Values.serviceAccount.automountServiceAccountToken }}
      {{- with include "chatvault.imagePullSecrets" $ }}{{ . | nindent 6 }}{{ end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $v.affinity }}
      affinity:
        {{- toYaml $v.affinity | nindent 8 }}
      {{- else }}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "chatvault.componentSelectorLabels" (list $ $role) | nindent 20 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "chatvault.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args: [{{ $role | quote }}]
          securityContext:
            {{- toYaml $.Values.containerSecurityContext | nindent 12 }}
          env:
            - name: CHATVAULT_CONFIG
              value: /etc/chatvault/config/chatvault.toml
            {{- include "chatvault.telemetryEnv" (list $ $role) | trim | nindent 12 }}
            {{- if $kafka }}
            {{- if or $.Values.kafkaSasl.existingSecret $.Values.kafkaSasl.password }}
            # librdkafka's sasl.password, through the config's environment override (no file form exists).
            - name: CHATVAULT__KAFKA__PROPERTIES__SASL.PASSWORD
              valueFrom:
                secretKeyRef:
                  {{- if $.Values.kafkaSasl.existingSecret }}
                  name: {{ $.Values.kafkaSasl.existingSecret }}
                  key: {{ $.Values.kafkaSasl.existingSecretPasswordKey }}
                  {{- else }}
                  name: {{ include "chatvault.credentialsSecretName" $ }}
                  key: kafka-sasl-password
                  {{- end }}
            {{- end }}
            {{- end }}
            {{- if and $storage (or $.Values.storageCredentials.existingSecret $.Values.storageCredentials.accessKeyId) }}
            {{- $secret := default (include "chatvault.credentialsSecretName" $) $.Values.storageCredentials.existingSecret }}
            - name: AWS_ACCESS_KEY_ID
              valueFrom:
                secretKeyRef:
                  name: {{ $secret }}
                  key: {{ ternary $.Values.storageCredentials.accessKeyIdKey "aws-access-key-id" (not (empty $.Values.storageCredentials.existingSecret)) }}
            - name: AWS_SECRET_ACCESS_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $secret }}
                  key: {{ ternary $.Values.storageCredentials.secretAccessKeyKey "aws-secret-access-key" (not (empty $.Values.storageCredentials.existingSecret)) }}
            {{- end }}
            {{- with $.Values.extraEnvVars }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnvVars }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if or $.Values.extraEnvVarsCM $.Values.extraEnvVarsSecret }}
          envFrom:
            {{- with $.Values.extraEnvVarsCM }}
            - configMapRef:
                name: {{ . }}
            {{- end }}
            {{- with $.Values.extraEnvVarsSecret }}
            - secretRef:
                name: {{ . }}
            {{- end }}
          {{- end }}
          ports:
            {{- if $grpc }}
            - name: grpc
              containerPort: {{ $v.containerPorts.grpc }}
              protocol: TCP
            {{- end }}
            {{- if $http }}
            - name: http
              containerPort: {{ $v.containerPorts.http }}
              protocol: TCP
            {{- end }}
            # GET /metrics, /healthz, /readyz ([telemetry] metrics_listen).
            - name: metrics
              containerPort: {{ $.Values.metrics.port }}
              protocol: TCP
          {{- with include "chatvault.probes" (list $v $probes) | trim }}{{ . | nindent 10 }}{{ end }}
          {{- if gt (int64 $v.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $v.preStopSleepSeconds }}
          {{- end }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: config
              mountPath: /etc/chatvault/config
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $tokens }}
            - name: tokens
              mountPath: /etc/chatvault/tokens
              readOnly: true
            {{- end }}
            {{- if and $storage (include "chatvault.hasKeyring" $) }}
            - name: keyring
              mountPath: /etc/chatvault/keyring
              readOnly: true
            {{- end }}
            {{- if and $storage $.Values.hsm.existingSecret }}
            - name: hsm-pin
              mountPath: /etc/chatvault/hsm
              readOnly: true
            {{- end }}
            {{- if and (or (eq $role "archiver") (and (eq $role "restorer") $.Values.disposition.enabled)) $.Values.checkpointSigningKey.existingSecret }}
            - name: checkpoint-signing-key
              mountPath: /etc/chatvault/checkpoint
              readOnly: true
            {{- end }}
            {{- if and $kafka $.Values.kafkaTls.existingSecret }}
            - name: kafka-tls
              mountPath: {{ $.Values.kafkaTls.mountPath }}
              readOnly: true
            {{- end }}
            {{- if $http }}
            {{- range $index, $webhook := $v.webhooks }}
            - name: webhook-{{ $index }}
              mountPath: /etc/chatvault/webhooks/{{ $webhook.name }}
              readOnly: true
            {{- end }}
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "chatvault.configMapName" $ }}
        - name: tmp
          emptyDir:
            {{- if eq $role "archiver" }}
            sizeLimit: {{ $v.tmpSizeLimit }}
            {{- else }}
            sizeLimit: 256Mi
            {{- end }}
        {{- if $tokens }}
        - name: tokens
          secret:
            secretName: {{ include "chatvault.tokensSecretName" $ }}
            defaultMode: 0440
        {{- end }}
        {{- if and $storage $.Values.hsm.existingSecret }}
        - name: hsm-pin
          secret:
            secretName: {{ $.Values.hsm.existingSecret }}
            defaultMode: 0440
            items:
              - key: {{ $.Values.hsm.existingSecretKey }}
                path: {{ $.Values.hsm.existingSecretKey }}
        {{- end }}
        {{- if and (or (eq $role "archiver") (and (eq $role "restorer") $.Values.disposition.enabled)) $.Values.checkpointSigningKey.existingSecret }}
        - name: checkpoint-signing-key
          secret:
            secretName: {{ $.Values.checkpointSigningKey.existingSecret }}
            defaultMode: 0440
            items:
              - key: {{ $.Values.checkpointSigningKey.existingSecretKey }}
                path: {{ $.Values.checkpointSigningKey.existingSecretKey }}
        {{- end }}
        {{- if and $storage (include "chatvault.hasKeyring" $) }}
        - name: keyring
          secret:
            secretName: {{ include "chatvault.keyringSecretName" $ }}
            defaultMode: 0440
            items:
              - key: {{ include "chatvault.keyringSecretKey" $ }}
                path: {{ include "chatvault.keyringSecretKey" $ }}
        {{- end }}
        {{- if and $kafka $.Values.kafkaTls.existingSecret }}
        - name: kafka-tls
          secret:
            secretName: {{ $.Values.kafkaTls.existingSecret }}
            defaultMode: 0440
        {{- end }}
        {{- if $http }}
        {{- range $index, $webhook := $v.webhooks }}
        # Webhook {{ $webhook.name }}: its secrets{{ if $webhook.certificates }}, certificate keys{{ end }}{{ if $webhook.jwks }}, JWKS{{ end }}, in one directory (projected volumes follow updates).
        - name: webhook-{{ $index }}
          projected:
            defaultMode: 0440
            sources:
              {{- toYaml (get (include "chatvault.webhookFiles" (list $ $webhook) | fromJson) "sources") | nindent 14 }}
        {{- end }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}
