{{- /* Names, labels and computed settings shared by the templates. */}}

{{- define "crucible.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "crucible.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "crucible.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "crucible.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- /* Labels every object of the release carries. */}}
{{- define "crucible.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crucible
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- /* Labels of the service's own objects (StatefulSet and its pod, Service, ConfigMap). */}}
{{- define "crucible.serviceLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crucible
{{ include "crucible.selectorLabels" . }}
{{- end }}

{{- /* The labels that select the service's pod (StatefulSet, Service, NetworkPolicy, and
       the z2jh example's singleuser egress rule). */}}
{{- define "crucible.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crucible.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: service
{{- end }}

{{- define "crucible.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "crucible.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{- define "crucible.hubNamespace" -}}
{{- .Values.jupyterhub.namespace | default .Release.Namespace }}
{{- end }}

{{- define "crucible.hubApiUrl" -}}
{{- .Values.hub.apiUrl | default (printf "http://hub.%s.svc:8081/hub/api" (include "crucible.hubNamespace" .)) }}
{{- end }}

{{- define "crucible.prefix" -}}
/services/{{ .Values.hub.serviceName }}/
{{- end }}

{{- /* The Secret and key holding the service's hub API token. */}}
{{- define "crucible.tokenSecretName" -}}
{{- .Values.hub.apiToken.existingSecret.name | default (printf "%s-hub-token" (include "crucible.fullname" .)) }}
{{- end }}

{{- define "crucible.tokenSecretKey" -}}
{{- if .Values.hub.apiToken.existingSecret.name }}
{{- .Values.hub.apiToken.existingSecret.key }}
{{- else -}}
api-token
{{- end }}
{{- end }}

{{- /* The hub API token: the one already stored in this release's Secret (looked up in
       the cluster, so `helm upgrade` keeps it), else 64 new random characters. `helm
       template` and client-side dry runs have no cluster: lookup answers nothing there,
       so each of those renderings shows a new token. */}}
{{- define "crucible.hubToken" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "crucible.tokenSecretName" .) }}
{{- $data := (get ($existing | default dict) "data") | default dict }}
{{- if hasKey $data "api-token" }}
{{- index $data "api-token" | b64dec }}
{{- else }}
{{- randAlphaNum 64 }}
{{- end }}
{{- end }}

{{- /* The API server's addresses as executors see them (HOST:PORT,...), for the
       isolation probe: the value, else the `kubernetes` EndpointSlices of `default`,
       read when helm installs or upgrades (nothing with `helm template`). */}}
{{- define "crucible.isolationProbe" -}}
{{- if .Values.executions.isolationProbe }}
{{- .Values.executions.isolationProbe }}
{{- else }}
{{- $slices := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "" | default dict }}
{{- $found := list }}
{{- range $slice := (get $slices "items") | default list }}
{{- if eq (dig "metadata" "labels" "kubernetes.io/service-name" "" $slice) "kubernetes" }}
{{- range $endpoint := $slice.endpoints | default list }}
{{- range $address := $endpoint.addresses | default list }}
{{- range $port := $slice.ports | default list }}
{{- if contains ":" $address }}
{{- $found = append $found (printf "[%s]:%v" $address $port.port) }}
{{- else }}
{{- $found = append $found (printf "%s:%v" $address $port.port) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $found | uniq | sortAlpha | join "," }}
{{- end }}
{{- end }}

{{- /* Sizes derived from executions.*: one place for the dispatcher's settings, the
       ResourceQuota and the LimitRange. Memory in bytes, CPU in millicores. */}}
{{- define "crucible.sizes" -}}
{{- $e := .Values.executions }}
{{- $c := $e.cell }}
{{- if gt (float64 $c.defaultCpu) (float64 $c.maxCpu) }}
{{- fail (printf "executions.cell.defaultCpu (%v) is above executions.cell.maxCpu (%v); lower the default or raise the maximum" $c.defaultCpu $c.maxCpu) }}
{{- end }}
{{- if gt (int $c.defaultMemoryMiB) (int $c.maxMemoryMiB) }}
{{- fail (printf "executions.cell.defaultMemoryMiB (%v) is above executions.cell.maxMemoryMiB (%v); lower the default or raise the maximum" $c.defaultMemoryMiB $c.maxMemoryMiB) }}
{{- end }}
{{- if and $e.maxConcurrentPerUser (gt (int $e.maxConcurrentPerUser) (int $e.maxConcurrent)) }}
{{- fail (printf "executions.maxConcurrentPerUser (%v) is above executions.maxConcurrent (%v)" $e.maxConcurrentPerUser $e.maxConcurrent) }}
{{- end }}
{{- $mib := 1048576 }}
{{- $cells := add (int $e.maxConcurrent) (int $e.resourceQuota.extraPods) }}
{{- $warm := int $e.warmPods }}
{{- $maxCpuM := mulf (float64 $c.maxCpu) 1000 | ceil | int }}
{{- $defCpuM := mulf (float64 $c.defaultCpu) 1000 | ceil | int }}
{{- $output := mul (int $c.outputLimitMiB) $mib }}
{{- $ephemeral := add (mul 2 (add $output (mul 2 $mib))) (mul 16 $mib) }}
pods: {{ add $cells $warm }}
cellPods: {{ $cells }}
maxCpuMilli: {{ $maxCpuM }}
defaultCpuMilli: {{ $defCpuM }}
limitsCpuMilli: {{ add (mul $cells $maxCpuM) (mul $warm $defCpuM) }}
requestsCpuMilli: {{ add (mul $cells (min $maxCpuM 250)) (mul $warm (min $defCpuM 250)) }}
maxMemory: {{ mul (int $c.maxMemoryMiB) $mib }}
defaultMemory: {{ mul (int $c.defaultMemoryMiB) $mib }}
memory: {{ add (mul $cells (int $c.maxMemoryMiB) $mib) (mul $warm (int $c.defaultMemoryMiB) $mib) }}
outputLimit: {{ $output }}
ephemeralPerPod: {{ $ephemeral }}
ephemeral: {{ mul (add $cells $warm) $ephemeral }}
{{- end }}

{{- /* The service's traitlets settings (crucible_config.json). */}}
{{- define "crucible.config" -}}
{{- $e := .Values.executions }}
{{- $c := $e.cell }}
{{- $s := include "crucible.sizes" . | fromYaml }}
{{- $service := dict
  "service_name" .Values.hub.serviceName
  "prefix" (include "crucible.prefix" .)
  "bind_url" (printf "http://0.0.0.0:%v" .Values.server.port)
  "admin_scope" .Values.hub.adminScope
  "auth_cache_seconds" .Values.hub.authCacheSeconds
  "shutdown_grace_seconds" .Values.server.shutdownGraceSeconds }}
{{- $dispatcher := dict
  "backend" "kubernetes"
  "enabled_backends" (list "kubernetes")
  "max_concurrency" $e.maxConcurrent
  "max_concurrency_per_user" $e.maxConcurrentPerUser
  "max_queued_per_user" $e.maxQueuedPerUser
  "default_cpu" (float64 $c.defaultCpu)
  "max_cpu" (float64 $c.maxCpu)
  "default_memory" (int64 $s.defaultMemory)
  "max_memory" (int64 $s.maxMemory)
  "default_timeout" (float64 $c.defaultTimeoutSeconds)
  "max_timeout" (float64 $c.maxTimeoutSeconds)
  "output_limit" (int64 $s.outputLimit)
  "handover_on_stop" true }}
{{- if eq .Values.storage.type "sqlite" }}
{{- $_ := set $dispatcher "db_url" "sqlite:////data/crucible.db" }}
{{- end }}
{{- $backend := dict
  "namespace" $e.namespace
  "create_namespace" false
  "images" $e.images
  "pull_policy" $e.imagePullPolicy
  "warm_pods" $e.warmPods
  "quota_policy" $e.quotaPolicy
  "seccomp_profile" $e.seccompProfile
  "runtime_class" $e.runtimeClassName }}
{{- with include "crucible.isolationProbe" . }}
{{- $_ := set $backend "isolation_probe" . }}
{{- end }}
{{- $config := dict
  "CrucibleService" $service
  "CrucibleDispatcher" $dispatcher
  "CrucibleKubernetesBackend" $backend
  "HubAuth" (dict "api_url" (include "crucible.hubApiUrl" .))
  "Application" (dict "log_level" .Values.server.logLevel) }}
{{- mergeOverwrite $config (deepCopy .Values.server.config) | toPrettyJson }}
{{- end }}

{{- define "crucible.podSecurityLabels" -}}
{{- $p := .Values.executions.podSecurity }}
{{- $labels := dict }}
{{- range $mode := list "enforce" "audit" "warn" }}
{{- $_ := set $labels (printf "pod-security.kubernetes.io/%s" $mode) $p.level }}
{{- $_ := set $labels (printf "pod-security.kubernetes.io/%s-version" $mode) $p.version }}
{{- end }}
{{- toYaml $labels }}
{{- end }}
