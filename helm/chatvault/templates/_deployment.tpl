{{/*
One role's Deployment (mode distributed): (list $ "gateway" | "archiver" | "restorer").
gateway: Kafka (SASL, TLS), tokens, webhook secrets.   archiver: Kafka (SASL, TLS), storage credentials, keyring.
restorer: storage credentials, keyring, tokens.   Each pod gets only the secrets its role uses.
*/}}
{{- define "chatvault.roleDeployment" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
{{- $v := index $.Values $role -}}
{{- $kafka := has $role (list "gateway" "archiver") -}}
{{- $storage := has $role (list "archiver" "restorer") -}}
{{- $tokens := and (has $role (list "gateway" "restorer")) (include "chatvault.hasTokens" $) -}}
{{- $grpc := has $role (list "gateway" "restorer") -}}
{{- $http := eq $role "gateway" -}}
{{- $probeService := dict "gateway" "chatvault.v1.IngestService" "restorer" "chatvault.v1.RestoreService" -}}
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
          {{- if or $grpc $.Values.metrics.enabled }}
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
            {{- if $.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $.Values.metrics.port }}
              protocol: TCP
            {{- end }}
          {{- end }}
          {{- if $grpc }}
          {{- /* Native gRPC probes (grpc.health.v1): readiness and start-up ask for the role's service, which turns
                 NOT_SERVING as soon as shutdown begins; liveness asks for the server ("") on the restorer and is
                 an HTTP GET /healthz on the gateway's webhook port, so that both of its listeners are watched. */}}
          {{- with $v.startupProbe }}{{ if .enabled }}
          startupProbe:
            grpc:
              port: {{ $v.containerPorts.grpc }}
              service: {{ get $probeService $role }}
            {{- toYaml (omit . "enabled") | nindent 12 }}
          {{- end }}{{ end }}
          {{- with $v.livenessProbe }}{{ if .enabled }}
          livenessProbe:
            {{- if $http }}
            httpGet:
              path: /healthz
              port: http
            {{- else }}
            grpc:
              port: {{ $v.containerPorts.grpc }}
              service: ""
            {{- end }}
            {{- toYaml (omit . "enabled") | nindent 12 }}
          {{- end }}{{ end }}
          {{- with $v.readinessProbe }}{{ if .enabled }}
          readinessProbe:
            grpc:
              port: {{ $v.containerPorts.grpc }}
              service: {{ get $probeService $role }}
            {{- toYaml (omit . "enabled") | nindent 12 }}
          {{- end }}{{ end }}
          {{- end }}
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
            {{- if $storage }}
            - name: keyring
              mountPath: /etc/chatvault/keyring
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
        {{- if $storage }}
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
        - name: webhook-{{ $index }}
          secret:
            secretName: {{ default (include "chatvault.webhooksSecretName" $) $webhook.existingSecret }}
            defaultMode: 0440
            items:
              {{- range $item := include "chatvault.webhookSecretItems" (list $ $webhook) | fromJsonArray }}
              - key: {{ $item.key | quote }}
                path: {{ $item.path | quote }}
              {{- end }}
        {{- end }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}
