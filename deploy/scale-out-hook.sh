#!/usr/bin/env bash
# Scale-out hook: run on a new GPU node before the serving process starts (e.g. a
# Kubernetes initContainer or an autoscaling lifecycle hook). Exits 0 only once the model
# is resident, so the replica starts serving from memory. Retries while the daemon is
# still starting (up to --retry-for seconds).
set -euo pipefail
MODEL_URI=${1:?usage: scale-out-hook.sh s3://bucket/prefix/}
exec tensorferry preload "$MODEL_URI" --wait --retry-for "${TENSORFERRY_HOOK_RETRY:-120}"
