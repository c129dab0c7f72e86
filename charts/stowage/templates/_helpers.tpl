{{/*
Names, labels and the pieces both components share.
*/}}

{{- define "stowage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
`<release>-<chart>` unless the release name already contains the chart name; leaves room
for the `-operator` / `-worker` suffixes within 63 characters.
*/}}
{{- define "stowage.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stowage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stowage.operator.fullname" -}}
{{- printf "%s-operator" (include "stowage.fullname" .) }}
{{- end }}

{{- define "stowage.worker.fullname" -}}
{{- printf "%s-worker" (include "stowage.fullname" .) }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "stowage.labels" -}}
helm.sh/chart: {{ include "stowage.chart" . }}
app.kubernetes.io/name: {{ include "stowage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stowage
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "worker"). */}}
{{- define "stowage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stowage.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's resources: (dict "ctx" $ "component" "worker"). */}}
{{- define "stowage.componentLabels" -}}
{{ include "stowage.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "stowage.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "stowage.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stowage.worker.serviceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (include "stowage.worker.fullname" .) .Values.worker.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "image" .Values.worker.image). A digest wins over the tag. */}}
{{- define "stowage.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Does the worker call the Kubernetes API (and so need its token)? "true" or "". */}}
{{- define "stowage.worker.usesApi" -}}
{{- if or (eq .Values.auth.mode "kubernetes") (gt (len .Values.tenantNamespaces) 0) }}true{{ end }}
{{- end }}

{{/* The stream the workers consume, from the queue prefix (as the binaries name it). */}}
{{- define "stowage.tasksStream" -}}
{{- printf "%s_TASKS" (.Values.queuePrefix | upper | replace "-" "_") }}
{{- end }}

{{/* Per-replica backlog target of the autoscaler: the value, or the worker's capacity. */}}
{{- define "stowage.autoscaling.target" -}}
{{- if gt (int .Values.autoscaling.targetPerReplica) 0 }}
{{- .Values.autoscaling.targetPerReplica }}
{{- else }}
{{- .Values.worker.capacity }}
{{- end }}
{{- end }}

{{/*
The NATS user file (a `.creds` file or an NKey seed; the binaries take one or the other) as
(dict "secret" … "key" …), or an empty dict. "stowage.validate" refuses both.
*/}}
{{- define "stowage.natsUserFile" -}}
{{- $n := .Values.nats }}
{{- if $n.credentials.existingSecret }}
{{- dict "secret" $n.credentials.existingSecret "key" $n.credentials.secretKey | toYaml }}
{{- else if $n.nkey.existingSecret }}
{{- dict "secret" $n.nkey.existingSecret "key" $n.nkey.secretKey | toYaml }}
{{- else }}
{{- dict | toYaml }}
{{- end }}
{{- end }}

{{/*
Environment both binaries share: connections (only ever from Secrets, their TLS files
mounted), queue prefix, logs, metrics address, the endpoint policy.
*/}}
{{- define "stowage.commonEnv" -}}
- name: STOWAGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.database.existingSecret }}
      key: {{ .ctx.Values.database.secretKey }}
- name: STOWAGE_DATABASE_POOL_SIZE
  value: {{ .component.databasePoolSize | quote }}
- name: STOWAGE_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.nats.existingSecret }}
      key: {{ .ctx.Values.nats.secretKey }}
{{- if .ctx.Values.nats.credentials.existingSecret }}
- name: STOWAGE_NATS_CREDS_FILE
  value: /var/run/secrets/stowage-nats/{{ .ctx.Values.nats.credentials.secretKey }}
{{- end }}
{{- if .ctx.Values.nats.nkey.existingSecret }}
- name: STOWAGE_NATS_NKEY_FILE
  value: /var/run/secrets/stowage-nats/{{ .ctx.Values.nats.nkey.secretKey }}
{{- end }}
{{- if .ctx.Values.nats.tls.ca.existingSecret }}
- name: STOWAGE_NATS_TLS_CA_FILE
  value: /etc/stowage/nats-tls/ca.crt
{{- end }}
{{- if .ctx.Values.nats.tls.clientCertificate.existingSecret }}
- name: STOWAGE_NATS_TLS_CERT
  value: /etc/stowage/nats-tls/tls.crt
- name: STOWAGE_NATS_TLS_KEY
  value: /etc/stowage/nats-tls/tls.key
{{- end }}
- name: STOWAGE_QUEUE_PREFIX
  value: {{ .ctx.Values.queuePrefix | quote }}
- name: STOWAGE_LOG_FORMAT
  value: {{ .ctx.Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .ctx.Values.logLevel | quote }}
- name: STOWAGE_METRICS_ADDR
  value: {{ printf "%s:%d" .ctx.Values.listenHost (int .component.metricsPort) | quote }}
- name: STOWAGE_LOCK_HEARTBEAT
  value: {{ .component.lockHeartbeat | quote }}
{{- with .ctx.Values.s3.defaultCredentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.ctx.Values.s3.defaultCredentials.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.ctx.Values.s3.defaultCredentials.secretAccessKeyKey }}
{{- end }}
{{- if .ctx.Values.s3.credentialsSecrets }}
- name: STOWAGE_CREDENTIALS_DIR
  value: /var/run/secrets/stowage
{{- end }}
- name: STOWAGE_ALLOW_WORKER_CREDENTIALS
  value: {{ .ctx.Values.s3.allowWorkerCredentials | quote }}
- name: STOWAGE_ALLOW_PRIVATE_NETWORKS
  value: {{ .ctx.Values.allowPrivateNetworks | quote }}
{{- if or .ctx.Values.s3.caBundle.existingSecret .ctx.Values.s3.caBundle.existingConfigMap }}
- name: STOWAGE_S3_CA_FILE
  value: /etc/stowage/s3-ca/ca.crt
{{- end }}
{{- end }}

{{/*
Volumes both components share: /tmp, the NATS credentials or NKey, the TLS files of NATS and
PostgreSQL, the S3 CA bundle, the S3 credentials Secrets. Only the keys the binaries read are
projected (never subPath mounts: the kubelet updates these in place when a Secret changes).
*/}}
{{- define "stowage.commonVolumes" -}}
{{- $v := .ctx.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .component.tmpSizeLimit }}
{{- with include "stowage.natsUserFile" .ctx | fromYaml }}
- name: nats-credentials
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- if or $v.nats.tls.ca.existingSecret $v.nats.tls.clientCertificate.existingSecret }}
- name: nats-tls
  projected:
    defaultMode: 0440
    sources:
      {{- with $v.nats.tls.ca.existingSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $v.nats.tls.ca.secretKey }}
              path: ca.crt
      {{- end }}
      {{- with $v.nats.tls.clientCertificate.existingSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $v.nats.tls.clientCertificate.certKey }}
              path: tls.crt
            - key: {{ $v.nats.tls.clientCertificate.keyKey }}
              path: tls.key
      {{- end }}
{{- end }}
{{- with $v.database.tls.existingSecret }}
- name: postgres-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- if $v.s3.caBundle.existingSecret }}
- name: s3-ca
  secret:
    secretName: {{ $v.s3.caBundle.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.s3.caBundle.key }}
        path: ca.crt
{{- else if $v.s3.caBundle.existingConfigMap }}
- name: s3-ca
  configMap:
    name: {{ $v.s3.caBundle.existingConfigMap }}
    defaultMode: 0440
    items:
      - key: {{ $v.s3.caBundle.key }}
        path: ca.crt
{{- end }}
{{- range .ctx.Values.s3.credentialsSecrets }}
- name: s3-{{ . | trunc 50 | trimSuffix "-" }}
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with .component.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stowage.commonVolumeMounts" -}}
{{- $v := .ctx.Values -}}
- name: tmp
  mountPath: /tmp
{{- if or $v.nats.credentials.existingSecret $v.nats.nkey.existingSecret }}
- name: nats-credentials
  mountPath: /var/run/secrets/stowage-nats
  readOnly: true
{{- end }}
{{- if or $v.nats.tls.ca.existingSecret $v.nats.tls.clientCertificate.existingSecret }}
- name: nats-tls
  mountPath: /etc/stowage/nats-tls
  readOnly: true
{{- end }}
{{- if $v.database.tls.existingSecret }}
- name: postgres-tls
  mountPath: /etc/stowage/postgres-tls
  readOnly: true
{{- end }}
{{- if or $v.s3.caBundle.existingSecret $v.s3.caBundle.existingConfigMap }}
- name: s3-ca
  mountPath: /etc/stowage/s3-ca
  readOnly: true
{{- end }}
{{- range .ctx.Values.s3.credentialsSecrets }}
- name: s3-{{ . | trunc 50 | trimSuffix "-" }}
  mountPath: /var/run/secrets/stowage/{{ $.ctx.Release.Namespace }}/{{ . }}
  readOnly: true
{{- end }}
{{- with .component.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Topology spread constraints; one without a labelSelector selects the component's pods.
(dict "ctx" $ "component" "worker" "constraints" .Values.worker.topologySpreadConstraints)
*/}}
{{- define "stowage.topologySpread" -}}
{{- $selector := include "stowage.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml }}
{{- $out := list }}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The operator's RBAC rules on its own resources (ClusterRole or per-namespace Role). */}}
{{- define "stowage.operator.resourceRules" -}}
- apiGroups: ["stowage.dev"]
  resources: ["uploadjobs"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: ["stowage.dev"]
  resources: ["indexcollections"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["stowage.dev"]
  resources: ["uploadjobs/status", "indexcollections/status"]
  verbs: ["patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Checks across values that a JSON schema cannot express well. */}}
{{- define "stowage.validate" -}}
{{- if and (eq .Values.autoscaling.mode "keda") (not .Values.autoscaling.keda.monitoringEndpoint) }}
{{- fail "autoscaling.mode=keda needs autoscaling.keda.monitoringEndpoint (the NATS monitoring host:port KEDA reads)" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "enable either metrics.serviceMonitor or metrics.podMonitor, not both (every target would be scraped twice)" }}
{{- end }}
{{- if and .Values.nats.credentials.existingSecret .Values.nats.nkey.existingSecret }}
{{- fail "set either nats.credentials.existingSecret (a .creds file) or nats.nkey.existingSecret (an NKey seed), not both: the binaries take one NATS user" }}
{{- end }}
{{- if and .Values.s3.caBundle.existingSecret .Values.s3.caBundle.existingConfigMap }}
{{- fail "set either s3.caBundle.existingSecret or s3.caBundle.existingConfigMap, not both" }}
{{- end }}
{{- if and .Values.worker.grpcTls.clientCa.existingSecret (not .Values.worker.grpcTls.existingSecret) }}
{{- fail "worker.grpcTls.clientCa verifies client certificates of a TLS server: it needs worker.grpcTls.existingSecret (the server's certificate)" }}
{{- end }}
{{- if and .Values.tests.enabled .Values.worker.grpcTls.clientCa.existingSecret (not .Values.tests.grpcTls.clientCertificate.existingSecret) }}
{{- fail "worker.grpcTls.clientCa requires a client certificate of every gRPC client, the helm test's too: set tests.grpcTls.clientCertificate.existingSecret (or tests.enabled=false)" }}
{{- end }}
{{- end }}

{{/*
Seconds of a duration in the binaries' format (`500ms`, `30s`, `10m`, `1h30m`, `2d`, or plain
seconds), for fields that take a number of seconds. values.schema.json checks the format.
*/}}
{{- define "stowage.durationSeconds" -}}
{{- $s := toString . }}
{{- $total := 0 }}
{{- if regexMatch "^[0-9]+$" $s }}
{{- $total = int $s }}
{{- else }}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d)" $s -1 }}
{{- $n := int (regexFind "^[0-9]+" .) }}
{{- $unit := regexReplaceAll "^[0-9]+" . "" }}
{{- if eq $unit "ms" }}{{ $total = add $total (div $n 1000) }}
{{- else if eq $unit "s" }}{{ $total = add $total $n }}
{{- else if eq $unit "m" }}{{ $total = add $total (mul $n 60) }}
{{- else if eq $unit "h" }}{{ $total = add $total (mul $n 3600) }}
{{- else if eq $unit "d" }}{{ $total = add $total (mul $n 86400) }}
{{- end }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
One NetworkPolicy egress rule to a destination of `networkPolicy`: its ports, and `to` its
CIDRs and peers — or, with neither, any address on those ports.
*/}}
{{- define "stowage.egressRule" -}}
- ports:
    {{- toYaml .ports | nindent 4 }}
  {{- if or .cidrs .peers }}
  to:
    {{- range .cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- with .peers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end }}
