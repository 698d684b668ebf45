{{/*
Names. KubeRay derives the RayCluster name (<name>-xxxxx), its Services (<name>-head-svc,
<name>-serve-svc) and label values from the RayService name, so it is kept to 48 characters.
*/}}
{{- define "kvfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 48 | trimSuffix "-" }}
{{- end }}

{{- define "kvfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvfleet.labels" -}}
helm.sh/chart: {{ include "kvfleet.chart" . }}
{{ include "kvfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kvfleet.redisName" -}}
{{- printf "%s-redis" (include "kvfleet.fullname" .) }}
{{- end }}

{{/*
The page index's Redis: the chart's own (a Service in this namespace) or an external URL.
*/}}
{{- define "kvfleet.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:6379/0" (include "kvfleet.redisName" .) .Release.Namespace }}
{{- else if .Values.redis.externalUrl }}
{{- .Values.redis.externalUrl }}
{{- else }}
{{- fail "redis.enabled is false: set redis.externalUrl (redis:// or rediss://) to the Redis of the page index" }}
{{- end }}
{{- end }}

{{/*
The Secrets every Ray pod mounts read-only at /etc/kvfleet/<volume>/<key>, as JSON
{volume: {name, key}}: the external Redis's password and the gRPC bearer token, when set.
*/}}
{{- define "kvfleet.secrets" -}}
{{- $secrets := dict }}
{{- if and (not .Values.redis.enabled) .Values.redis.externalPasswordSecret.name }}
{{- $_ := set $secrets "redis-auth" .Values.redis.externalPasswordSecret }}
{{- end }}
{{- if .Values.service.grpc.authTokenSecret.name }}
{{- $_ := set $secrets "grpc-auth" .Values.service.grpc.authTokenSecret }}
{{- end }}
{{- toJson $secrets }}
{{- end }}

{{/*
GPUs of one target worker pod: gpusPerPod, or tensorParallelSize (one replica per pod). A
tensor-parallel group is one Ray placement group on one node, so a pod holds whole groups.
*/}}
{{- define "kvfleet.targetGpusPerPod" -}}
{{- $tp := int .Values.target.tensorParallelSize }}
{{- $perPod := int (default $tp .Values.target.gpusPerPod) }}
{{- if ne (mod $perPod $tp) 0 }}
{{- fail (printf "target.gpusPerPod (%d) must be a multiple of target.tensorParallelSize (%d): a tensor-parallel group cannot span pods" $perPod $tp) }}
{{- end }}
{{- $perPod }}
{{- end }}

{{/* Target worker pods: ceil(replicas x tensorParallelSize / gpusPerPod). */}}
{{- define "kvfleet.targetPods" -}}
{{- $perPod := int (include "kvfleet.targetGpusPerPod" .) }}
{{- $gpus := mul (int .Values.target.replicas) (int .Values.target.tensorParallelSize) }}
{{- div (add $gpus (sub $perPod 1)) $perPod }}
{{- end }}

{{/* Draft replicas: one per draft GPU, or one per draft pod without GPUs. */}}
{{- define "kvfleet.draftReplicas" -}}
{{- mul (int .Values.draft.replicas) (max 1 (int .Values.draft.gpusPerPod)) }}
{{- end }}

{{/* A custom Ray resource a group's pods advertise, n units: `ray start --resources`. */}}
{{- define "kvfleet.rayResource" -}}
{{- printf "'{\"%s\": %d}'" (index . 0) (int (index . 1)) }}
{{- end }}

{{/*
The kvfleet cluster config (cluster/config.py ClusterConfig) the application runs with: the
`kvfleet:` values verbatim, plus the fields that follow from the chart values.
*/}}
{{- define "kvfleet.clusterConfig" -}}
{{- $config := deepCopy (default dict .Values.kvfleet) }}
{{- $engine := default dict $config.engine }}
{{- $_ := set $engine "model" .Values.model.path }}
{{- $_ := set $config "engine" $engine }}
{{- $target := default dict $config.target }}
{{- $_ := set $target "replicas" (int .Values.target.replicas) }}
{{- $_ := set $target "tensor_parallel_size" (int .Values.target.tensorParallelSize) }}
{{- $_ := set $target "ray_resources" (dict "kvfleet-target" 1) }}
{{- $_ := set $config "target" $target }}
{{- if gt (int .Values.draft.replicas) 0 }}
{{- $draft := default dict $config.draft }}
{{- $_ := set $draft "model" (required "draft.replicas > 0: set draft.modelPath (the draft model's directory inside model.mountPath)" .Values.draft.modelPath) }}
{{- $_ := set $draft "replicas" (int (include "kvfleet.draftReplicas" .)) }}
{{- $_ := set $draft "num_gpus" (ternary 1 0 (gt (int .Values.draft.gpusPerPod) 0)) }}
{{- $_ := set $draft "ray_resources" (dict "kvfleet-draft" 1) }}
{{- $_ := set $config "draft" $draft }}
{{- else if $config.draft }}
{{- fail "kvfleet.draft needs draft pods: set draft.replicas (and draft.modelPath); kvfleet.draft holds the speculation settings" }}
{{- end }}
{{- $index := default dict $config.index }}
{{- $_ := set $index "redis_url" (include "kvfleet.redisUrl" .) }}
{{- $secrets := include "kvfleet.secrets" . | fromJson }}
{{- with (index $secrets "redis-auth") }}
{{- $_ := set $index "password_file" (printf "/etc/kvfleet/redis-auth/%s" .key) }}
{{- end }}
{{- $_ := set $config "index" $index }}
{{- with (index $secrets "grpc-auth") }}
{{- $grpc := default dict $config.grpc }}
{{- $_ := set $grpc "auth_token_file" (printf "/etc/kvfleet/grpc-auth/%s" .key) }}
{{- $_ := set $config "grpc" $grpc }}
{{- end }}
{{- $_ := set $config "ray" (dict "address" "auto") }}
{{- toYaml $config }}
{{- end }}

{{/* The kvfleet config's gRPC section, with ClusterConfig's defaults (one place for them: see values.schema.json). */}}
{{- define "kvfleet.grpcPort" -}}
{{- $grpc := default dict .Values.kvfleet.grpc }}
{{- int (hasKey $grpc "port" | ternary $grpc.port 50051) }}
{{- end }}

{{- define "kvfleet.httpPort" -}}
{{- $grpc := default dict .Values.kvfleet.grpc }}
{{- int (hasKey $grpc "http_port" | ternary $grpc.http_port 8000) }}
{{- end }}

{{- define "kvfleet.proxyHost" -}}
{{- $grpc := default dict .Values.kvfleet.grpc }}
{{- hasKey $grpc "host" | ternary $grpc.host "0.0.0.0" }}
{{- end }}

{{/*
Ray Serve's config (KubeRay serveConfigV2): the gRPC proxy's options at the top level (its
servicer functions are router/services.py GRPC_SERVICER_FUNCTIONS; tests/helm checks they agree
with cluster/app.py grpc_options), the controller's environment (its proxies refuse messages over
limits.max_request_bytes: cluster/app.py controller_options), and one application whose args are the cluster config. The
application needs a route_prefix, or Serve's gRPC proxy does not route to it.
*/}}
{{- define "kvfleet.serveConfig" -}}
{{- $app := dict "name" (default "kvfleet" .Values.kvfleet.app_name) "route_prefix" "/" "import_path" "cluster.app:app_builder" "args" (include "kvfleet.clusterConfig" . | fromYaml) }}
{{- $reflection := not (dig "grpc" "auth_token_file" "" $app.args) }}
{{- $grpc := dict "port" (int (include "kvfleet.grpcPort" .)) "grpc_servicer_functions" (list "router.services.add_generation_servicer_to_server" "router.services.add_health_servicer_to_server") "enable_reflection" $reflection }}
{{- $http := dict "host" (include "kvfleet.proxyHost" .) "port" (int (include "kvfleet.httpPort" .)) }}
{{- $limits := default dict .Values.kvfleet.limits }}
{{- $maxBytes := hasKey $limits "max_request_bytes" | ternary $limits.max_request_bytes 16777216 }}
{{- $controller := dict "runtime_env" (dict "env_vars" (dict "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE" (toString (int $maxBytes)))) }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "grpc_options" $grpc "controller_options" $controller "applications" (list $app)) }}
{{- end }}

