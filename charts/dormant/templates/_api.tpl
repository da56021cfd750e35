{{/* The URL the agent's API is published at (the proxy Service's, unless api.url says). */}}
{{- define "dormant.apiUrl" -}}
{{- if .Values.api.url -}}
{{- .Values.api.url -}}
{{- else -}}
{{- $port := int .Values.proxy.service.port -}}
{{- printf "https://%s-proxy.%s.svc%s" (include "dormant.fullname" .) .Release.Namespace (ternary "" (printf ":%d" $port) (eq $port 443)) -}}
{{- end -}}
{{- end -}}

{{- define "dormant.apiSessionSecret" -}}
{{- default (printf "%s-api-session" (include "dormant.fullname" .)) .Values.api.existingSessionSecret -}}
{{- end -}}

{{/*
Where the CLI finds the API: its URL and the CA that signed its certificate,
in a ConfigMap every authenticated user may read. Called with
(dict "root" $ "ca" <PEM>).
*/}}
{{- define "dormant.apiDiscovery" -}}
{{- $root := .root -}}
{{- with $root -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Values.api.discovery.name }}
  namespace: {{ .Values.api.discovery.namespace }}
  labels: {{- include "dormant.labels" . | nindent 4 }}
data:
  url: {{ include "dormant.apiUrl" . | quote }}
  ca.crt: {{ $.ca | quote }}
{{- end -}}
{{- end -}}
