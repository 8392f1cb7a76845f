{{/*
One Deployment of servers; call with (dict "root" $ "role" "live") or "canary". Canary replicas serve
the registry's canary while one runs (config.server.canary_replica) and are server.canaryReplicas of
the servers behind the one Service. The live Deployment's selector is the one it always had (a
selector cannot change), so it also matches the canary pods; each Deployment only manages the
ReplicaSets it owns, and the canary's selector adds its role.
*/}}
{{- define "flywheel.serverDeployment" }}
{{- $role := .role }}
{{- $canary := eq $role "canary" }}
{{- with .root }}
{{- $server := .Values.server }}
{{- $grpcPort := include "flywheel.grpcPort" . }}
{{- $httpPort := dig "server" "http_port" 0 .Values.config | int }}
{{- $grace := dig "server" "grace_period_seconds" 30 .Values.config }}
{{- $terminationGrace := add $server.preStopSleepSeconds (ceil $grace) $server.shutdownMarginSeconds }}
{{- $tls := .Values.tls }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "flywheel.fullname" . }}-server{{ if $canary }}-canary{{ end }}
  labels:
    {{- include "flywheel.labels" (dict "root" . "component" "server") | nindent 4 }}
    flywheel/role: {{ $role }}
spec:
  replicas: {{ ternary $server.canaryReplicas $server.replicas $canary }}
  strategy:
    {{- toYaml $server.strategy | nindent 4 }}
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" (dict "root" . "component" "server") | nindent 6 }}
      {{- if $canary }}
      flywheel/role: canary
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "flywheel.labels" (dict "root" . "component" "server") | nindent 8 }}
        flywheel/role: {{ $role }}
      annotations:
        {{- include "flywheel.checksums" . | nindent 8 }}
        {{- with $server.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "flywheel.podCommon" . | nindent 6 }}
      # The kubelet's clock runs from the preStop hook: sleep, then SIGTERM, then up to the
      # server's grace period for in-flight requests, then the engine's shutdown.
      terminationGracePeriodSeconds: {{ $terminationGrace }}
      {{- if $server.registryReadOnly }}
      # A read-only server cannot seed an empty registry: wait until the trainer or the gate has.
      initContainers:
        - name: wait-for-live-policy
          image: {{ include "flywheel.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            - sh
            - -c
            - until [ -f "$0/live.json" ]; do echo "waiting for a live policy in $0"; sleep 5; done
            - {{ include "flywheel.registryDir" . }}
          resources:
            requests: {cpu: 10m, memory: 16Mi}
            limits: {memory: 64Mi}
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: registry
              mountPath: {{ .Values.config.state_dir }}
              readOnly: true
      {{- end }}
      containers:
        - name: server
          image: {{ include "flywheel.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: [flywheel]
          args: [serve, --config, /etc/flywheel/config.toml]
          workingDir: /tmp
          ports:
            - name: grpc
              containerPort: {{ $grpcPort }}
              protocol: TCP
            {{- if $httpPort }}
            - name: http
              containerPort: {{ $httpPort }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ include "flywheel.metricsPort" (dict "root" . "component" "server") }}
              protocol: TCP
          env:
            {{- include "flywheel.env" . | nindent 12 }}
            # Each replica its own spool (the server adds /server), off the shared volume.
            - name: FLYWHEEL_SPOOL__DIRECTORY
              value: /var/spool/flywheel
            {{- if $canary }}
            - name: FLYWHEEL_SERVER__CANARY_REPLICA
              value: "true"
            {{- end }}
            - name: FLYWHEEL_SERVER__SERVER_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: FLYWHEEL_SERVER__FEEDBACK_TOKEN_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ include "flywheel.secretName" . }}
                  key: feedback-token-secret
            - name: FLYWHEEL_SERVER__API_KEYS
              valueFrom:
                secretKeyRef:
                  name: {{ include "flywheel.secretName" . }}
                  key: api-keys
                  optional: true
            {{- if $tls.enabled }}
            - name: FLYWHEEL_SERVER__TLS_CERT_FILE
              value: {{ include "flywheel.serverTlsDir" . }}/tls.crt
            - name: FLYWHEEL_SERVER__TLS_KEY_FILE
              value: {{ include "flywheel.serverTlsDir" . }}/tls.key
            {{- if $tls.clientCASecretName }}
            - name: FLYWHEEL_SERVER__TLS_CLIENT_CA_FILE
              value: {{ include "flywheel.serverTlsDir" . }}/client-ca.crt
            {{- end }}
            {{- end }}
            {{- with $server.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          # The server only listens once the model is loaded, and health turns NOT_SERVING when
          # it starts draining: readiness watches the Flywheel service, liveness the process.
          # The kubelet's gRPC probes speak no TLS: with TLS on, they only see the port accept.
          startupProbe:
            {{- include "flywheel.serverProbe" (dict "tls" $tls.enabled "port" $grpcPort "service" "") | nindent 12 }}
            periodSeconds: {{ $server.startupProbe.periodSeconds }}
            failureThreshold: {{ $server.startupProbe.failureThreshold }}
          readinessProbe:
            {{- include "flywheel.serverProbe" (dict "tls" $tls.enabled "port" $grpcPort "service" "flywheel.v1.Flywheel") | nindent 12 }}
            periodSeconds: {{ $server.readinessProbe.periodSeconds }}
            failureThreshold: {{ $server.readinessProbe.failureThreshold }}
          livenessProbe:
            {{- include "flywheel.serverProbe" (dict "tls" $tls.enabled "port" $grpcPort "service" "") | nindent 12 }}
            periodSeconds: {{ $server.livenessProbe.periodSeconds }}
            failureThreshold: {{ $server.livenessProbe.failureThreshold }}
          lifecycle:
            preStop:
              exec:
                command: [sleep, {{ $server.preStopSleepSeconds | quote }}]
          resources:
            {{- include "flywheel.resources" (dict "values" $server) | nindent 12 }}
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "flywheel.volumeMounts" (dict "root" . "readOnly" $server.registryReadOnly) | nindent 12 }}
            - name: spool
              mountPath: /var/spool/flywheel
            {{- if $tls.enabled }}
            - name: tls
              mountPath: {{ include "flywheel.serverTlsDir" . }}
              readOnly: true
            {{- end }}
            {{- with $server.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "flywheel.volumes" . | nindent 8 }}
        - name: spool
          emptyDir:
            sizeLimit: {{ $server.spoolSizeLimit }}
        {{- if $tls.enabled }}
        - name: tls
          projected:
            defaultMode: 0440
            sources:
              - secret:
                  name: {{ $tls.secretName }}
                  items:
                    - {key: tls.crt, path: tls.crt}
                    - {key: tls.key, path: tls.key}
              {{- with $tls.clientCASecretName }}
              - secret:
                  name: {{ . }}
                  items:
                    - {key: ca.crt, path: client-ca.crt}
              {{- end }}
        {{- end }}
        {{- with $server.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $server.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $server.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $server.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $server.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}
