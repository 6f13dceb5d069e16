"""Records the shape of every decoding step of real runs: the draft tree (parents) and the
accepted path, per method, so that another machine can replay the same steps through a model
of another size (``scripts/gpu_check.py``'s trace replay) without the real model.

    python scripts/record_tree_shapes.py --questions 8 --max-new-tokens 128 \\
        --methods pld:21 recycling:64 logitspec:64,tree_policy=reference logitspec:64 \\
        --out results/tree-shapes/smollm2-135m-float32.json

Methods are ``scripts/compare.py``'s specs, built as their ``inference_*`` commands build them;
prompts are the harness's (the model's chat template, turns growing as in FastChat); greedy
decoding in float32 by default, so every method emits the same tokens and one vanilla baseline
(a single-token step per token) fits them all. Per turn the file holds the prompt length, the
new tokens, and per step ``[parents, path]``: ``parents[i]`` the parent node of node ``i``
(-1 for the root), ``path`` the accepted nodes from the root. A step's tree comes from the
drafter (wrapped, the decoding loop untouched) and its path from the emitted tokens: node 0,
then at each depth the child holding the next emitted token. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare import COMMANDS, method_params, parse_spec  # noqa: E402
from evaluation.prompts import resolve_template  # noqa: E402
from evaluation.questions import load_questions, select_questions  # noqa: E402
from logitspec.decoding import GenerationConfig, GenerationResult  # noqa: E402
from logitspec.loading import DTYPES, load  # noqa: E402
from logitspec.tree import DraftTree  # noqa: E402

DEFAULT_METHODS = ("pld:21", "recycling:64", "logitspec:64,tree_policy=reference", "logitspec:64")


class TreeRecorder:
    """Wraps a drafter: keeps every tree it drafts, delegates everything else."""

    def __init__(self, drafter: Any) -> None:
        self.drafter = drafter
        self.trees: list[DraftTree] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.drafter, name)

    def draft(self, *args: Any, **kwargs: Any) -> DraftTree:
        tree = self.drafter.draft(*args, **kwargs)
        self.trees.append(tree)
        return tree


def accepted_path(tree: DraftTree, emitted: Sequence[int]) -> list[int]:
    """The nodes whose tokens spell ``emitted`` from the root (the first matching child at
    each depth). Example: parents (-1, 0, 0, 2), tokens (5, 7, 8, 9), emitted [5, 8, 9] ->
    [0, 2, 3]."""
    path = [0]
    for token in emitted[1:]:
        node = next(i for i, p in enumerate(tree.parents)
                    if p == path[-1] and tree.tokens[i] == token)
        path.append(node)
    return path


def turn_steps(trees: Sequence[DraftTree], result: GenerationResult) -> list[list[list[int]]]:
    """``[parents, path]`` of each step that ran a forward pass (the last carried token of a
    turn is emitted without one)."""
    steps, offset = [], 0
    for tree, length in zip(trees, result.accept_lengths):
        path = accepted_path(tree, result.output_ids[offset:offset + length])
        steps.append([list(tree.parents), path])
        offset += length
    return steps


def record(spec_text: str, loaded: Any, questions: Sequence[Any], config: GenerationConfig,
           template: Any) -> list[dict[str, Any]]:
    """Every turn of ``questions`` decoded with the method ``spec_text``."""
    spec = parse_spec(spec_text)
    decoder = COMMANDS[spec.name].METHOD.make_generator(loaded, method_params(spec))
    recorder = TreeRecorder(decoder.drafter)
    decoder.drafter = recorder
    turns = []
    for question in questions:
        decoder.reset()
        conversation = template.start()
        for text in question.turns:
            conversation.add_user(text)
            prompt = conversation.prompt_ids()
            recorder.trees = []
            result = decoder.generate(prompt, config)
            turns.append({"question_id": question.question_id, "prompt_length": len(prompt),
                          "new_tokens": result.new_tokens,
                          "steps": turn_steps(recorder.trees, result)})
            conversation.add_answer(conversation.answer_text(result.output_ids))
    return turns


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--bench-name", default="demo")
    parser.add_argument("--questions", type=int, default=8, help="the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load(args.model_path, dtype=args.dtype, device="cpu")
    questions = select_questions(load_questions(ROOT / "data" / args.bench_name / "question.jsonl"),
                                 0, args.questions, None)
    template = resolve_template(loaded.tokenizer, loaded.name, None)
    eos = tuple(dict.fromkeys(loaded.eos_token_ids + template.stop_token_ids))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    methods = {}
    for spec in args.methods:
        start = time.perf_counter()
        methods[spec] = record(spec, loaded, questions, config, template)
        steps = sum(len(t["steps"]) for t in methods[spec])
        tokens = sum(t["new_tokens"] for t in methods[spec])
        print(f"{spec}: {len(methods[spec])} turns, {tokens} tokens, {steps} steps "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": loaded.name, "dtype": args.dtype,
                               "max_new_tokens": args.max_new_tokens, "methods": methods},
                              separators=(",", ":")))
    print(json.dumps({"out": str(out), "methods": {
        spec: {"turns": len(t), "tokens": sum(x["new_tokens"] for x in t),
               "steps": sum(len(x["steps"]) for x in t)} for spec, t in methods.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
