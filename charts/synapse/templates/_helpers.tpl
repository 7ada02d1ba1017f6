{{/*
Names. Every object is named `<fullname>-<component>` like the kustomize overlays
(release `synapse` renders exactly their names), and `app.kubernetes.io/name` carries that
name, so selectors stay unique per release without an extra label.
*/}}
{{- define "synapse.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "synapse.controlPlane.name" -}}{{ include "synapse.fullname" . }}-controlplane{{- end -}}
{{- define "synapse.controlPlane.dataClaim" -}}{{ .Values.controlPlane.persistence.existingClaim | default (printf "%s-data" (include "synapse.controlPlane.name" .)) }}{{- end -}}
{{- define "synapse.controlPlane.headless" -}}{{ include "synapse.fullname" . }}-controlplane-headless{{- end -}}
{{- define "synapse.agent.name" -}}{{ include "synapse.fullname" . }}-agent{{- end -}}
{{- define "synapse.redis.name" -}}{{ include "synapse.fullname" . }}-redis{{- end -}}
{{- define "synapse.milvus.name" -}}{{ include "synapse.fullname" . }}-milvus{{- end -}}

{{/* The Secret with admin-key, api-key, agent-token (and metrics-token): referenced or
created. */}}
{{- define "synapse.authSecret" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-auth" (include "synapse.fullname" .)) -}}
{{- end -}}

{{/* The Secret the agents mount, holding only what they read: `agent-token` (with
agent.identity sharedToken) and `metrics-token` (with agent.metricsAuth). A Secret of its
own, not the auth Secret with `items`: the kubelet fetches the whole Secret object for a
pod that mounts it (the Node authorizer lets a node read every Secret its pods
reference), so a GPU node would hold the admin key, the tenants' API key and the Redis
password. Created as `<fullname>-agent-auth` with the auth Secret's values
(templates/secret.yaml); with secrets.existingSecret, secrets.existingAgentSecret, or
failing that the existingSecret itself (NOTES warns). */}}
{{- define "synapse.agentSecret" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingAgentSecret | default .Values.secrets.existingSecret -}}
{{- else -}}
{{- printf "%s-agent-auth" (include "synapse.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The keys of the agent Secret the agents read, as a JSON list (empty: they mount no
Secret). */}}
{{- define "synapse.agentSecretKeys" -}}
{{- $keys := list -}}
{{- if not (include "synapse.agent.reviewed" .) -}}{{- $keys = append $keys "agent-token" -}}{{- end -}}
{{- if .Values.agent.metricsAuth.enabled -}}{{- $keys = append $keys (include "synapse.metricsTokenKey" .) -}}{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* "true" when the agents mount the auth Secret itself (secrets.existingSecret without
secrets.existingAgentSecret): their GPU nodes can then read every key in it. */}}
{{- define "synapse.agentMountsAuthSecret" -}}
{{- if and .Values.secrets.existingSecret (not .Values.secrets.existingAgentSecret)
  (include "synapse.agentSecretKeys" . | fromJsonArray) -}}true{{- end -}}
{{- end -}}

{{/* The auth Secret's data (base64 values by key, as JSON) from the existing auth
Secret's data ("auth"), the existing agent Secret's ("agent") and, for keys neither
holds, new random keys: (dict "root" $ "auth" <data> "agent" <data>). templates/secret.yaml
renders both Secrets from it. */}}
{{- define "synapse.authSecretData" -}}
{{- $root := .root -}}
{{- $keys := list "admin-key" "api-key" "agent-token" -}}
{{- if include "synapse.metricsTokenWanted" $root -}}
{{- $keys = append $keys (include "synapse.metricsTokenKey" $root) -}}
{{- end -}}
{{- if eq $root.Values.dependencies.redis.mode "bundled" -}}
{{- $keys = append $keys (include "synapse.redis.passwordKey" $root) -}}
{{- end -}}
{{- $data := dict -}}
{{- range $key := $keys -}}
{{- $_ := set $data $key (get $.auth $key | default (get $.agent $key) | default (randAlphaNum 48 | b64enc)) -}}
{{- end -}}
{{- toJson $data -}}
{{- end -}}

{{/* The keys of the Secrets the chart makes (templates/secret.yaml), as JSON: read back
from the cluster (lookup) or new. Computed once per render and kept in the render's
values, so the Secrets and the pods' checksum/secret annotations see the same random keys
(each randAlphaNum call draws new ones). */}}
{{- define "synapse.chartSecretData" -}}
{{- if not (hasKey .Values "__synapseChartSecretData") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "synapse.authSecret" .)).data | default dict -}}
{{- $existingAgent := (lookup "v1" "Secret" .Release.Namespace (include "synapse.agentSecret" .)).data | default dict -}}
{{- $_ := set .Values "__synapseChartSecretData" (include "synapse.authSecretData" (dict "root" . "auth" $existing "agent" $existingAgent)) -}}
{{- end -}}
{{- get .Values "__synapseChartSecretData" -}}
{{- end -}}

{{/* A pod template's checksum/secret annotation: the hash of the chart-made keys it reads
(call with dict "root" and "keys", a list; nil keys: all of them), so new keys (a
rotation: the Secrets deleted before helm upgrade) roll the pods, the Redis password
included, which reaches Redis and the control plane through their environment. Nothing
with secrets.existingSecret: the chart cannot read it; restart the pods after rotating it. */}}
{{- define "synapse.secretChecksumAnnotation" -}}
{{- if not .root.Values.secrets.existingSecret -}}
{{- $data := include "synapse.chartSecretData" .root | fromJson -}}
{{- $chosen := dict -}}
{{- range $key := (.keys | default (keys $data)) -}}
{{- $_ := set $chosen $key (get $data $key) -}}
{{- end -}}
checksum/secret: {{ toJson $chosen | sha256sum }}
{{- end -}}
{{- end -}}

{{/* The auth Secret's key /metrics wants as a bearer token (controlPlane.metricsAuth,
agent.metricsAuth: the same token for both). */}}
{{- define "synapse.metricsTokenKey" -}}metrics-token{{- end -}}

{{/* "true" when either process's /metrics wants the token, so the Secret holds it. */}}
{{- define "synapse.metricsTokenWanted" -}}
{{- if or .Values.controlPlane.metricsAuth.enabled .Values.agent.metricsAuth.enabled -}}true{{- end -}}
{{- end -}}

{{/* Where the control plane finds the auth Secret's keys, and the agent its Secret's. */}}
{{- define "synapse.authDir" -}}/var/run/secrets/synapse{{- end -}}
{{- define "synapse.agentTokenDir" -}}/var/run/secrets/synapse-agent{{- end -}}

{{/* agent.identity serviceAccount: "true" when each agent presents its pod's projected
ServiceAccount token (mounted at agentIdentityDir) instead of the shared agent-token, and
the control plane has the Kubernetes API review it (auth.agent_review). */}}
{{- define "synapse.agent.reviewed" -}}
{{- if eq .Values.agent.identity "serviceAccount" -}}true{{- end -}}
{{- end -}}
{{- define "synapse.agentIdentityDir" -}}/var/run/secrets/synapse/agent-identity{{- end -}}
{{/* The username the API server gives the agents' ServiceAccount. */}}
{{- define "synapse.agent.username" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "synapse.agent.name" . }}
{{- end -}}
{{/* Where the control plane's own ServiceAccount token and the cluster's CA are mounted
in serviceAccount mode: auth.agent_review's default token_file and ca_file. */}}
{{- define "synapse.kubeApiAccessDir" -}}/var/run/secrets/kubernetes.io/serviceaccount{{- end -}}
{{/* agentLink.tls: where each side mounts its Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "synapse.linkTlsDir" -}}/var/run/secrets/synapse-link{{- end -}}

{{- define "synapse.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* Labels of every object: (dict "root" $ "name" <app name> "component" <component>) */}}
{{- define "synapse.labels" -}}
{{ include "synapse.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: synapse
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Labels of objects that belong to no single component (ConfigMaps, policies). */}}
{{- define "synapse.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: synapse
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "synapse.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
{{- end -}}

{{/* Pod template labels: the selector plus the component, as in the overlays. */}}
{{- define "synapse.podLabels" -}}
{{ include "synapse.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* The bundled Redis wants a password (key redis-password of the auth Secret): without
one every pod that reaches it reads every tenant's cached answers and writes operator
intent, such as an engine of its own choosing for the agents to run and the control plane
to route tenants' prompts to. The URL takes it from $(REDIS_PASSWORD), which the control
plane's container defines just before it. */}}
{{- define "synapse.redis.passwordKey" -}}redis-password{{- end -}}
{{- define "synapse.redis.url" -}}redis://:$(REDIS_PASSWORD)@{{ include "synapse.redis.name" . }}:6379/0{{- end -}}
{{- define "synapse.milvus.uri" -}}http://{{ include "synapse.milvus.name" . }}:19530{{- end -}}
{{- define "synapse.milvus.liteFile" -}}/var/lib/synapse/l2.db{{- end -}}

{{/* The affinity of pods that hold what GPU nodes must not (the control plane mounts the
whole auth Secret; Redis and Milvus hold tenants' cached answers and Redis the password):
the pod's own `affinity` value, else a preference for nodes without GPUs. A GPU node's
kubelet fetches every Secret its pods mount, and secrets.existingAgentSecret keeps only
the agents' two keys there; preferred, since a cluster of GPU nodes only must still
schedule (a required rule or a taint makes it hard). Call with the affinity value. */}}
{{- define "synapse.offGpuAffinity" -}}
{{- if . -}}
{{ toYaml . }}
{{- else -}}
nodeAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      preference:
        matchExpressions:
          - key: nvidia.com/gpu.present
            operator: NotIn
            values: ["true"]
{{- end -}}
{{- end -}}
