#!/usr/bin/env bash
# Regenerates every figure in docs/benchmarks.md, one interleaved run per table:
#
#     scripts/bench_report.sh [OUT]        # default OUT=build/bench-report; about 7 minutes on 2 CPU cores
#
# It exports the demo model (checked) and CvT-13 with random weights (timing only), then runs
#   1. cvt-bench on the demo bundle                 -> OUT/demo.{txt,json,csv,png}
#   2. cvt-bench on the CvT-13 bundle               -> OUT/cvt13.{txt,json,csv,png}
#   3. scripts/compare_graphs.py on CvT-13          -> OUT/graphs.txt (portable vs ONNX Runtime CPU graphs)
#   4. cvt-serve + cvt-bench --url on CvT-13        -> OUT/served.{txt,json,png} (served vs in-process)
# and writes the machine it ran on to OUT/machine.txt.
#
# Environment: THREADS (default 2) threads for every backend and the server; PORT (default 8000)
# the server's HTTP port (PORT+1 gRPC, PORT+2 metrics); PYTHON (default python) the interpreter
# with cvt-deploy installed; the cvt-* commands are taken from PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/bench-report}
THREADS=${THREADS:-2}
PORT=${PORT:-8000}
PY=${PYTHON:-python}
mkdir -p "$OUT"

# The machine: CPU model, cores, the vector/matrix features the int8 and fp32 kernels use.
{
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cpus usable: $(nproc)"
  echo "features: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -xE 'avx2|fma|avx512f|avx512_vnni|avx_vnni|avx512_bf16|avx512_fp16|amx_bf16|amx_int8' | tr '\n' ' ')"
  echo "l3: $(lscpu 2>/dev/null | sed -n 's/^L3 cache: *//p')"
  echo "gpu: $(nvidia-smi -L 2>/dev/null | head -1 || true)"
  "$PY" -c "import platform, numpy, torch, onnxruntime, transformers; print('versions: python', platform.python_version(), \
'numpy', numpy.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

# The bundles. CvT-13 gets random weights with non-zero biases and BatchNorm statistics (a trained
# model has both; the default initialisation has neither); --no-check: they have no accuracy to check.
cvt-export --precision fp32,fp16,int8 --out "$OUT/demo" 2>&1 | tee "$OUT/export-demo.txt"
"$PY" scripts/random_weights.py cvt-13 "$OUT/cvt13-random.safetensors"
cvt-export --model cvt-13 --weights "$OUT/cvt13-random.safetensors" --precision fp32,fp16,int8 --no-check \
  --calib-count 64 --calib-cache "$OUT/calib" --out "$OUT/cvt13" 2>&1 | tee "$OUT/export-cvt13.txt"

# 1, 2: every backend x precision x batch, against PyTorch eager and Hugging Face transformers.
cvt-bench --bundle "$OUT/demo" --batch 1,8 --threads "$THREADS" \
  --save "$OUT/demo.json" --save "$OUT/demo.csv" --plot "$OUT/demo.png" | tee "$OUT/demo.txt"
cvt-bench --bundle "$OUT/cvt13" --batch 1,8 --threads "$THREADS" --min-time 4 \
  --save "$OUT/cvt13.json" --save "$OUT/cvt13.csv" --plot "$OUT/cvt13.png" | tee "$OUT/cvt13.txt"

# 3: each ONNX graph of the CvT-13 bundle by name (cvt-bench times the one load() picks).
"$PY" scripts/compare_graphs.py "$OUT/cvt13" --batch 1,8 --threads "$THREADS" | tee "$OUT/graphs.txt"

# 4: CvT-13 fp32 served by Triton against the same bundle in-process, in the same rounds.
cvt-serve --bundle "$OUT/cvt13" --backend onnxruntime --precision fp32 --threads "$THREADS" --host 127.0.0.1 \
  --http-port "$PORT" --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  grep -q '^ready' "$OUT/serve.log" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
grep -q '^ready' "$OUT/serve.log" || { echo "cvt-serve did not start; see $OUT/serve.log" >&2; exit 1; }
cvt-bench --url "http://127.0.0.1:$PORT" --metrics-url "http://127.0.0.1:$((PORT + 2))/metrics" \
  --bundle "$OUT/cvt13" --threads "$THREADS" --concurrency 1,2,4,8,16 --batch 1,8,32 --min-time 10 --rounds 3 \
  --save "$OUT/served.json" --plot "$OUT/served.png" | tee "$OUT/served.txt"
echo "wrote $OUT"
