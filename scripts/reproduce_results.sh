#!/usr/bin/env bash
# The README's results tables: every run, in order, on the machine at hand.
#
#     bash scripts/reproduce_results.sh [OUT_DIR]     # default results/<date>
#
# Needs data/spec_bench (python scripts/prepare_data.py spec_bench --source ...). Runs for
# about two hours on a 2-core CPU; use a quiet machine (timings are ratios within one run, but
# other jobs still add noise). Each step writes its own folder; the last line of every
# compare.py report is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT="${1:-results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
SLICE=(--bench-name spec_bench --questions-per-category 8)

# The verification cost curves (stored: automatic tree budgets use the bfloat16 one).
python scripts/bench_step_cost.py --dtype bfloat16 --store | tee "$OUT/cost-bfloat16.txt"
python scripts/bench_step_cost.py --dtype float32 | tee "$OUT/cost-float32.txt"

# Every method and the ablations, greedy, bfloat16, 48 Spec-Bench questions, 256 tokens.
python scripts/compare.py "${SLICE[@]}" --dtype bfloat16 --max-new-tokens 256 \
    --out-dir "$OUT/compare-bf16" --methods vanilla hf hf-pld:10 pld:21 recycling:64 \
    logitspec:64,tree_policy=reference logitspec:8,tree_policy=reference \
    logitspec:64,recycle_chains=0,num_continuations=1 logitspec:64,recycle_chains=0 \
    logitspec:64 logitspec:auto,recycle_chains=0 logitspec

# Exactness in float32 (64 tokens per turn).
python scripts/compare.py "${SLICE[@]}" --dtype float32 --max-new-tokens 64 \
    --out-dir "$OUT/compare-fp32" --methods vanilla hf-pld:10 pld:21 recycling:64 \
    logitspec:64,tree_policy=reference logitspec

# Sampling: vanilla and LogitSpec at temperatures 0.7 and 1.0, then the speed report.
for T in 0.7 1.0; do
    for M in baseline logitspec; do
        python -m evaluation.inference_$M "${SLICE[@]}" --dtype bfloat16 --max-new-tokens 256 \
            --temperature "$T" --answer-file "$OUT/sampling/$M-temp-$T.jsonl"
    done
    python evaluation/speed.py --file-path "$OUT/sampling/logitspec-temp-$T.jsonl" \
        --base-path "$OUT/sampling/baseline-temp-$T.jsonl" | tee "$OUT/sampling/speed-temp-$T.txt"
done

# Draft-model speculative decoding (layer-skip self-draft, 4 layers): the draft-length
# schedules and the trained acceptance head, 64 tokens per turn.
SPS="$OUT/sps"
python scripts/train_acceptance_head.py --dtype bfloat16 --output "$SPS/head.safetensors" \
    | tee "$SPS-head.txt"
python -m evaluation.inference_baseline "${SLICE[@]}" --dtype bfloat16 --max-new-tokens 64 \
    --answer-file "$SPS/vanilla.jsonl"
for RUN in "constant --draft-schedule constant" "heuristic --draft-schedule heuristic" \
           "confidence --draft-schedule confidence" \
           "head --draft-schedule confidence --acceptance-head $SPS/head.safetensors" \
           "combined --draft-schedule constant --combine-logitspec"; do
    read -r NAME FLAGS <<< "$RUN"
    # shellcheck disable=SC2086
    python -m evaluation.inference_sps "${SLICE[@]}" --dtype bfloat16 --max-new-tokens 64 \
        $FLAGS --answer-file "$SPS/$NAME.jsonl"
    python evaluation/speed.py --file-path "$SPS/$NAME.jsonl" --base-path "$SPS/vanilla.jsonl" \
        | tee "$SPS/speed-$NAME.txt"
done
