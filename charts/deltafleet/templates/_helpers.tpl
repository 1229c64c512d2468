{{/* Chart name, truncated to a DNS label. */}}
{{- define "deltafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "deltafleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "deltafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deltafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deltafleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "deltafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deltafleet
{{- end }}

{{/* Labels without the chart or app version: for the Ray pod templates inside the RayService's
rayClusterConfig, which KubeRay hashes — a version label there would start a second (blue/green)
cluster, twice the GPUs, on every chart upgrade. */}}
{{- define "deltafleet.stableLabels" -}}
{{ include "deltafleet.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deltafleet
{{- end }}

{{- define "deltafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deltafleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: by digest when one is given (the tag
is then ignored), else repository:tag with the chart's appVersion as the default tag. */}}
{{- define "deltafleet.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "deltafleet.image" -}}
{{- include "deltafleet.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "deltafleet.jobImage" -}}
{{- include "deltafleet.imageRef" (dict "image" .Values.compression.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "deltafleet.rayServiceNamespace" -}}
{{- default .Release.Namespace .Values.serve.rayService.namespace }}
{{- end }}

{{/* Watched namespaces, comma-separated; empty means all. */}}
{{- define "deltafleet.watchNamespaces" -}}
{{- if not .Values.watch.allNamespaces }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.namespaces must list at least one namespace when watch.allNamespaces is false" }}
{{- end }}
{{- join "," .Values.watch.namespaces }}
{{- end }}
{{- end }}

{{/*
What the operator may do where it watches FineTunes. kopf needs get/list/watch/patch on the
resource (finalizers and progress annotations live in metadata), patch on status; the
finalizers subresource lets Jobs carry blockOwnerDeletion owner references to a FineTune.
Pods are only read: the compression result comes back in a pod's termination message.
*/}}
{{- define "deltafleet.watchRules" -}}
- apiGroups: [deltafleet.dev]
  resources: [finetunes]
  verbs: [get, list, watch, patch, update]
- apiGroups: [deltafleet.dev]
  resources: [finetunes/status]
  verbs: [get, patch, update]
- apiGroups: [deltafleet.dev]
  resources: [finetunes/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# The model store's claim: checked before a Job is created (ModelStoreMissing).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- if eq .Values.serve.auth "keys" }}
# API keys: the Secret each FineTune names (get only: never list or watch every Secret).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- end }}

{{- define "deltafleet.modelStoreVolume" -}}
{{- if and .Values.modelStore.claimName .Values.modelStore.hostPath }}
{{- fail "modelStore: set one of claimName or hostPath, not both" }}
{{- end }}
{{- if .Values.modelStore.claimName }}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ .Values.modelStore.claimName }}
{{- else if .Values.modelStore.hostPath }}
- name: model-store
  hostPath:
    path: {{ .Values.modelStore.hostPath }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}

{{/* The serving pool's pods (templates/pool.yaml): the ML image's non-root user, the store's
group, RuntimeDefault seccomp. */}}
{{- define "deltafleet.poolPodSpec" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: {{ .Values.modelStore.group }}
  supplementalGroups: [{{ .Values.modelStore.group }}]
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.pool.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}

{{- define "deltafleet.poolContainerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* Ray, Hugging Face and Triton write under $HOME and /tmp (both volumes: the root is read-only). */}}
{{- define "deltafleet.poolEnv" -}}
- name: HOME
  value: /home/ray
- name: HF_HOME
  value: /tmp/hf
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- if .Values.pool.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.pool.hfTokenSecret.name }}
      key: {{ .Values.pool.hfTokenSecret.key }}
{{- end }}
{{- end }}

{{- define "deltafleet.poolMounts" -}}
- name: model-store
  mountPath: {{ .Values.modelStore.replicaPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/ray
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- define "deltafleet.poolVolumes" -}}
{{ include "deltafleet.modelStoreVolume" .root | trim }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
