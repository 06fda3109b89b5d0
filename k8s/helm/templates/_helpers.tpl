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

{{/* Labels of the admin-port objects (Service, Secret): component admin. */}}
{{- define "ws-gateway.adminLabels" -}}
{{- include "ws-gateway.labels" . | replace "app.kubernetes.io/component: gateway" "app.kubernetes.io/component: admin" -}}
{{- end -}}

{{/* Secret holding the admin bearer token; empty when the admin token is off. */}}
{{- define "ws-gateway.adminSecretName" -}}
{{- if and .Values.admin.existingSecret .Values.admin.token -}}
{{- fail "admin.existingSecret and admin.token are both set: keep existingSecret (preferred) and drop admin.token" -}}
{{- else if .Values.admin.existingSecret -}}
{{- .Values.admin.existingSecret -}}
{{- else if .Values.admin.token -}}
{{- printf "%s-admin" (include "ws-gateway.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* Non-secret settings: config, plus the settings with values of their own. */}}
{{- define "ws-gateway.configData" -}}
{{- $data := deepCopy .Values.config -}}
{{- $t := .Values.traefik -}}
{{- if and (has $t.mode (list "ingress" "ingressRoute")) $t.trustedProxies (not (hasKey $data "TRUSTED_PROXIES")) -}}
{{- $_ := set $data "TRUSTED_PROXIES" $t.trustedProxies -}}
{{- end -}}
{{- $own := dict
      "ADMIN_REQUIRED_ROLE" (list "admin.requiredRole" .Values.admin.requiredRole)
      "OIDC_CLIENT_ID" (list "oidc.clientId" .Values.oidc.clientId)
      "STATE_STORE" (list "revocation.store" .Values.revocation.store)
      "REVOCATION_MAX_TTL_SECONDS" (list "revocation.maxTtlSeconds" (ternary "" (toString .Values.revocation.maxTtlSeconds) (eq (int .Values.revocation.maxTtlSeconds) 0)))
      "REVOCATION_FAIL_MODE" (list "revocation.failMode" .Values.revocation.failMode) -}}
{{- range $key, $v := $own -}}
{{- $value := index $v 1 -}}
{{- if $value -}}
{{- if hasKey $data $key -}}
{{- fail (printf "%s and config.%s are both set: keep one" (index $v 0) $key) -}}
{{- end -}}
{{- $_ := set $data $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $data -}}
{{- end -}}
