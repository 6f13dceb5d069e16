"""Offline drafter evaluation on recorded greedy traces: exact MAT, estimated speedup.

Greedy verification accepts a draft node exactly when its path spells the target's own greedy
continuation, and LogitSpec only reads the target's top-k at accepted positions. So one
vanilla run that records, per generated token, the token and the top-k ids of the logit that
chose it is enough to replay any retrieval drafter exactly, without the model:

    python scripts/simulate_drafters.py record --bench-name spec_bench --questions-per-category 8 \
        --max-new-tokens 256 --dtype bfloat16 --out results/traces-bf16.pt
    python scripts/simulate_drafters.py replay --trace results/traces-bf16.pt \
        --drafter pld:8 --drafter logitspec:64 --drafter logitspec:auto

Replay reports MAT per category (exact for the recorded outputs) and a speedup estimated from
the measured cost surface (a verify forward of N tokens at the step's context length) plus the
drafter's own measured host time. The last stdout line is one JSON object.
``--pass-cost-factors`` replays on a machine whose passes cost more or less than the stored
surface says (per tree size, e.g. as fitted to a real run's answer files); drafters with live
costs (``logitspec:auto,live``) are told each pass's cost and correct their curve.

Lookahead decoding cannot be replayed: its n-grams are the target's outputs at the Jacobi
window's guesses, inputs that a greedy trace never saw; measure it with the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from logitspec.acceptance import TargetOutput, greedy_accept
from logitspec.cost import CostCurve, cost_surface_for, float32_from_for, parse_float32_from
from logitspec.decoding import Decoder, GenerationConfig
from logitspec.drafters import Drafter
from logitspec.loading import load
from logitspec.recycling import SuccessorTable
from logitspec.tree import DraftTree

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
TOP_K = 64


@dataclass
class TurnTrace:
    question_id: int | str
    category: str
    prompt: list[int]
    output: list[int]
    topk: torch.Tensor  # (len(output), TOP_K) int32: top-k ids of the logit choosing output[i]
    max_new_tokens: int


def group_of(category: str) -> str:
    return "multi-turn conversation" if category in MT_BENCH else category


def select_questions(path: Path, begin: int, end: int | None, per_category: int | None) -> list[dict]:
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    questions = questions[begin:end]
    if per_category is None:
        return questions
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for q in questions:
        group = group_of(q["category"])
        if seen[group] < per_category:
            seen[group] += 1
            kept.append(q)
    return kept


class _Recorder:
    """A drafter that proposes nothing and records the top-k of every step's last logit."""

    name = "recorder"
    tree_capacity = 1
    top_k = TOP_K
    needs_hidden = False

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def configure(self, config) -> None:
        pass

    def begin(self, context, reused, hidden=None) -> None:
        self.rows = []

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        self.rows.append(torch.from_numpy(root_topk[:TOP_K].astype(np.int32)))
        return DraftTree((root,), (-1,), (0,))

    def observe(self, tree, logits) -> None:
        pass

    def extend(self, tokens, tree, path) -> None:
        pass


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def record(args: argparse.Namespace) -> int:
    lm = load(args.model_path, dtype=args.dtype, device=args.device)
    float32_from_for(lm.model, str(lm.path), args.float32_from)
    questions = select_questions(
        Path(args.question_file or f"data/{args.bench_name}/question.jsonl"),
        args.question_begin, args.question_end, args.questions_per_category,
    )
    recorder = _Recorder()
    decoder = Decoder(lm.model, recorder)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=lm.eos_token_ids)
    traces: list[TurnTrace] = []
    for n, q in enumerate(questions):
        decoder.reset()
        messages: list[dict] = []
        for turn in q["turns"]:
            messages.append({"role": "user", "content": turn})
            prompt = chat_ids(lm.tokenizer, messages)
            result = decoder.generate(prompt, config)
            rows = recorder.rows + [torch.full((TOP_K,), -1, dtype=torch.int32)]
            traces.append(TurnTrace(q["question_id"], q["category"], prompt, result.output_ids,
                                    torch.stack(rows[: result.new_tokens]), args.max_new_tokens))
            text = lm.tokenizer.decode(result.output_ids, skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": text})
        print(f"[{n + 1}/{len(questions)}] question {q['question_id']} ({q['category']})", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"traces": [t.__dict__ for t in traces], "model": lm.name, "dtype": args.dtype,
                "model_path": str(lm.path), "device": args.device}, args.out)
    print(json.dumps({"out": args.out, "turns": len(traces), "tokens": sum(len(t.output) for t in traces)}))
    return 0


@dataclass
class ReplayedTurn:
    """A drafter on one recorded turn: per step its accept length, its verified inputs and the
    context length before the step; its host time in all."""

    accept_lengths: list[int]
    tree_sizes: list[int]
    contexts: list[int]
    host: float


