{{/* Names and labels. */}}
{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "flywheel.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "flywheel.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Call with (dict "root" $ "component" "server"); component may be empty for shared objects. */}}
{{- define "flywheel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flywheel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "flywheel.image" -}}
{{- printf "%s:%s%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) .Values.image.tagSuffix }}
{{- end }}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flywheel.secretName" -}}
{{- default (printf "%s-secrets" (include "flywheel.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/* Where the registry is: config.registry_dir, under config.state_dir unless absolute. */}}
{{- define "flywheel.registryDir" -}}
{{- $registryDir := dig "registry_dir" "registry" .Values.config }}
{{- if hasPrefix "/" $registryDir }}{{ $registryDir }}{{ else }}{{ printf "%s/%s" .Values.config.state_dir $registryDir }}{{ end }}
{{- end }}

{{- define "flywheel.claimName" -}}
{{- default (printf "%s-registry" (include "flywheel.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "flywheel.grpcPort" -}}
{{- dig "server" "port" 50051 .Values.config | int }}
{{- end }}

{{/* The metrics port of a process, from config (default: 9400 server, 9401 trainer, 9402 gate). */}}
{{- define "flywheel.metricsPort" -}}
{{- $defaults := dict "server" 9400 "trainer" 9401 "gate" 9402 }}
{{- dig .component "metrics_port" (get $defaults .component) .root.Values.config | int }}
{{- end }}

{{/* The Service Prometheus scrapes for one process; call with (dict "root" $ "component" NAME). */}}
{{- define "flywheel.metricsService" }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "flywheel.fullname" .root }}-{{ .component }}-metrics
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
    flywheel/metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "flywheel.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ include "flywheel.metricsPort" . }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{/*
The config as TOML. Helm reads values as JSON numbers, so `toToml` would write every integer as
a float (3.0, 1.073741824e+09); this writes whole numbers as integers. Nulls are left out.
Call with (dict "table" MAP "prefix" "").
*/}}
{{- define "flywheel.toml" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{ include "flywheel.tomlKey" $key }} = {{ include "flywheel.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key, $value := .table }}
{{- if kindIs "map" $value }}
{{- $name := printf "%s%s" $prefix (include "flywheel.tomlKey" $key) }}

[{{ $name }}]
{{- include "flywheel.toml" (dict "table" $value "prefix" (printf "%s." $name)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "flywheel.tomlValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}
{{- else if kindIs "slice" . }}[{{ range $i, $item := . }}{{ if $i }}, {{ end }}{{ include "flywheel.tomlValue" $item }}{{ end }}]
{{- else if kindIs "map" . }}{ {{- $first := true }}{{ range $key, $value := . }}{{ if not (kindIs "invalid" $value) }}{{ if not $first }},{{ end }}{{ $first = false }} {{ include "flywheel.tomlKey" $key }} = {{ include "flywheel.tomlValue" $value }}{{ end }}{{ end }} }
{{- else }}{{ toJson . }}
{{- end }}
{{- end }}

{{/* Pod-level pieces every workload shares. */}}
{{- define "flywheel.podCommon" -}}
serviceAccountName: {{ include "flywheel.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Environment every process gets: scratch space under /tmp, Kafka's password and TLS files. */}}
{{- define "flywheel.env" -}}
{{- $kafka := .Values.kafkaAuth }}
{{- $passwordSecret := $kafka.saslPasswordSecret -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: FLYWHEEL_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- if $passwordSecret.name }}
      name: {{ $passwordSecret.name }}
      key: {{ $passwordSecret.key }}
      {{- else }}
      name: {{ include "flywheel.secretName" . }}
      key: kafka-sasl-password
      {{- end }}
      {{- /* Where SASL is on, a missing password stops the pod before the process starts. */}}
      optional: {{ not (include "flywheel.kafkaSasl" .) }}
{{- if $kafka.caSecret.name }}
- name: FLYWHEEL_KAFKA__SSL_CAFILE
  value: {{ include "flywheel.kafkaTlsDir" . }}/ca.crt
{{- end }}
{{- if $kafka.clientCertSecret.name }}
- name: FLYWHEEL_KAFKA__SSL_CERTFILE
  value: {{ include "flywheel.kafkaTlsDir" . }}/client.crt
- name: FLYWHEEL_KAFKA__SSL_KEYFILE
  value: {{ include "flywheel.kafkaTlsDir" . }}/client.key
{{- end }}
{{- end }}

{{/* "true" when config.kafka.security_protocol is SASL_PLAINTEXT or SASL_SSL, else "". */}}
{{- define "flywheel.kafkaSasl" -}}
{{- if hasPrefix "SASL_" (dig "kafka" "security_protocol" "PLAINTEXT" .Values.config) }}true{{ end }}
{{- end }}

{{- define "flywheel.kafkaTlsDir" -}}
/etc/flywheel-kafka-tls
{{- end }}

{{- define "flywheel.serverTlsDir" -}}
/etc/flywheel-tls
{{- end }}

{{/*
Values that render but could not run: stop the render with what to set instead. Kafka's settings
are checked here rather than in the schema because they span config and kafkaAuth.
*/}}
{{- define "flywheel.checks" -}}
{{- $kafkaConfig := .Values.config.kafka | default dict }}
{{- $protocol := $kafkaConfig.security_protocol | default "PLAINTEXT" }}
{{- if include "flywheel.kafkaSasl" . }}
{{- if not (and $kafkaConfig.sasl_mechanism $kafkaConfig.sasl_username) }}
{{- fail (printf "config.kafka.security_protocol %s needs config.kafka.sasl_mechanism and config.kafka.sasl_username" $protocol) }}
{{- end }}
{{- if not (or .Values.secrets.kafkaSaslPassword .Values.kafkaAuth.saslPasswordSecret.name .Values.secrets.existingSecret) }}
{{- fail (printf "config.kafka.security_protocol %s needs a SASL password: kafkaAuth.saslPasswordSecret.name (a Secret you manage), secrets.kafkaSaslPassword, or the key kafka-sasl-password in secrets.existingSecret" $protocol) }}
{{- end }}
{{- end }}
{{- if gt (int .Values.server.canaryReplicas) 0 }}
{{- if eq (int .Values.server.replicas) 0 }}
{{- fail "server.canaryReplicas needs server.replicas above 0: canary replicas serve a candidate beside live servers, not instead of them" }}
{{- end }}
{{- if ne (dig "policy" "adapter" "" .Values.config) "none" }}
{{- fail "server.canaryReplicas is for whole weights: set config.policy.adapter to none (a model directory may choose adapters in its flywheel.toml, as the demo model does); with adapters every server answers the canary's share of users beside live: set config.gate.canary.share instead" }}
{{- end }}
{{- end }}
{{- if and (or .Values.kafkaAuth.caSecret.name .Values.kafkaAuth.clientCertSecret.name) (not (hasSuffix "SSL" $protocol)) }}
{{- fail (printf "kafkaAuth.caSecret and kafkaAuth.clientCertSecret are for TLS: set config.kafka.security_protocol to SSL or SASL_SSL (it is %s)" $protocol) }}
{{- end }}
{{- end }}

{{/* The TCP ports of config.kafka.bootstrap_servers ("host:port,host:port"), one per line. */}}
{{- define "flywheel.kafkaBootstrapPorts" -}}
{{- $ports := list }}
{{- range splitList "," (dig "kafka" "bootstrap_servers" "" .Values.config) }}
{{- $port := regexFind "[0-9]+$" (trim .) }}
{{- if $port }}{{ $ports = append $ports $port }}{{ end }}
{{- end }}
{{- $ports | uniq | join "\n" }}
{{- end }}

{{/* Volumes every pod has (with their mounts below): config, /tmp, /dev/shm, the registry, and Kafka's TLS files when given. */}}
{{- define "flywheel.volumes" -}}
- name: config
  configMap:
    name: {{ include "flywheel.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit }}
- name: registry
  persistentVolumeClaim:
    claimName: {{ include "flywheel.claimName" . }}
{{- with .Values.kafkaAuth }}
{{- if or .caSecret.name .clientCertSecret.name }}
# Kafka's CA and client certificate, from their Secrets, under fixed names (see flywheel.env).
- name: kafka-tls
  projected:
    defaultMode: 0440
    sources:
      {{- with .caSecret.name }}
      - secret:
          name: {{ . }}
          items:
            - {key: {{ $.Values.kafkaAuth.caSecret.key }}, path: ca.crt}
      {{- end }}
      {{- with .clientCertSecret }}
      {{- if .name }}
      - secret:
          name: {{ .name }}
          items:
            - {key: {{ .certKey }}, path: client.crt}
            - {key: {{ .keyKey }}, path: client.key}
      {{- end }}
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "readOnly" BOOL): the registry is read-only on the servers. */}}
{{- define "flywheel.volumeMounts" -}}
- name: config
  mountPath: /etc/flywheel
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
- name: registry
  mountPath: {{ .root.Values.config.state_dir }}
  readOnly: {{ .readOnly }}
{{- if or .root.Values.kafkaAuth.caSecret.name .root.Values.kafkaAuth.clientCertSecret.name }}
- name: kafka-tls
  mountPath: {{ include "flywheel.kafkaTlsDir" .root }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "flywheel.resources" -}}
{{- $resources := deepCopy (.values.resources | default dict) }}
{{- if gt (int .values.gpus) 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int .values.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Checksums so pods restart when their config or secrets change. The secrets' is of the values, not
of the rendered Secret: a feedback-token key generated where `lookup` sees no cluster (helm
template, Argo CD) differs on every render, and must not restart every pod each time.
*/}}
{{- define "flywheel.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secrets: {{ toJson .Values.secrets | sha256sum }}
{{- end }}
{{- end }}

{{/*
The trainer and the gate: one replica each, the shared volume read-write at the state dir (their
spools are under it, the trainer's join store and checkpoints too; the gate reads the registry alone,
each candidate's reward model included, never the trainer's checkpoints). Call with
(dict "root" $ "component" "trainer" "command" "train" ["env" LIST]): env, variables the chart sets for it.
*/}}
{{- define "flywheel.worker" -}}
{{- $root := .root }}
{{- $values := get $root.Values .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "flywheel.fullname" $root }}-{{ .component }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  replicas: 1
  # Never two at once: they would share the consumer group and the spool.
  strategy:
    type: Recreate
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
  template:
    {{- include "flywheel.workerPod" (dict "root" $root "component" .component "command" .command "container" .component "torchrun" (list "--standalone") "env" .env) | nindent 4 }}
{{- include "flywheel.metricsService" . }}
{{- end }}

{{/*
The pod of a worker process (trainer, gate). With `<component>.nprocPerNode` above 1 the process is
started by torchrun, one rank per process; `torchrun` holds its launch flags (--standalone in one
pod; none in a PyTorchJob, whose operator sets PET_* for torchrun). `labels`: false leaves out the
selector labels (a PyTorchJob's other pods, which must not receive the metrics Service's traffic).
Call with (dict "root" $ "component" NAME "command" SUBCOMMAND "container" NAME "torchrun" LIST ["labels" BOOL] ["env" LIST]).
*/}}
{{- define "flywheel.workerPod" -}}
{{- $root := .root }}
{{- $values := get $root.Values .component }}
{{- $nproc := int ($values.nprocPerNode | default 1) }}
metadata:
  labels:
    {{- if and (hasKey . "labels") (not .labels) }}
    {{- include "flywheel.labels" (dict "root" $root "component" "") | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}-worker
    {{- else }}
    {{- include "flywheel.labels" . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "flywheel.checksums" $root | nindent 4 }}
    {{- with $values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- include "flywheel.podCommon" $root | nindent 2 }}
  containers:
    - name: {{ .container }}
      image: {{ include "flywheel.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if or (gt $nproc 1) (ne .container .component) }}
      # One process per rank: rank 0 reads Kafka, checkpoints and serves /metrics; the others follow it.
      command: [torchrun]
      args: [{{ range .torchrun }}{{ . }}, {{ end }}--nproc_per_node, {{ $nproc | quote }}, --no-python, flywheel, {{ .command }}, --config, /etc/flywheel/config.toml]
      {{- else }}
      command: [flywheel]
      args: [{{ .command }}, --config, /etc/flywheel/config.toml]
      {{- end }}
      workingDir: /tmp
      ports:
        - name: metrics
          containerPort: {{ include "flywheel.metricsPort" . }}
          protocol: TCP
      env:
        {{- include "flywheel.env" $root | nindent 8 }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- include "flywheel.resources" (dict "values" $values) | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        {{- include "flywheel.volumeMounts" (dict "root" $root "readOnly" false) | nindent 8 }}
        {{- with $values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "flywheel.volumes" $root | nindent 4 }}
    {{- with $values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A server probe: gRPC health, or with TLS a TCP connect. Call with (dict "tls" BOOL "port" PORT "service" NAME). */}}
{{- define "flywheel.serverProbe" -}}
{{- if .tls -}}
tcpSocket:
  port: {{ .port }}
{{- else -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}

{{/* The share of the servers that are canary replicas, as the gate records a whole-weight canary's share. */}}
{{- define "flywheel.canaryReplicaShare" -}}
{{- $canary := int .Values.server.canaryReplicas }}
{{- divf $canary (add .Values.server.replicas $canary) | printf "%g" }}
{{- end }}
