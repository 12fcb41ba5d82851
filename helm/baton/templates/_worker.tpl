{{/* A worker role's Deployment and headless Service: dict "root" $ "role" "prefill"|"decode". */}}
{{- define "baton.worker" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $w := index $root.Values $role }}
{{- $name := include "baton.component" (dict "root" $root "component" $role) }}
{{- include "baton.checkGrace" (dict "component" $role "grace" $w.terminationGracePeriodSeconds "sleep" $w.preStopSleepSeconds "drain" $w.drainGraceSeconds) }}
{{- $gpus := 0 }}
{{- with $w.resources.limits }}{{ $gpus = index . "nvidia.com/gpu" | default 0 | int }}{{ end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "baton.componentLabels" (dict "root" $root "component" $role) | nindent 4 }}
spec:
  {{- if not $root.Values.autoscaler.enabled }}
  replicas: {{ $w.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "baton.selectorLabels" (dict "root" $root "component" $role) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "baton.selectorLabels" (dict "root" $root "component" $role) | nindent 8 }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/engine: {{ include (print $root.Template.BasePath "/engine-configmap.yaml") $root | sha256sum }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
      containers:
        - name: {{ $role }}
          image: {{ include "baton.image" (dict "root" $root "kind" "worker") }}
          imagePullPolicy: {{ $root.Values.image.worker.pullPolicy }}
          command: ["python", "-m", {{ printf "%s_service" $role | quote }}]
          args:
            - --config
            - /etc/baton/{{ $role }}.yaml
            - --model
            - {{ include "baton.modelDir" $root }}
            - --served-model-name
            - {{ include "baton.servedModelName" $root | quote }}
            {{- /* The pod IP: the worker's id in the prefix index and, on decode workers,
            the KV endpoint it gives prefill workers (0.0.0.0 would be neither). */}}
            - --host
            - $(POD_IP)
            - --port
            - {{ $w.port | quote }}
            - --metrics-port
            - {{ $w.metricsPort | quote }}
            - --drain-grace
            - {{ $w.drainGraceSeconds | quote }}
            - --index-redis-url
            - $(BATON_REDIS_URL)
            - --cluster-name
            - {{ $root.Values.clusterName | quote }}
            - --device
            - {{ if gt $gpus 0 }}cuda:0{{ else }}cpu{{ end }}
            {{- if eq $role "decode" }}
            - --kv-port
            - {{ $w.kvPort | quote }}
            - --kv-transport
            - {{ $w.kvTransport }}
            {{- end }}
            {{- with $w.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            {{- include "baton.redisEnv" $root | nindent 12 }}
            {{- with $w.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $w.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $w.metricsPort }}
              protocol: TCP
            {{- if eq $role "decode" }}
            - name: kv
              containerPort: {{ $w.kvPort }}
              protocol: TCP
            {{- end }}
          # grpc.health.v1 (service ""): SERVING once the engine is up, NOT_SERVING from SIGTERM.
          startupProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: {{ $w.startupProbe.periodSeconds }}
            failureThreshold: {{ $w.startupProbe.failureThreshold }}
          readinessProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $w.preStopSleepSeconds }}
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          volumeMounts:
            {{- include "baton.modelMount" $root | nindent 12 }}
            - name: engine-config
              mountPath: /etc/baton
              readOnly: true
            - name: dshm
              mountPath: /dev/shm
      volumes:
        {{- include "baton.modelVolume" $root | nindent 8 }}
        - name: engine-config
          configMap:
            name: {{ include "baton.component" (dict "root" $root "component" "engine") }}
        # torch and NCCL use shared memory beyond the container default of 64 MiB.
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: 2Gi
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
# Headless: its DNS name resolves to every ready pod, and its EndpointSlices list them.
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "baton.componentLabels" (dict "root" $root "component" $role) | nindent 4 }}
    baton.dev/metrics: "true"
spec:
  clusterIP: None
  selector:
    {{- include "baton.selectorLabels" (dict "root" $root "component" $role) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $w.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $w.metricsPort }}
      targetPort: metrics
      protocol: TCP
    {{- if eq $role "decode" }}
    - name: kv
      port: {{ $w.kvPort }}
      targetPort: kv
      protocol: TCP
    {{- end }}
{{- end }}
