#!/usr/bin/env bash
# One lent-GPU session (bench/README.md): install the carried wheels, check the GPU-only code paths,
# then run the GPU workload config by config, each in its own process with its own time limit.
# Results: $OUT/checks.txt, $OUT/<config>.json, $OUT/log.txt, $OUT/<config>.profile.txt and
# $OUT/<config>.trace.json.gz.
set -u
OUT=${OUT:-/tmp/chatsft-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
    python3 -c "import torch, transformers, trl, datasets, accelerate
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__,
      'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
    [ -n "${SKIP_CHECKS:-}" ] || timeout "${CHECKS_LIMIT:-240}" python3 bench/gpu_checks.py
} 2>&1 | tee "$OUT/checks.txt"
for config in ${CONFIGS:-chatsft-packing chatsft-default chatsft-packing-gc2 trl-packing-nogc trl-default}; do
    start=$(date +%s)
    timeout "${CONFIG_LIMIT:-200}" python3 bench/vs_trl.py --workload gpu \
        --shared "${SHARED:-.gpu/shared_bench}" --configs "$config" --json "$OUT/$config.json" \
        >>"$OUT/log.txt" 2>&1
    rc=$?
    echo "== $config: exit $rc after $(($(date +%s) - start)) s"
    grep -E "^\| $config \|" "$OUT/log.txt" | tail -n 1
done
# A short profiled run (torch.profiler tables by host and device time) after the timed ones.
if [ -n "${PROFILE_CONFIG:-}" ]; then
    timeout "${CONFIG_LIMIT:-200}" python3 bench/vs_trl.py --workload gpu \
        --shared "${SHARED:-.gpu/shared_bench}" --configs "$PROFILE_CONFIG" --steps 9 --warmup 6 \
        --profile "$OUT" >>"$OUT/log.txt" 2>&1
    echo "== profile of $PROFILE_CONFIG: exit $?"
fi
