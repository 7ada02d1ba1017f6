{{/*
The egress rule (a one-item YAML list) for an upstream URL: an in-cluster name (`svc`,
`svc.ns`, `svc.ns.svc[.<domain>]`) opens its namespace (`svc` alone: this namespace's
pods), anything else any address; on the URL's port (default 80, 443 for https).
*/}}
{{- define "synapse.upstreamEgress" -}}
{{- $url := urlParse . -}}
{{- $hostport := splitList ":" $url.host -}}
{{- $parts := splitList "." (first $hostport) -}}
{{- $port := ternary 443 80 (eq $url.scheme "https") -}}
{{- if gt (len $hostport) 1 }}{{ $port = atoi (last $hostport) }}{{ end -}}
{{- $rule := dict "ports" (list (dict "protocol" "TCP" "port" $port)) -}}
{{- if or (eq (len $parts) 2) (and (gt (len $parts) 2) (eq (index $parts 2) "svc")) -}}
{{- $ns := dict "matchLabels" (dict "kubernetes.io/metadata.name" (index $parts 1)) -}}
{{- $_ := set $rule "to" (list (dict "namespaceSelector" $ns)) -}}
{{- else if eq (len $parts) 1 -}}
{{- $_ := set $rule "to" (list (dict "podSelector" (dict))) -}}
{{- end -}}
{{- toYaml (list $rule) -}}
{{- end -}}
