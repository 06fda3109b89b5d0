{{/* Chart name, overridable. */}}
{{- define "ws-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name: the release name when it already contains the chart name. */}}
{{- define "ws-gateway.fullname" -}}
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

{{- define "ws-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ws-gateway.version" -}}
{{- default .Chart.AppVersion .Values.image.tag | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never change across releases (Deployment selectors are immutable). */}}
{{- define "ws-gateway.selectorLabels" -}}
app: {{ include "ws-gateway.name" . }}
app.kubernetes.io/name: {{ include "ws-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ws-gateway.labels" -}}
{{ include "ws-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ include "ws-gateway.version" . | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: ws-gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "ws-gateway.chart" . }}
{{- end -}}

{{- define "ws-gateway.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "ws-gateway.version" .) -}}
{{- end -}}
{{- end -}}

{{- define "ws-gateway.secretName" -}}
{{- if .Values.secret.create -}}
{{- include "ws-gateway.fullname" . -}}
{{- else -}}
{{- required "secret.existingSecret is required when secret.create is false" .Values.secret.existingSecret -}}
{{- end -}}
{{- end -}}
