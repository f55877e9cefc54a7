#!/usr/bin/env bash
# End-to-end check of Tessera on a live cluster (see tests/e2e/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=${NS:-tessera-e2e}
OPERATOR_IMAGE=${OPERATOR_IMAGE:?set OPERATOR_IMAGE=REGISTRY/tessera-operator:TAG}
WORKER_IMAGE=${WORKER_IMAGE:?set WORKER_IMAGE=REGISTRY/tessera-worker:TAG}
MODEL_URI=${MODEL_URI:-pvc://models/llama-3.1-8b-instruct}
pass=0; fail=0
check() { if eval "$2"; then echo "ok   $1"; pass=$((pass+1)); else echo "FAIL $1"; fail=$((fail+1)); fi; }
wait_for() { local what=$1 cond=$2 t=${3:-180}; for _ in $(seq "$t"); do eval "$cond" && return 0; sleep 1; done; echo "timed out: $what"; return 1; }

helm upgrade --install tessera charts/tessera -n tessera-system --create-namespace --wait \
  --set operator.image.repository="${OPERATOR_IMAGE%:*}" --set operator.image.tag="${OPERATOR_IMAGE##*:}" \
  --set worker.image.repository="${WORKER_IMAGE%:*}" --set worker.image.tag="${WORKER_IMAGE##*:}"
check "operator ready" "kubectl -n tessera-system rollout status deploy -l app.kubernetes.io/component=operator --timeout=120s >/dev/null"

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
cat <<YAML | kubectl apply -f -
apiVersion: tessera.dev/v1alpha1
kind: ModelDeployment
metadata: {name: e2e, namespace: $NS}
spec:
  replicas: 2
  model:
    uri: $MODEL_URI
    architecture: {parameters: 8030261248, layers: 32, hiddenSize: 4096, attentionHeads: 32, kvHeads: 8,
                   intermediateSize: 14336, vocabSize: 128256, contextLength: 131072, bytesPerParameter: 2}
  parallelism: {tensor: 2, pipeline: 1}
  serving: {maxConcurrency: 8, contextLength: 4096}
  failurePolicy: {maxRestarts: 2, backoffSeconds: 5}
YAML
check "2 replicas placed" "wait_for placed '[ \"\$(kubectl -n $NS get mdep e2e -o jsonpath={.status.placements[*].replica} | wc -w)\" = 2 ]'"
check "pods pinned and requesting GPUs" "[ \"\$(kubectl -n $NS get pods -l tessera.dev/deployment=e2e -o jsonpath='{range .items[*]}{.spec.containers[0].resources.limits.nvidia\.com/gpu}{\"\\n\"}{end}' | sort -u)\" = 2 ]"
if [ "${REAL_GPUS:-0}" = 1 ]; then
  check "2 replicas ready" "wait_for ready '[ \"\$(kubectl -n $NS get mdep e2e -o jsonpath={.status.readyReplicas})\" = 2 ]' 1800"
else
  check "failing members recreate the group" "wait_for restarts '[ \"\$(kubectl -n $NS get mdep e2e -o jsonpath={.status.placements[0].restarts})\" -ge 1 ]' 300"
fi
kubectl -n "$NS" scale mdep/e2e --replicas 1
check "scale down to 1" "wait_for scaled '[ \"\$(kubectl -n $NS get mdep e2e -o jsonpath={.status.placements[*].replica} | wc -w)\" = 1 ]'"
kubectl -n "$NS" delete mdep e2e --wait
check "no orphans" "wait_for gc '[ -z \"\$(kubectl -n $NS get pods,svc -l tessera.dev/deployment=e2e -o name)\" ]' 120"

if [ "${PD:-0}" = 1 ]; then
  # Prefill/decode pools with SGLang: both pools as gangs in their roles, the router in front.
  cat <<YAML | kubectl apply -f -
apiVersion: tessera.dev/v1alpha1
kind: ModelDeployment
metadata: {name: e2e-pd, namespace: $NS}
spec:
  replicas: 1
  engine: {name: sglang${SGLANG_IMAGE:+, image: $SGLANG_IMAGE}}
  model:
    uri: $MODEL_URI
    architecture: {parameters: 8030261248, layers: 32, hiddenSize: 4096, attentionHeads: 32, kvHeads: 8,
                   intermediateSize: 14336, vocabSize: 128256, contextLength: 131072, bytesPerParameter: 2}
  serving: {maxConcurrency: 8, contextLength: 16384, workload: {inputTokens: 8192, outputTokens: 256},
            disaggregation: "On"}
YAML
  jp() { kubectl -n "$NS" get "$1" -o jsonpath="$2" 2>/dev/null; }
  pods_of() { kubectl -n "$NS" get pods -l "tessera.dev/deployment=e2e-pd$1" -o name; }
  pools_running() { [ "$(jp mdep/e2e-pd '{.status.conditions[?(@.type=="Disaggregated")].status}')" = True ]; }
  both_roles() { [ "$(jp mdep/e2e-pd '{.status.placements[*].role}' | tr ' ' '\n' | sort -u | tr '\n' ' ')" = 'decode prefill ' ]; }
  pods_in_pools() { [ -n "$(pods_of ,tessera.dev/pool=prefill)" ] && [ -n "$(pods_of ,tessera.dev/pool=decode)" ]; }
  router_exists() { kubectl -n "$NS" get deploy e2e-pd-router >/dev/null 2>&1; }
  service_to_router() { [ "$(jp svc/e2e-pd '{.spec.selector.tessera\.dev/router}')" = e2e-pd ]; }
  pools_ready() { [ "$(jp mdep/e2e-pd '{.status.readyReplicas}')" = "$(jp mdep/e2e-pd '{.status.replicas}')" ]; }
  no_pool_pods() { [ -z "$(pods_of ,tessera.dev/pool)" ]; }
  check "pools running (Disaggregated=True)" "wait_for pools pools_running"
  check "placements in both roles" both_roles
  check "pods labelled with their pool" pods_in_pools
  check "router Deployment in front" "wait_for router router_exists"
  check "the deployment's Service selects the router" service_to_router
  if [ "${REAL_GPUS:-0}" = 1 ]; then
    check "pools ready" "wait_for ready pools_ready 1800"
  fi
  kubectl -n "$NS" patch mdep e2e-pd --type merge -p '{"spec":{"serving":{"disaggregation":"Off"}}}'
  check "Off: the router goes" "wait_for unrouted '! router_exists'"
  check "Off: no pod keeps a pool" "wait_for repooled no_pool_pods 300"
  kubectl -n "$NS" delete mdep e2e-pd --wait
  check "pools: no orphans" "wait_for gc '[ -z \"\$(kubectl -n $NS get pods,svc,deploy -l app.kubernetes.io/instance=e2e-pd -o name)\" ]' 120"
fi
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
