#!/usr/bin/env bash
# The serving benchmarks on a GPU of the device tool, in one or more calls (each under its 600 s limit):
#   bash bench/serving_device.sh OUT tests      CUDA tests of the engine's kernels (pytest, tests/unit/serving)
#   bash bench/serving_device.sh OUT arrivals   bench/serving_arrivals.py (continuous arrivals vs static waves)
#   bash bench/serving_device.sh OUT gpu        bench/serving_gpu.py (engine vs warm HF, LoRA, cold loads)
#   bash bench/serving_device.sh OUT quick      bench/serving_gpu.py --quick
#   bash bench/serving_device.sh OUT profile    bench/serving_gpu.py --profile (host time per step, kernel times)
#   bash bench/serving_device.sh OUT kernels    bench/serving_kernels.py (paged-attention launch configs, fused ops)
#   bash bench/serving_device.sh OUT load ARGS  bench/serving_load.py --stack inmemory (random SmolLM2-135M weights,
#                                               its real tokenizer from .whl/tokenizer) ARGS
# Several parts may be given at once (load last). All outputs are packed into OUT/results.tgz at the end.
# The device image has torch, transformers, peft and triton; the project's other dependencies travel as wheels in
# .whl/ (see bench/README.md) and are installed under /tmp/site.
set -u
OUT=${1:?usage: serving_device.sh OUT PART...}
shift
mkdir -p "$OUT"
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
while [ $# -gt 0 ]; do
  part=$1
  shift
  start=$(date +%s)
  case $part in
    tests)
      python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/serving/test_engine_fast.py \
        tests/unit/serving/test_engine.py >"$OUT/tests.log" 2>&1
      ;;
    arrivals)
      python3 bench/serving_arrivals.py --out "$OUT" >"$OUT/arrivals.log" 2>&1
      ;;
    gpu)
      python3 bench/serving_gpu.py --out "$OUT" >"$OUT/gpu.log" 2>&1
      ;;
    quick)
      python3 bench/serving_gpu.py --quick --out "$OUT" >"$OUT/gpu.log" 2>&1
      ;;
    profile)
      python3 bench/serving_gpu.py --profile >"$OUT/profile.log" 2>&1
      ;;
    kernels)
      python3 bench/serving_kernels.py --out "$OUT" >"$OUT/kernels.log" 2>&1
      ;;
    load)
      # The store of adapters (6.5 GB for 10,000 at r=1) goes to a tmpfs when one has room: the device machine's disk
      # wrote it in ~118 s of the 600 s a call may run. The worker's disk tier stays on disk.
      store=()
      if [ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)" -gt 20000000 ] 2>/dev/null; then
        store=(--store-dir /dev/shm/persona-serving-load)
      fi
      python3 bench/serving_load.py "${store[@]}" --stack inmemory --base random:smollm2-135m --tokenizer .whl/tokenizer \
        --device cuda --out "$OUT" "$@" >"$OUT/load.log" 2>&1
      shift $#
      ;;
    *)
      echo "unknown part $part" >&2
      ;;
  esac
  echo "$part rc=$? $(($(date +%s) - start)) s" | tee -a "$OUT/parts.txt"
done
tail -n 5 "$OUT"/*.log
# The device tool brings back at most 8 files: everything goes into results.tgz, and only it and the main reports stay.
tar -C "$OUT" -czf /tmp/results.tgz . && mv /tmp/results.tgz "$OUT/results.tgz"
find "$OUT" -type f ! -name results.tgz ! -name load.log ! -name serving_load.json ! -name serving_load.md \
  ! -name parts.txt -delete