{{/* Volumes and mounts every Ray pod carries: /dev/shm, and the model's storage. */}}
{{- define "kvfleet.podVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- range $volume, $s := include "kvfleet.secrets" . | fromJson }}
- name: {{ $volume }}
  secret:
    secretName: {{ $s.name }}
    items:
      - {key: {{ $s.key }}, path: {{ $s.key }}}
{{- end }}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.source is pvc: set model.pvc.claimName" $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.source is hostPath: set model.hostPath.path" $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if eq $m.source "download" }}
- name: model
  emptyDir:
    {{- with $m.download.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "kvfleet.modelMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- range $volume, $_ := include "kvfleet.secrets" . | fromJson }}
- name: {{ $volume }}
  mountPath: /etc/kvfleet/{{ $volume }}
  readOnly: true
{{- end }}
{{- $m := .Values.model }}
{{- if has $m.source (list "pvc" "hostPath" "download") }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $m.path) }}
{{- fail (printf "model.path (%s) must be inside model.mountPath (%s), where the model's storage is mounted" $m.path $m.mountPath) }}
{{- end }}
- name: model
  mountPath: {{ $m.mountPath }}
  readOnly: {{ ne $m.source "download" }}
  {{- if and (eq $m.source "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The init container that copies the model from an object store (model.source: download). */}}
{{- define "kvfleet.initContainers" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "download" }}
- name: download-model
  image: {{ required "model.source is download: set model.download.image" $m.download.image }}
  command:
    {{- required "model.source is download: set model.download.command" $m.download.command | toYaml | nindent 4 }}
  env:
    - name: MODEL_DIR
      value: {{ $m.path | quote }}
    {{- with $m.download.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.download.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.download.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
{{- end }}
{{- end }}

{{/* Pod metadata shared by the Ray pods; `component` names the group. */}}
{{- define "kvfleet.podMetadata" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 -}}
labels:
  {{- include "kvfleet.selectorLabels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ $component }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields of a pod spec from a group's values (nodeSelector, tolerations, affinity). */}}
{{- define "kvfleet.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* rayStartParams are strings in the RayCluster schema. */}}
{{- define "kvfleet.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := . }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}
