#!/usr/bin/env bash
# End to end: vanilla decoding, LogitSpec decoding, then the speed report of the two.
#
#     bash eval.sh                                   # embedded default model, demo bench
#     MODEL=/path/to/vicuna-7b-v1.3 DTYPE=float16 BENCH=spec_bench bash eval.sh
#
# Settings (environment variables):
#   MODEL                model folder, .gguf file or the default's name (smollm2-135m-instruct)
#   BENCH                bench under data/ (demo)
#   DTYPE                float32, bfloat16 or float16 (bfloat16)
#   DEVICE               cpu or cuda (cuda when available)
#   MAX_NEW_TOKENS       tokens per turn (128)
#   MAX_NGRAM_SIZE       LogitSpec's longest n-gram (3)
#   NUM_PRED_TOKENS      LogitSpec's longest retrieved continuation (20)
#   DRAFT_TREE_CAPACITY  LogitSpec's tokens per verification, root included, or auto (auto:
#                        each tree sized by the measured cost of verification on this device)
#   TEMPERATURE          0.0 is greedy (0.0)
#   QUESTION_BEGIN, QUESTION_END   a slice of the question file (all)
#   ANSWER_DIR           where the answer files go (data/$BENCH/model_answer)
#   EXTRA_ARGS           more flags for both inference commands
#
# Answer files are resumed: a re-run with the same settings only answers what is missing
# (delete the files, or set ANSWER_DIR, to measure again).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh

MODEL="${MODEL:-smollm2-135m-instruct}"
BENCH="${BENCH:-demo}"
DTYPE="${DTYPE:-bfloat16}"
DEVICE="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-128}"
MAX_NGRAM_SIZE="${MAX_NGRAM_SIZE:-3}"
NUM_PRED_TOKENS="${NUM_PRED_TOKENS:-20}"
DRAFT_TREE_CAPACITY="${DRAFT_TREE_CAPACITY:-auto}"
TEMPERATURE="${TEMPERATURE:-0.0}"
ANSWER_DIR="${ANSWER_DIR:-data/$BENCH/model_answer}"
MODEL_NAME="$(basename "$MODEL" .gguf)"
BASE_ID="$MODEL_NAME-vanilla-$DTYPE-temp-$TEMPERATURE"
METHOD_ID="$MODEL_NAME-logitspec-$DTYPE-temp-$TEMPERATURE"

COMMON=(--model-path "$MODEL" --bench-name "$BENCH" --dtype "$DTYPE" --device "$DEVICE"
        --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE")
[ -n "${QUESTION_BEGIN:-}" ] && COMMON+=(--question-begin "$QUESTION_BEGIN")
[ -n "${QUESTION_END:-}" ] && COMMON+=(--question-end "$QUESTION_END")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# Exit code 3 means some questions failed (error entries); the report leaves them out.
failed=0
run() {
    local status=0
    "$@" || status=$?
    if [ "$status" -eq 3 ]; then failed=3; elif [ "$status" -ne 0 ]; then exit "$status"; fi
}

echo "== vanilla decoding -> $ANSWER_DIR/$BASE_ID.jsonl" >&2
run python -m evaluation.inference_baseline "${COMMON[@]}" --model-id "$BASE_ID" \
    --answer-file "$ANSWER_DIR/$BASE_ID.jsonl" "${EXTRA[@]}"

echo "== LogitSpec decoding -> $ANSWER_DIR/$METHOD_ID.jsonl" >&2
run python -m evaluation.inference_logitspec "${COMMON[@]}" --model-id "$METHOD_ID" \
    --answer-file "$ANSWER_DIR/$METHOD_ID.jsonl" --max_ngram_size "$MAX_NGRAM_SIZE" \
    --num_pred_tokens "$NUM_PRED_TOKENS" --draft_tree_capacity "$DRAFT_TREE_CAPACITY" \
    "${EXTRA[@]}"

echo "== speed report" >&2
python evaluation/speed.py --file-path "$ANSWER_DIR/$METHOD_ID.jsonl" \
    --base-path "$ANSWER_DIR/$BASE_ID.jsonl"
exit "$failed"
