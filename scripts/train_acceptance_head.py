"""Trains an acceptance-prediction head for the ``confidence`` draft schedule (SpecDec++).

    python scripts/train_acceptance_head.py --draft-layers 8 --output heads/smollm2-l8.safetensors
        [--model-path P] [--draft-model-path D] [--question-file F] [--max-new-tokens 128]
        [--hidden-units 64] [--epochs 300] [--reject-weight W] [--holdout 0.25]

Data: the first turn of every question (default ``data/demo/question.jsonl``) is answered
greedily by the target (sped up by the draft: same tokens). Over prompt + answer, one forward
pass of each model gives, at every position that predicts an answer token, the draft's final
hidden state and whether the draft's argmax equals the target's: a greedy draft token is
accepted exactly when it does. Questions are split in file order; the last ``--holdout``
fraction is held out.

Training: full-batch Adam on a weighted binary cross-entropy; rejected examples weigh
``--reject-weight`` (default: accepted count / rejected count, which balances the classes, as
SpecDec++ up-weights the rarer mismatches). Reported: accuracy (threshold 0.5) and ROC AUC on
both parts. The head is saved as safetensors with a JSON config beside it
(:func:`logitspec.draft_length.save_acceptance_head`); the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))

from evaluation.prompts import resolve_template  # noqa: E402
from evaluation.questions import QuestionFileError, load_questions  # noqa: E402
from logitspec.decoding import Decoder, GenerationConfig  # noqa: E402
from logitspec.draft_length import AcceptanceHead, save_acceptance_head  # noqa: E402
from logitspec.draft_model import (  # noqa: E402
    DEFAULT_DRAFT_LAYERS, DraftMismatchError, DraftModelDrafter, load_draft_models,
)
from logitspec.loading import DTYPES, ModelLoadError, load  # noqa: E402

DEFAULT_QUESTIONS = ROOT / "data" / "demo" / "question.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="the target (default: the embedded model)")
    parser.add_argument("--draft-model-path", default=None, help="a separate draft model")
    parser.add_argument("--draft-layers", type=int, default=None,
                        help="layer-skip self-draft depth (default without --draft-model-path: "
                        f"{DEFAULT_DRAFT_LAYERS})")
    parser.add_argument("--question-file", default=str(DEFAULT_QUESTIONS))
    parser.add_argument("--num-questions", type=int, default=None, help="first N questions only")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hidden-units", type=int, default=64, help="0: a linear head")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--reject-weight", type=float, default=None,
                        help="loss weight of rejected examples (default: balance the classes)")
    parser.add_argument("--holdout", type=float, default=0.25, help="fraction of questions held out")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="where the head goes (.safetensors)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error("--output must end with .safetensors")
    if not 0 <= args.holdout < 1 or args.epochs < 1 or args.max_new_tokens < 1:
        parser.error("--holdout must be in [0, 1); --epochs and --max-new-tokens >= 1")
    if args.draft_layers is None and args.draft_model_path is None:
        args.draft_layers = DEFAULT_DRAFT_LAYERS
    return args


@torch.inference_mode()
def collect_pairs(target: Any, draft: Any, prompt: list[int], max_new_tokens: int,
                  eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, hidden) and labels (N,) (1.0 = accepted) over one greedy answer."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos))
    answer = Decoder(target, DraftModelDrafter(draft)).generate(prompt, config).output_ids
    seq = prompt + answer
    ids = torch.tensor(seq, device=target.device)
    positions = torch.arange(len(seq), device=target.device)
    target_pred = target(ids, positions, target.new_cache(len(seq))).argmax(-1)
    hidden = draft.hidden(ids, positions, draft.new_cache(len(seq)))
    draft_pred = draft.lm_head(hidden).argmax(-1)
    rows = slice(len(prompt) - 1, len(seq) - 1)  # each predicts an answer token
    labels = (draft_pred[rows] == target_pred[rows]).float()
    return hidden[rows].float().cpu(), labels.cpu()


def train_head(features: torch.Tensor, labels: torch.Tensor, hidden_units: int, epochs: int,
               lr: float, reject_weight: float, seed: int) -> AcceptanceHead:
    """Full-batch Adam on BCE with rejected examples weighted by ``reject_weight``."""
    torch.manual_seed(seed)
    head = AcceptanceHead(features.shape[1], hidden_units)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    weights = torch.where(labels > 0.5, 1.0, reject_weight)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(features), labels, weight=weights)
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """P(score of an accepted example > score of a rejected one), ties counted half; None
    without both classes."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def evaluate(head: AcceptanceHead, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    if not len(labels):
        return {"examples": 0}
    with torch.no_grad():
        scores = head.probability(features)
    return {
        "examples": len(labels),
        "accepted_rate": round(float(labels.mean()), 4),
        "accuracy": round(float(((scores > 0.5).float() == labels).float().mean()), 4),
        "auc": None if (auc := roc_auc(scores, labels)) is None else round(auc, 4),
    }


def prompts_for(loaded: Any, question_file: str, limit: int | None) -> list[list[int]]:
    """First turns of the question file, rendered with the target's chat template."""
    template = resolve_template(loaded.tokenizer, loaded.name, None)
    prompts = []
    for question in load_questions(Path(question_file))[:limit]:
        conversation = template.start()
        conversation.add_user(question.turns[0])
        prompts.append(conversation.prompt_ids())
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = load(args.model_path, dtype=args.dtype, device=args.device)
        paths = [args.draft_model_path] if args.draft_model_path else []
        layers = [args.draft_layers] if args.draft_layers else []
        (draft,) = load_draft_models(target, paths, layers, dtype=args.dtype, device=args.device)
        prompts = prompts_for(target, args.question_file, args.num_questions)
    except (ModelLoadError, DraftMismatchError, QuestionFileError, ValueError) as exc:
        print(f"train_acceptance_head: error: {exc}", file=sys.stderr)
        return 2
    pairs = [collect_pairs(target.model, draft, p, args.max_new_tokens, target.eos_token_ids)
             for p in prompts]
    split = max(1, round(len(pairs) * (1 - args.holdout))) if args.holdout else len(pairs)
    x_train = torch.cat([x for x, _ in pairs[:split]])
    y_train = torch.cat([y for _, y in pairs[:split]])
    accepted = float(y_train.sum())
    weight = args.reject_weight or accepted / max(len(y_train) - accepted, 1.0)
    head = train_head(x_train, y_train, args.hidden_units, args.epochs, args.lr, weight, args.seed)
    held = pairs[split:]
    report = {
        "train": evaluate(head, x_train, y_train),
        "holdout": evaluate(head, torch.cat([x for x, _ in held]) if held else x_train[:0],
                            torch.cat([y for _, y in held]) if held else y_train[:0]),
        "reject_weight": round(weight, 4),
    }
    info = {"target": str(args.model_path or target.name), "draft_model_path": args.draft_model_path,
            "draft_layers": args.draft_layers, "question_file": args.question_file, **report}
    path = save_acceptance_head(head, args.output, info)
    print(f"train: {report['train']}\nholdout: {report['holdout']}\nsaved {path}")
    print(json.dumps({"output": str(path), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
