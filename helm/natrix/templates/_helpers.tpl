{{/* Names and labels. */}}
{{- define "natrix.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "natrix.fullname" -}}
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

{{- define "natrix.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "natrix.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "relay"). */}}
{{- define "natrix.selector" -}}
app.kubernetes.io/name: {{ include "natrix.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "natrix.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "natrix.secretName" -}}
{{- default (printf "%s-secrets" (include "natrix.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Command-line flags from a values map: null values are left out, lists
joined with commas, everything else rendered as --key=value. */}}
{{- define "natrix.flags" -}}
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
{{- if kindIs "slice" $value }}
- {{ printf "--%s=%s" $key (join "," $value) | quote }}
{{- else if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
{{- /* YAML numbers arrive as floats: whole ones print as integers. */}}
- {{ printf "--%s=%d" $key (int64 $value) | quote }}
{{- else }}
- {{ printf "--%s=%v" $key $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment every natrix container gets: secrets, Redis, pod IP. */}}
{{- define "natrix.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: NATRIX_AUTH_SECRETS
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: auth-secret
- name: NATRIX_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: cluster-secret
{{- /* lookup's operator key (the load tester and `helm test` use it too). */}}
- name: NATRIX_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: api-key
      optional: true
{{- /* The relay admin API's token (used when relay.config.admin-listen is set). */}}
- name: NATRIX_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: admin-token
      optional: true
{{- /* Grant secrets shared with application backends (optional). */}}
- name: NATRIX_GRANT_SECRETS
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: grant-secrets
      optional: true
{{- /* Web Push signing key and webhook secret for signalling (optional). */}}
- name: NATRIX_VAPID_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: vapid-key
      optional: true
- name: NATRIX_PUSH_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: push-webhook-secret
      optional: true
{{- if .Values.redis.existingSecret }}
- name: NATRIX_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: redis-url
{{- else if .Values.redis.url }}
- name: NATRIX_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- else if .Values.redis.bundled.enabled }}
{{- /* The bundled Redis requires the release's generated password. */}}
- name: NATRIX_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "natrix.secretName" . }}
      key: redis-password
- name: NATRIX_REDIS_URL
  value: {{ printf "redis://:$(NATRIX_REDIS_PASSWORD)@%s-redis:6379" (include "natrix.fullname" .) | quote }}
{{- end }}
{{- end -}}

{{/* Metrics and health listen on the pod's IP (a hostNetwork pod's is the
node's internal IP, not 0.0.0.0 and so not a public interface); probes use
the health port, which a flood of the metrics port cannot starve. */}}
{{- define "natrix.telemetryFlags" -}}
- {{ printf "--metrics-listen=$(POD_IP):%d" (int .Values.metricsPort) | quote }}
- {{ printf "--health-listen=$(POD_IP):%d" (int .Values.healthPort) | quote }}
{{- end -}}

{{/* Probes on the health port. */}}
{{- define "natrix.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  periodSeconds: 2
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  initialDelaySeconds: 5
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}

{{/* The drain hook: start natrix's drain (its SIGTERM handling: registry
state draining, readiness failing, existing sessions kept) before the
kubelet's own SIGTERM, and wait until it has finished and exited. */}}
{{- define "natrix.lifecycle" -}}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sh", "-c", "kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done"]
{{- end -}}
