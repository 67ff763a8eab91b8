{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "strata.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "strata.labels" -}}
app.kubernetes.io/name: strata-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: strata-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.nodeAgentLabels" -}}
app.kubernetes.io/name: strata-node-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strata.nodeAgentSelectorLabels" -}}
app.kubernetes.io/name: strata-node-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.gpuTelemetry" -}}
{{- if .Values.gpuTelemetry.source -}}
{{- .Values.gpuTelemetry.source -}}
{{- else if .Values.nodeAgent.enabled -}}
node-agent
{{- else -}}
sidecar
{{- end -}}
{{- end -}}

{{- define "strata.gatewayLabels" -}}
app.kubernetes.io/name: strata-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strata.gatewaySelectorLabels" -}}
app.kubernetes.io/name: strata-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
