{{/* Names and labels shared by every template. */}}
{{- define "pgwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgwarden.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "pgwarden.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pgwarden.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgwarden.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pgwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pgwarden
{{- end -}}

{{- define "pgwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "pgwarden.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "pgwarden.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pgwarden.webhookService" -}}
{{- printf "%s-webhook" (include "pgwarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgwarden.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "pgwarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgwarden.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (default .Chart.AppVersion .Values.image.operator.tag) -}}
{{- end -}}

{{- define "pgwarden.proxyImage" -}}
{{- printf "%s:%s" .Values.image.proxy.repository (default .Chart.AppVersion .Values.image.proxy.tag) -}}
{{- end -}}

{{/* Namespaces whose namespaced objects the operator handles: the list, or "" for cluster-wide. */}}
{{- define "pgwarden.clusterwide" -}}
{{- if .Values.operator.watchNamespaces -}}{{- else -}}true{{- end -}}
{{- end -}}

{{/* Cluster-scoped names carry the release's full name, so two releases never share one:
the kopf peering object and the reviewer ClusterRole ("pgwarden-reviewer" for a release named pgwarden). */}}
{{- define "pgwarden.peeringName" -}}
{{- include "pgwarden.fullname" . -}}
{{- end -}}

{{- define "pgwarden.reviewerRole" -}}
{{- printf "%s-reviewer" (include "pgwarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
