{{- define "dormant.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dormant.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dormant.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dormant.serviceAccountName" -}}
{{- default (include "dormant.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Whether TLS comes from cert-manager. */}}
{{- define "dormant.certManager" -}}
{{- $mode := toString .Values.tls.certManager -}}
{{- if eq $mode "true" -}}true
{{- else if and (eq $mode "auto") (.Capabilities.APIVersions.Has "cert-manager.io/v1") -}}true
{{- end -}}
{{- end -}}

{{- define "dormant.tlsSecret" -}}
{{- default (printf "%s-tls" (include "dormant.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "dormant.auditTokenSecret" -}}
{{- default (printf "%s-audit-token" (include "dormant.fullname" .)) .Values.audit.existingTokenSecret -}}
{{- end -}}

{{/* The DNS names the proxy and webhook certificate covers. */}}
{{- define "dormant.dnsNames" -}}
{{- $fn := include "dormant.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list (printf "%s-proxy" $fn) (printf "%s-proxy.%s" $fn $ns) (printf "%s-proxy.%s.svc" $fn $ns) (printf "%s-audit" $fn) (printf "%s-audit.%s" $fn $ns) (printf "%s-audit.%s.svc" $fn $ns) -}}
{{- if .Values.proxy.baseDomain -}}
{{- range .Values.proxy.hostNamespaces -}}
{{- $names = append $names (printf "*.%s.%s" . $.Values.proxy.baseDomain) -}}
{{- end -}}
{{- end -}}
{{- concat $names .Values.tls.extraDnsNames | toJson -}}
{{- end -}}

{{/* The user name dormant's ServiceAccount authenticates as. */}}
{{- define "dormant.serviceAccountUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "dormant.serviceAccountName" . }}
{{- end -}}

{{/* The namespaces dormant never writes in (JSON list): the control plane's
and agent.excludeNamespaces, but not its own (its Lease lives there). */}}
{{- define "dormant.protectedNamespaces" -}}
{{- $out := list -}}
{{- range concat (list "kube-system" "kube-public" "kube-node-lease") .Values.agent.excludeNamespaces -}}
{{- if and (ne . $.Release.Namespace) (not (has . $out)) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Refuses RBAC values that cannot work (rendered by rbac.yaml). */}}
{{- define "dormant.checkRbac" -}}
{{- if eq .Values.rbac.mode "namespaces" -}}
{{- if not .Values.rbac.namespaces -}}
{{- fail "rbac.mode=namespaces needs rbac.namespaces: the namespaces dormant serves" -}}
{{- end -}}
{{- $protected := concat (list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace) .Values.agent.excludeNamespaces -}}
{{- range .Values.rbac.namespaces -}}
{{- if has . $protected -}}
{{- fail (printf "rbac.namespaces lists %s, where dormant never acts (the control plane's, agent.excludeNamespaces, or its own)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The first port of appTraffic.ports ("20000-21999" or one port). */}}
{{- define "dormant.appTrafficFirstPort" -}}
{{- (split "-" (toString .Values.appTraffic.ports))._0 | int -}}
{{- end -}}

{{/* The last port of appTraffic.ports. */}}
{{- define "dormant.appTrafficLastPort" -}}
{{- $p := split "-" (toString .Values.appTraffic.ports) -}}
{{- default $p._0 $p._1 | int -}}
{{- end -}}
