{{/*
The processes' config files. The user's section (controlPlane.config, agent.config) is
merged under what the chart owns: ports, Secret paths and store URLs must agree with the
pod specs rendered here, so the chart's values win for those keys.
*/}}
{{- define "synapse.controlPlane.config" -}}
{{- $authDir := include "synapse.authDir" . -}}
{{- $own := dict
  "data_dir" "/var/lib/synapse"
  "http" (dict "port" (int .Values.controlPlane.ports.http))
  "grpc" (dict "port" (int .Values.controlPlane.ports.grpc))
  "auth" (dict "admin_key" (dict "file" (printf "%s/admin-key" $authDir))
               "agent_token" (dict "file" (printf "%s/agent-token" $authDir)))
  "logging" (dict "format" "json") -}}
{{- if include "synapse.agent.reviewed" . -}}
{{- $_ := set $own.auth "agent_review" (dict
  "service_accounts" (list (include "synapse.agent.username" .))
  "audience" .Values.agent.identityAudience) -}}
{{- end -}}
{{- $metrics := dict -}}
{{- with .Values.controlPlane.ports.metrics -}}
{{- $_ := set $metrics "port" (int .) -}}
{{- end -}}
{{- if .Values.controlPlane.metricsAuth.enabled -}}
{{- $_ := set $metrics "bearer_token_file" (printf "%s/%s" $authDir (include "synapse.metricsTokenKey" .)) -}}
{{- end -}}
{{- if $metrics -}}
{{- $_ := set $own "metrics" $metrics -}}
{{- end -}}
{{- if ne .Values.dependencies.redis.mode "none" -}}
{{- $_ := set $own "redis" (dict "url" (dict "env" "SYNAPSE_REDIS_URL")) -}}
{{- end -}}
{{- $milvus := .Values.dependencies.milvus -}}
{{- if eq $milvus.mode "lite" -}}
{{- $_ := set $own "cache" (dict "milvus_uri" (include "synapse.milvus.liteFile" .)) -}}
{{- else -}}
{{- $cache := dict "milvus_uri" (dict "env" "SYNAPSE_MILVUS_URI") -}}
{{- if include "synapse.milvus.tokenFromSecret" . -}}
{{- $_ := set $cache "milvus_token" (dict "env" "SYNAPSE_MILVUS_TOKEN") -}}
{{- end -}}
{{- $_ := set $own "cache" $cache -}}
{{- end -}}
{{- if .Values.upstreams -}}
{{- $_ := set $own "upstreams" .Values.upstreams -}}
{{- end -}}
{{- if .Values.agentLink.tls.enabled -}}
{{- /* TLS for the agents' streams, and what the agents' Node certificates must show
before a tenant's text is sent to them: the CA and name (secret), or the certificate
each agent registered, pinned for its address, and no plain text (selfSigned) */ -}}
{{- $tls := include "synapse.linkTlsDir" . -}}
{{- $_ := set $own.grpc "tls_cert_file" (printf "%s/tls.crt" $tls) -}}
{{- $_ := set $own.grpc "tls_key_file" (printf "%s/tls.key" $tls) -}}
{{- if eq .Values.agentLink.tls.agentCertificates "secret" -}}
{{- $_ := set $own.grpc "node_ca_file" (printf "%s/ca.crt" $tls) -}}
{{- $_ := set $own.grpc "node_server_name" .Values.agentLink.tls.serverName -}}
{{- else -}}
{{- $_ := set $own.grpc "node_tls_required" true -}}
{{- end -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.controlPlane.config) $own) -}}
{{- end -}}

{{- define "synapse.agent.config" -}}
{{- $dns := printf "%s.%s.svc.%s:%d" (include "synapse.controlPlane.headless" .)
  .Release.Namespace .Values.clusterDomain (int .Values.controlPlane.ports.grpc) -}}
{{- $tokenDir := include "synapse.agentTokenDir" . -}}
{{- $metrics := dict "port" (int .Values.agent.ports.metrics) -}}
{{- if .Values.agent.metricsAuth.enabled -}}
{{- $_ := set $metrics "bearer_token_file" (printf "%s/%s" $tokenDir (include "synapse.metricsTokenKey" .)) -}}
{{- end -}}
{{- $link := dict "dns_name" $dns "token" (dict "file" (printf "%s/agent-token" $tokenDir)) -}}
{{- if include "synapse.agent.reviewed" . -}}
{{- /* the pod's projected token, re-read before every connection: no shared secret */ -}}
{{- $link = dict "dns_name" $dns "token_file" (printf "%s/token" (include "synapse.agentIdentityDir" .)) -}}
{{- end -}}
{{- $grpc := dict "port" (int .Values.agent.ports.grpc) -}}
{{- if .Values.agentLink.tls.enabled -}}
{{- /* the control plane must prove itself with ca.crt; the Node port serves TLS only,
with the Secret's certificate or one the agent makes at start (selfSigned) */ -}}
{{- $tls := include "synapse.linkTlsDir" . -}}
{{- $_ := set $link "tls_ca_file" (printf "%s/ca.crt" $tls) -}}
{{- if eq .Values.agentLink.tls.agentCertificates "secret" -}}
{{- $_ := set $grpc "tls_cert_file" (printf "%s/tls.crt" $tls) -}}
{{- $_ := set $grpc "tls_key_file" (printf "%s/tls.key" $tls) -}}
{{- else -}}
{{- $_ := set $grpc "tls_self_signed" true -}}
{{- end -}}
{{- end -}}
{{- $own := dict
  "control_plane" $link
  "grpc" $grpc
  "metrics" $metrics
  "supervisor" (dict "engine_host" "0.0.0.0" "log_dir" "/var/log/synapse"
                     "engine_port_range" (list (int .Values.networkPolicy.enginePorts.start)
                                               (int .Values.networkPolicy.enginePorts.end)))
  "logging" (dict "format" "json") -}}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.agent.config) $own) -}}
{{- end -}}

{{/* "true" when the Milvus token comes from dependencies.milvus.external.existingSecret */}}
{{- define "synapse.milvus.tokenFromSecret" -}}
{{- $ext := .Values.dependencies.milvus.external -}}
{{- if and (eq .Values.dependencies.milvus.mode "external") $ext.existingSecret $ext.tokenKey -}}true{{- end -}}
{{- end -}}