def replay_turn(drafter: Drafter, trace: TurnTrace,
                pass_seconds: Callable[[int, int], float] | None = None) -> ReplayedTurn:
    """``drafter`` on one recorded turn, step by step, as the decoding loop would run it.
    ``pass_seconds(tokens, context)``: what a verification pass costs, told to the drafter
    as the decoding loop tells it the time it measured (None: not told)."""
    out, n = trace.output, len(trace.output)
    topk = trace.topk.numpy().astype(np.int64)
    drafter.begin(trace.prompt, 0)
    turn = ReplayedTurn([], [], [], 0.0)
    i = 0
    while i < n:
        turn.contexts.append(len(trace.prompt) + i)
        if i == n - 1:
            turn.accept_lengths.append(1)
            turn.tree_sizes.append(0)
            break
        start = time.perf_counter()
        tree = drafter.draft(out[i], topk[i], trace.max_new_tokens - i - 1)
        pred, rows = trace_outputs(tree, out, i, topk)
        path = greedy_accept(tree.tokens, tree.parents, pred)
        seconds = pass_seconds(tree.num_inputs, len(trace.prompt) + i) if pass_seconds else None
        drafter.observe(tree, TargetOutput(None, rows, seconds=seconds))
        drafter.extend(out[i:i + len(path)], tree, path)
        turn.host += time.perf_counter() - start
        turn.accept_lengths.append(len(path))
        turn.tree_sizes.append(tree.num_inputs)
        i += len(path)
    return turn


