#!/usr/bin/env bash
# Make kind's worker nodes look like 8x H100 GPU nodes: GPU Feature Discovery labels and an
# nvidia.com/gpu capacity (extended resources can be patched onto the node status).
set -euo pipefail
for node in $(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name); do
  name=${node#node/}
  kubectl label --overwrite "$node" \
    nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 nvidia.com/gpu.count=8 nvidia.com/gpu.memory=81559 \
    topology.kubernetes.io/zone=zone-a tessera.dev/fabric.block=block-1 tessera.dev/fabric.rack=rack-1
  kubectl patch node "$name" --subresource=status --type=json \
    -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"8"}]'
done
kubectl get nodes -L nvidia.com/gpu.product
