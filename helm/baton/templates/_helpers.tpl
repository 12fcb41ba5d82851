{{/* Names, labels and the pieces every Deployment shares. */}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's resource name: "<fullname>-<component>". */}}
{{- define "baton.component" -}}
{{- printf "%s-%s" (include "baton.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end }}

{{/* Selector labels of one component: dict "root" $ "component" "router". */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "baton.componentLabels" -}}
{{ include "baton.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "baton.image" -}}
{{- $image := index .root.Values.image .kind }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* The model directory inside the containers, and its name in the API. */}}
{{- define "baton.modelDir" -}}
/models/{{ include "baton.modelBase" . }}
{{- end }}

{{- define "baton.modelBase" -}}
{{- $base := base (trimSuffix "/" .Values.model.path) }}
{{- if or (eq $base "") (eq $base ".") (eq $base "/") }}model{{ else }}{{ $base }}{{ end }}
{{- end }}

{{- define "baton.servedModelName" -}}
{{- default (include "baton.modelBase" .) .Values.model.servedModelName }}
{{- end }}

{{- define "baton.modelVolume" -}}
- name: model
{{- if .Values.model.pvc.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
{{- if not .Values.model.path }}
{{- fail "set model.path (a directory on the nodes) or model.pvc.claimName" }}
{{- end }}
  hostPath:
    path: {{ .Values.model.path }}
    type: Directory
{{- end }}
{{- end }}

{{- define "baton.modelMount" -}}
- name: model
  mountPath: {{ include "baton.modelDir" . }}
  readOnly: true
{{- if and .Values.model.pvc.claimName (trimSuffix "/" (trimPrefix "/" .Values.model.path)) }}
  subPath: {{ trimSuffix "/" (trimPrefix "/" .Values.model.path) }}
{{- end }}
{{- end }}

{{/* The prefix index's URL, as the BATON_REDIS_URL variable (args use $(BATON_REDIS_URL)). */}}
{{- define "baton.redisEnv" -}}
- name: BATON_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:%d/0" (include "baton.component" (dict "root" . "component" "redis")) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if .Values.redis.url }}
  value: {{ .Values.redis.url | quote }}
{{- else }}
{{- fail "redis.enabled is false: set redis.url or redis.existingSecret (the router and workers need a Redis prefix index)" }}
{{- end }}
{{- end }}

{{/* Refuses a termination grace shorter than the preStop sleep plus the process's drain. */}}
{{- define "baton.checkGrace" -}}
{{- $need := add .sleep .drain }}
{{- if lt (int .grace) (int $need) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + the drain (%d + %d s)" .component (int .grace) (int .sleep) (int .drain)) }}
{{- end }}
{{- end }}

{{- define "baton.routerServiceAccount" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "baton.component" (dict "root" . "component" "router")) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}
