#!/usr/bin/env bash
# LogitSpec against the training-free peers on the machine at hand, as the README's peer tables
# were made:
#
#     bash scripts/compare_peers.sh [OUT_DIR]      # default results/peers-<date>
#
# 1. the verification cost surfaces (bfloat16 and float32, stored: automatic budgets read them);
# 2. a greedy bfloat16 trace of the slice, replayed through every peer at tree budgets 2 to 64
#    (scripts/simulate_drafters.py): each peer's best budget on this machine is the one with the
#    highest estimated speedup;
# 3. one interleaved bfloat16 run, 256 tokens per turn, REPEATS passes: vanilla, LogitSpec's
#    defaults and each peer at the budget step 2 chose (BEST_BUDGETS, edit after reading step 2);
# 4. one interleaved float32 run, 64 tokens per turn: every method at its published settings
#    (exactness against vanilla, and what those settings cost here);
# 5. the same on the pkgdocs workload (long shared context, scripts/prepare_data.py pkgdocs).
#
# QPC (questions per category, default 8: the 48-question slice), REPEATS (2) and PKG_QPC (8)
# scale it down. Needs data/spec_bench and data/pkgdocs (scripts/prepare_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT="${1:-results/peers-$(date +%Y%m%d-%H%M%S)}"
QPC="${QPC:-8}"
REPEATS="${REPEATS:-2}"
PKG_QPC="${PKG_QPC:-8}"
BEST_BUDGETS="${BEST_BUDGETS:-pld:3 recycling:2 racer:2 sam:2 suffix:65}"
PUBLISHED="pld:21 recycling:64 racer:64 sam:64 suffix:65 lookahead"
mkdir -p "$OUT"
SLICE=(--bench-name spec_bench --questions-per-category "$QPC")

python scripts/bench_step_cost.py --dtype bfloat16 --store | tee "$OUT/cost-bfloat16.txt"
python scripts/bench_step_cost.py --dtype float32 --store | tee "$OUT/cost-float32.txt"

python scripts/simulate_drafters.py record "${SLICE[@]}" --max-new-tokens 256 \
    --dtype bfloat16 --out "$OUT/traces-bf16.pt"
DRAFTERS=()
for peer in pld recycling racer sam suffix; do
    for n in 2 3 5 8 16 64; do DRAFTERS+=(--drafter "$peer:$n"); done
done
python scripts/simulate_drafters.py replay --trace "$OUT/traces-bf16.pt" "${DRAFTERS[@]}" \
    --drafter "logitspec:auto,conts=3,rec=8,recd=6,suf,branches,suftok=32" \
    --drafter "logitspec:auto,conts=3,rec=8,recd=6" \
    --drafter "logitspec:64,value,conts=3,rec=8,recd=6,suf,branches,suftok=32" | tee "$OUT/replay-budgets.txt"

# shellcheck disable=SC2086  # the budget lists are word lists on purpose
python scripts/compare.py "${SLICE[@]}" --dtype bfloat16 --max-new-tokens 256 \
    --repeats "$REPEATS" --out-dir "$OUT/compare-bf16" --methods vanilla logitspec $BEST_BUDGETS
# shellcheck disable=SC2086
python scripts/compare.py "${SLICE[@]}" --dtype float32 --max-new-tokens 64 \
    --out-dir "$OUT/compare-fp32" --methods vanilla logitspec logitspec:64 $PUBLISHED
# shellcheck disable=SC2086
python scripts/compare.py --bench-name pkgdocs --questions-per-category "$PKG_QPC" \
    --dtype float32 --max-new-tokens 128 --out-dir "$OUT/pkgdocs-fp32" \
    --methods vanilla logitspec $PUBLISHED
echo "peer comparison written to $OUT"
