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

{{/* The Secret loaded with envFrom: chart-created, existingSecret, or <fullname> made outside the chart. */}}
{{- define "ws-gateway.secretName" -}}
{{- if and .Values.secret.create .Values.secret.existingSecret -}}
{{- fail "secret.create and secret.existingSecret are both set: keep one" -}}
{{- end -}}
{{- default (include "ws-gateway.fullname" .) .Values.secret.existingSecret -}}
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
{{- /* The listeners follow containerPorts unless config says otherwise (checked in ws-gateway.checks). */ -}}
{{- if not (hasKey $data "LISTEN_ADDR") -}}
{{- $_ := set $data "LISTEN_ADDR" (printf "0.0.0.0:%d" (int .Values.containerPorts.ws)) -}}
{{- end -}}
{{- if not (hasKey $data "ADMIN_LISTEN_ADDR") -}}
{{- $_ := set $data "ADMIN_LISTEN_ADDR" (printf "0.0.0.0:%d" (int .Values.containerPorts.metrics)) -}}
{{- end -}}
{{- $cidrs := "" -}}
{{- if eq $t.mode "passthrough" -}}
{{- $cidrs = required "traefik.passthrough.trustedCIDRs is required in passthrough mode: the addresses Traefik connects from (its pods' range, or the node range with hostNetwork); only they may send a PROXY header" $t.passthrough.trustedCIDRs -}}
{{- end -}}
{{- $own := dict
      "ADMIN_REQUIRED_ROLE" (list "admin.requiredRole" .Values.admin.requiredRole)
      "OIDC_CLIENT_ID" (list "oidc.clientId" .Values.oidc.clientId)
      "STATE_STORE" (list "revocation.store" .Values.revocation.store)
      "REVOCATION_MAX_TTL_SECONDS" (list "revocation.maxTtlSeconds" (ternary "" (toString .Values.revocation.maxTtlSeconds) (eq (int .Values.revocation.maxTtlSeconds) 0)))
      "REVOCATION_FAIL_MODE" (list "revocation.failMode" .Values.revocation.failMode)
      "PROXY_PROTOCOL_TRUSTED_CIDRS" (list "traefik.passthrough.trustedCIDRs" $cidrs) -}}
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

{{/* The value a container env var ends up with: extraEnv (env wins over envFrom), else the ConfigMap, else "".
     Call with (list $ "NAME"). A valueFrom entry cannot be checked here: refused for the checked names. */}}
{{- define "ws-gateway.effectiveEnv" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $value := "" -}}
{{- $data := include "ws-gateway.configData" $root | fromYaml -}}
{{- if hasKey $data $name -}}
{{- $value = toString (index $data $name) -}}
{{- end -}}
{{- range $root.Values.extraEnv -}}
{{- if eq .name $name -}}
{{- if hasKey . "valueFrom" -}}
{{- fail (printf "extraEnv %s uses valueFrom: the chart checks this setting against the pod spec, give it a value" $name) -}}
{{- end -}}
{{- $value = toString (default "" .value) -}}
{{- end -}}
{{- end -}}
{{- $value -}}
{{- end -}}

{{/* Refuses settings that cannot work in a pod. Included by the Deployment. */}}
{{- define "ws-gateway.checks" -}}
{{- $listen := include "ws-gateway.effectiveEnv" (list . "LISTEN_ADDR") -}}
{{- $admin := include "ws-gateway.effectiveEnv" (list . "ADMIN_LISTEN_ADDR") -}}
{{- $ws := int .Values.containerPorts.ws -}}
{{- $metrics := int .Values.containerPorts.metrics -}}
{{- if ne (regexFind "[0-9]+$" $listen) (toString $ws) -}}
{{- fail (printf "LISTEN_ADDR %s does not listen on containerPorts.ws (%d): Services and probes would miss it" $listen $ws) -}}
{{- end -}}
{{- if ne (regexFind "[0-9]+$" $admin) (toString $metrics) -}}
{{- fail (printf "ADMIN_LISTEN_ADDR %s does not listen on containerPorts.metrics (%d): probes, Prometheus and the admin Service would miss it" $admin $metrics) -}}
{{- end -}}
{{- range $name, $addr := dict "LISTEN_ADDR" $listen "ADMIN_LISTEN_ADDR" $admin -}}
{{- if regexMatch "^(127\\.|localhost:|\\[::1\\]:)" $addr -}}
{{- fail (printf "%s %s is a loopback address: kubelet probes, Prometheus and Services cannot reach it in a pod; use 0.0.0.0:<port>" $name $addr) -}}
{{- end -}}
{{- end -}}
{{- $drainValue := include "ws-gateway.effectiveEnv" (list . "GRACEFUL_DRAIN_TIMEOUT_SECONDS") -}}
{{- $drain := int (default "30" $drainValue) -}}
{{- $preStop := ternary 0 (int .Values.preStop.sleepSeconds) (eq .Values.preStop.action "none") -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add $preStop $drain) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStop.sleepSeconds + GRACEFUL_DRAIN_TIMEOUT_SECONDS (%d, from config or extraEnv)" (int .Values.terminationGracePeriodSeconds) (add $preStop $drain)) -}}
{{- end -}}
{{- if and (eq .Values.preStop.action "sleep") (not (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "preStop.action=sleep needs Kubernetes >= 1.30 (PodLifecycleSleepAction); this is %s: use preStop.action=exec" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and (eq .Values.traefik.mode "passthrough") (include "ws-gateway.effectiveEnv" (list . "TRUSTED_PROXIES")) -}}
{{- fail "TRUSTED_PROXIES in passthrough mode: the client address comes from the PROXY header, no X-Forwarded-For is to be believed" -}}
{{- end -}}
{{- end -}}