def trace_outputs(tree: DraftTree, out: Sequence[int], start: int,
                   topk: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The target's greedy token after each node and its top-k row: known for the nodes on
    the recorded path (-1 and rows of -1 elsewhere, aux inputs included)."""
    pred = [-1] * len(tree)
    rows = np.full((tree.num_inputs, topk.shape[1]), -1, dtype=np.int64)
    on_trace = [False] * len(tree)
    for node in range(len(tree)):
        parent, depth = tree.parents[node], tree.depths[node]
        if node == 0 or (on_trace[parent] and start + depth < len(out) and tree.tokens[node] == out[start + depth]):
            on_trace[node] = True
            if start + depth + 1 < len(out):
                pred[node] = out[start + depth + 1]
                rows[node] = topk[start + depth + 1]
    return pred, rows


def make_drafter(spec: str, curve: CostCurve | None, vocab_size: int = 49152) -> Drafter:
    """``pld:<capacity>``, ``recycling:<capacity>``, ``logitspec:<capacity>`` or
    ``logitspec:auto``, options after commas: ``ngram=3,pred=20,conts=1`` (pool), ``nomerge``,
    ``value`` (value-ranked tree), ``k=32`` (next-next candidates), ``max=64`` (auto's largest
    tree), ``len=8`` (value chain length), ``rec=8,recd=6`` (recycled chains and their depth),
    ``recb=4`` (each recycled node's 4 best successors below the first level), ``succ=2,hops=2``
    (below every other node its 2 best remembered successors, 2 levels down), ``match``
    (next-token chains valued by their match length), ``suf`` (suffix trees' drafts),
    ``suftok=32`` (most tokens per suffix-tree draft), ``branches`` (with ``suf``: the
    per-question tree's drafts at its other match lengths too), ``grow`` (with ``suf``: each
    node valued by the match it extends), ``agree`` (first tokens valued by how many sources
    propose them), ``live`` (auto: the cost curve
    corrected by the pass times it is told, see ``--pass-cost-factors``).
    ``sam:<capacity>``: SAMD[T] as ``inference_sam`` builds it (automaton drafts of
    ``min(40, capacity)`` tokens, Token Recycling on ``capacity`` nodes), options ``size=40``
    (automaton draft), ``thr=5``, ``bias=5``, ``alone`` (no fallback), ``scale=4`` (drafts sized
    by the match), ``earliest`` (no walk to roomier suffixes).

    ``racer:<capacity>``: RACER, options ``ngram=10,nodes=10000,breadth=8``.
    ``suffix:<capacity>`` (SuffixDecoding, published settings), options ``chain`` (chain mode),
    ``depth=64``, ``factor=1.0``, ``offset=0``, ``prob=0.1``, ``cached=100000``.
    ``rest:<capacity>,store=FILE`` (REST, published settings; ``store=A.npz+B.npz`` for
    several datastores), options ``span=16``, ``min=2``, ``matches=5000``, ``len=10``.

    Token Recycling, recycled chains and RACER learn successors from the trace, which knows the
    target's top-k on the recorded path only (the real run also learns from rejected nodes,
    and RACER from every prompt position)."""
    from logitspec.drafters import LogitSpecConfig, PoolConfig, PromptLookupDrafter, make_logitspec_drafter
    from logitspec.racer import RacerConfig, RacerDrafter
    from logitspec.recycling import RecyclingConfig, TokenRecyclingDrafter

    kind, _, rest = spec.partition(":")
    fields = rest.split(",") if rest else ["64"]
    capacity, options = fields[0], dict(f.partition("=")[::2] for f in fields[1:])
    if kind == "suffix":
        return _suffix_drafter(int(capacity), options)
    if kind == "rest":
        return _rest_drafter(int(capacity), options)
    pool = PoolConfig(int(options.get("ngram", 3)), int(options.get("pred", 20)),
                      int(options.get("conts", 1)))
    if kind == "pld":
        return PromptLookupDrafter(pool, int(capacity))
    if kind == "recycling":
        return TokenRecyclingDrafter(RecyclingConfig(int(capacity)), SuccessorTable(vocab_size))
    if kind == "racer":
        racer = RacerConfig(int(capacity), int(options.get("ngram", 10)),
                            int(options.get("nodes", 10_000)), int(options.get("breadth", 8)))
        return RacerDrafter(racer, SuccessorTable(vocab_size, racer.max_breadth))
    if kind == "logitspec":
        auto = capacity == "auto"
        config = LogitSpecConfig(
            pool=pool, draft_tree_capacity=None if auto else int(capacity),
            merge_prefixes="nomerge" not in options,
            tree_policy="value" if auto or "value" in options else "reference",
            num_next_next=int(options["k"]) if "k" in options else None,
            max_auto_capacity=int(options.get("max", 64)),
            value_chain_length=int(options.get("len", 8)),
            recycle_chains=int(options.get("rec", 0)),
            recycle_depth=int(options.get("recd", 4)),
            recycle_breadth=int(options.get("recb", 1)),
            successor_children=int(options.get("succ", 0)),
            successor_hops=int(options.get("hops", 2)),
            match_lengths="match" in options,
            suffix_trees="suf" in options,
            suffix_tokens=int(options.get("suftok", LogitSpecConfig.suffix_tokens)),
            suffix_branches="branches" in options,
            suffix_grow="grow" in options,
            live_costs="live" in options,
            agreement="agree" in options,
        )
        successors = SuccessorTable(vocab_size) if config.recycle_chains else None
        return make_logitspec_drafter(config, curve, successors)
    if kind == "sam":
        return _make_sam_drafter(int(capacity), options, vocab_size)
    if kind == "lookahead":
        raise ValueError("lookahead cannot be replayed from a greedy trace: its n-grams are the "
                         "target's outputs at the window's guesses (run inference_lookahead)")
    raise ValueError(f"unknown drafter spec {spec!r}")


def _make_sam_drafter(capacity: int, options: dict[str, str], vocab_size: int) -> Drafter:
    from logitspec.recycling import RecyclingConfig
    from logitspec.sam import SamConfig, SamDrafter

    config = SamConfig(
        draft_size=min(int(options.get("size", 40)), capacity),
        threshold=int(options.get("thr", 5)),
        static_bias=int(options.get("bias", 5)),
        fallback="alone" not in options,
        recycling=RecyclingConfig(capacity),
        match_scale=float(options["scale"]) if "scale" in options else None,
        roomier_suffix="earliest" not in options,
    )
    return SamDrafter(config, None, SuccessorTable(vocab_size, config.recycling.k))


def _suffix_drafter(capacity: int, options: dict[str, str]) -> Drafter:
    from logitspec.suffix_decoding import SuffixConfig, SuffixDecodingDrafter

    return SuffixDecodingDrafter(SuffixConfig(
        draft_tree_capacity=capacity, mode="chain" if "chain" in options else "tree",
        max_depth=int(options.get("depth", 64)), max_spec_factor=float(options.get("factor", 1.0)),
        max_spec_offset=float(options.get("offset", 0.0)),
        min_token_prob=float(options.get("prob", 0.1)),
        max_cached_answers=int(options.get("cached", 100_000)),
    ))


def _rest_drafter(capacity: int, options: dict[str, str]) -> Drafter:
    from logitspec.rest import Datastore, RestConfig, RestDrafter

    if "store" not in options:
        raise ValueError("a rest spec needs store=FILE (scripts/build_rest_datastore.py)")
    return RestDrafter([Datastore.load(f) for f in options["store"].split("+")], RestConfig(
        draft_tree_capacity=capacity, max_span=int(options.get("span", 16)),
        min_span=int(options.get("min", 2)), max_matches=int(options.get("matches", 5000)),
        continuation_length=int(options.get("len", 10)),
    ))


def load_traces(path: str) -> tuple[dict, list[TurnTrace]]:
    """The trace file's header (model, dtype, ...) and its turns."""
    data = torch.load(path, weights_only=True)
    return data, [TurnTrace(**t) for t in data["traces"]]


def replay(args: argparse.Namespace) -> int:
    data, traces = load_traces(args.trace)
    lm = load(data["model_path"], dtype=data["dtype"], device=args.device)
    float32_from_for(lm.model, str(lm.path), args.float32_from)
    curve = cost_surface_for(lm.model, str(lm.path))
    vocab = lm.model.config.vocab_size
    factors = args.pass_cost_factors

    def pass_cost(tokens: int, context: int) -> float:
        factor = next((f for size, f in reversed(factors) if size <= tokens), 1.0)
        return curve.at(context).cost(tokens) * factor

    told = pass_cost if factors else None
    report = {}
    for spec in args.drafter:
        rows = defaultdict(lambda: {"tokens": 0, "steps": 0, "time": 0.0, "vanilla": 0.0, "host": 0.0})
        drafter = make_drafter(spec, curve, vocab)  # one per run, as in the harness: statistics persist
        for trace in traces:
            turn = replay_turn(drafter, trace, told)
            verify = sum(pass_cost(s, c) for s, c in zip(turn.tree_sizes, turn.contexts) if s)
            vanilla = sum(pass_cost(1, len(trace.prompt) + j) for j in range(len(trace.output) - 1))
            for key in (group_of(trace.category), "overall"):
                row = rows[key]
                row["tokens"] += sum(turn.accept_lengths)
                row["steps"] += len(turn.accept_lengths)
                row["time"] += verify + turn.host
                row["host"] += turn.host
                row["vanilla"] += vanilla
        report[spec] = {k: {"mat": r["tokens"] / r["steps"], "speedup": r["vanilla"] / r["time"],
                            "host_share": r["host"] / r["time"]} for k, r in rows.items()}
    _print_report(report)
    print(json.dumps({"trace": args.trace, "model": data["model"], "dtype": data["dtype"], "report": report}))
    return 0


def _print_report(report: dict) -> None:
    categories = list(next(iter(report.values())).keys())
    width = max(len(s) for s in report) + 2
    print(f"{'drafter':<{width}}" + "".join(f"{c[:14]:>16}" for c in categories))
    for spec, rows in report.items():
        cells = "".join(f"{rows[c]['mat']:>8.2f} {rows[c]['speedup']:>5.2f}x " for c in categories)
        print(f"{spec:<{width}}{cells}")
    print("(cells: MAT, estimated speedup)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run vanilla greedy decoding and record traces")
    rec.add_argument("--model-path", default=None)
    rec.add_argument("--bench-name", default="demo")
    rec.add_argument("--question-file", default=None)
    rec.add_argument("--question-begin", type=int, default=0)
    rec.add_argument("--question-end", type=int, default=None)
    rec.add_argument("--questions-per-category", type=int, default=None)
    rec.add_argument("--max-new-tokens", type=int, default=256)
    rec.add_argument("--dtype", default="bfloat16")
    rec.add_argument("--device", default="cpu")
    rec.add_argument("--out", required=True)
    rep = sub.add_parser("replay", help="replay drafters on recorded traces")
    for sub_parser in (rec, rep):
        sub_parser.add_argument(
            "--float32-from", type=parse_float32_from, default="auto",
            help="passes of at least N tokens in float32 (N, off or auto, as the inference "
                 "commands; replay prices passes by the surface of this setting)")
    rep.add_argument("--trace", required=True)
    rep.add_argument("--drafter", action="append", required=True)
    rep.add_argument("--device", default="cpu")
    rep.add_argument(
        "--pass-cost-factors", nargs="+", type=size_factor, default=[], metavar="SIZE=FACTOR",
        help="what a verification pass really costs, as a multiple of the stored surface, from "
        "that tree size up (e.g. 1=0.965 2=1.15 3=1.08, as fitted to a real run's answer files); "
        "the estimate uses them and the drafters are told each pass's cost")
    args = parser.parse_args(argv)
    if args.command == "replay":
        args.pass_cost_factors = sorted(args.pass_cost_factors)
    return args


def size_factor(text: str) -> tuple[int, float]:
    """``SIZE=FACTOR``, e.g. ``2=1.15``."""
    size, sep, factor = text.partition("=")
    try:
        if sep and int(size) >= 1 and float(factor) > 0:
            return int(size), float(factor)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected SIZE=FACTOR (size >= 1, factor > 0), got {text!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return record(args) if args.command == "record" else replay(args)


if __name__ == "__main__":
    sys.exit(main())
