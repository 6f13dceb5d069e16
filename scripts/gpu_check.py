"""The GPU check: one command that measures what the GPU path depends on, on one CUDA GPU with
no network, in under 8 minutes; ``--device cpu`` runs a small version of every section (CI).

    bash scripts/gpu_check.sh [--device cuda] [--out-dir DIR] [--shapes FILE]

Sections (each model has random weights of a known shape, made directly on the device,
:func:`logitspec.loading.random_model`; nothing is downloaded):

1. ``environment``: torch, CUDA, cuDNN, driver, GPU, float32 matmul precision.
2. ``kernels``: for each model's heads and dtype at 4,096 cached tokens, the SDPA kernel each
   pass shape gets under :mod:`logitspec.attention` (decode, 20-token chain, 64-node tree,
   512-token prefill chunk), and ``torch.backends.cuda.can_use_{flash,efficient,cudnn}_attention``
   with their reasons for refusing, both for the planned call and for the old one (a boolean
   mask and SDPA's own GQA on every pass).
3. ``growth``: verify step times while the context grows by one token per step (a new key
   length every step: a kernel that builds a graph per shape shows spikes), for 1 token and a
   64-node tree, with the policy's kernels, with cuDNN first, and with cuDNN first under
   ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` (a subprocess: the variable is read once).
4. ``cost``: cost surfaces (ms per verify pass of N tokens at a few context lengths) for
   SmolLM2-135M's, Llama-2-7B's and Llama-3-8B's shapes.
5. ``prefill``: peak memory and time of a 16,384-token prefill (Llama-3-8B's shape with a
   32k context) in 512-token chunks (the decoder's), in 2,048-token chunks and in one pass.
6. ``tests``: ``pytest -m cuda`` (tests/test_cuda.py).
7. ``replay``: trace replay at 7B scale: the trees and accepted paths recorded with the real
   SmolLM2 on a CPU (``scripts/record_tree_shapes.py``, ``--shapes``) drive decoding steps of
   the Llama-2-7B (float16) and Llama-3-8B (bfloat16) shapes over the recorded prompt
   lengths: per method, the projected decoding speed (tokens / GPU time of its steps:
   the verify pass, the read-back of the greedy tokens and 64 top-k ids, the cache
   compaction; drafting on the host is not counted) against vanilla's single-token steps
   (greedy tokens only) for the same tokens.

Writes ``report.md`` and ``summary.json`` in ``--out-dir`` (default
``results/gpu-check-<device>-<time>``); the report is also printed, and the last stdout line
is the summary JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend

from logitspec import decoding
from logitspec.acceptance import read_back
from logitspec.attention import fold, kernel_of
from logitspec.config import ModelConfig
from logitspec.cost import fill_cache, measure_cost_surface
from logitspec.decoding import Decoder, GenerationConfig, verification_inputs
from logitspec.kv_cache import KVCache
from logitspec.loading import RANDOM_SHAPES, random_model
from logitspec.model import Transformer
from logitspec.runtime import (
    cuda_driver_version, describe_attention, peak_memory, release_memory, reset_peak_memory,
    sample_pass,
)
from logitspec.timing import synchronize
from logitspec.tree import DraftTree

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ROOT / "results" / "tree-shapes" / "smollm2-135m-float32.json"
CUDNN_FIRST = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
READ_BACK_TOP_K = 64  # top-k ids read back per step by a replayed method (vanilla: none)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _tiny(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
                       max_position_embeddings=4096)


@dataclasses.dataclass(frozen=True)
class Profile:
    """What each section runs on one kind of device."""

    models: dict[str, tuple[ModelConfig, str]]  # name -> shape, dtype
    growth_model: str
    replay_models: tuple[str, ...]
    context: int  # cached tokens for the kernel report and the growth section
    growth_steps: int
    cost_sizes: tuple[int, ...]
    cost_contexts: tuple[int, ...]
    cost_repeats: int
    prefill_tokens: int
    prefill_chunks: tuple[int, ...]
    replay_turns: int
    replay_steps: int  # at most this many steps per method


CUDA_PROFILE = Profile(
    models={"smollm2-135m": (RANDOM_SHAPES["smollm2-135m"], "bfloat16"),
            "llama-2-7b": (RANDOM_SHAPES["llama-2-7b"], "float16"),
            "llama-3-8b": (RANDOM_SHAPES["llama-3-8b"], "bfloat16")},
    growth_model="llama-3-8b", replay_models=("llama-2-7b", "llama-3-8b"), context=4096,
    growth_steps=40, cost_sizes=(1, 2, 4, 8, 16, 32, 64, 128),
    cost_contexts=(512, 4096, 16384), cost_repeats=5, prefill_tokens=16384,
    prefill_chunks=(512, 2048, 16384), replay_turns=8, replay_steps=100_000,
)
CPU_PROFILE = Profile(
    models={"tiny-mha": (_tiny(4), "float32"), "tiny-gqa": (_tiny(2), "bfloat16")},
    growth_model="tiny-gqa", replay_models=("tiny-mha",), context=256, growth_steps=6,
    cost_sizes=(1, 4, 16), cost_contexts=(64, 256), cost_repeats=2, prefill_tokens=1024,
    prefill_chunks=(512, 1024), replay_turns=1, replay_steps=24,
)


class Report:
    """Lines printed as they come and kept for report.md; results by section."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.summary: dict[str, Any] = {}

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def build(profile: Profile, name: str, device: torch.device, **overrides: Any) -> Transformer:
    config, dtype = profile.models[name]
    return random_model(dataclasses.replace(config, **overrides), dtype=DTYPES[dtype],
                        device=device)


# --------------------------------------------------------------------------- 1. environment


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=cuda_driver_version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


# --------------------------------------------------------------------------- 2. kernels


def _can_use(query: torch.Tensor, keys: torch.Tensor, mask: Any, gqa: bool) -> dict[str, str]:
    """``can_use_*`` of SDPA for these tensors: "yes" or the reasons it gives."""
    checks = {"flash": torch.backends.cuda.can_use_flash_attention,
              "efficient": torch.backends.cuda.can_use_efficient_attention,
              "cudnn": torch.backends.cuda.can_use_cudnn_attention}
    params = torch.backends.cuda.SDPAParams(query, keys, keys, mask, 0.0, False, gqa)
    out = {}
    for name, check in checks.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = check(params, True)
        reasons = "; ".join(" ".join(str(w.message).split()) for w in caught)
        out[name] = "yes" if ok else f"no: {reasons}"[:400]
    return out


def kernels(profile: Profile, device: torch.device, report: Report) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in profile.models:
        model = build(profile, name, device, num_layers=1)
        cfg = model.config
        shapes = describe_attention(model, profile.context)
        entry: dict[str, Any] = {"planned": shapes}
        report.say(f"- {name} ({cfg.num_heads}/{cfg.num_kv_heads} heads, head size "
                   f"{cfg.head_dim}, {model.dtype}), {profile.context} cached tokens:")
        for shape, text in shapes.items():
            report.say(f"  - {shape}: {text}")
        if device.type == "cuda":
            entry["can_use"] = _can_use_report(model, profile.context, report)
        result[name] = entry
        del model
    return result


def _can_use_report(model: Transformer, context: int, report: Report) -> dict[str, Any]:
    """can_use_* for the planned decode and tree calls, and for the old call: unfolded
    queries, a boolean mask and SDPA's own GQA on every pass."""
    cfg = model.config
    out = {}
    for shape, num_new, is_tree in (("decode", 1, False), ("tree", 64, True)):
        planned, q, keys = sample_pass(model, context, num_new, is_tree)
        allowed = torch.ones(num_new, context + num_new, dtype=torch.bool, device=model.device)
        allowed[:, context:].tril_()  # SDPA turns a boolean mask into this additive one
        old_mask = torch.zeros(allowed.shape, dtype=model.dtype, device=model.device)
        old_mask.masked_fill_(~allowed, float("-inf"))
        gqa = cfg.num_heads != cfg.num_kv_heads
        out[shape] = {
            "planned": _can_use(fold(q, cfg.num_kv_heads)[None], keys[None], planned.mask, False),
            "old": _can_use(q.transpose(0, 1)[None], keys[None], old_mask, gqa),
        }
        for which, checks in out[shape].items():
            report.say(f"  - {shape}, {which} call: " + "; ".join(
                f"{k} {v}" for k, v in checks.items()))
    return out


# --------------------------------------------------------------------------- 3. growth


def step_times(model: Transformer, context: int, steps: int, tree_size: int) -> list[float]:
    """ms per verify pass while the cache grows by one token per step (from ``context``)."""
    device, vocab = model.device, model.config.vocab_size
    cache = model.new_cache(context + steps + tree_size, mask_rows=tree_size)
    fill_cache(model, cache, context)
    tree_mask = None
    if tree_size > 1:
        tree_mask = torch.ones(tree_size, tree_size, dtype=torch.bool, device=device).tril_()
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            tokens = torch.randint(vocab, (tree_size,), device=device)
            positions = torch.arange(cache.length, cache.length + tree_size, device=device)
            synchronize(device)
            start = time.perf_counter()
            model(tokens, positions, cache, tree_mask)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
            cache.keep([0])
    return times


def _growth_stats(times: list[float]) -> dict[str, Any]:
    warm = times[2:] or times
    median = statistics.median(warm)
    return {"median_ms": round(median, 3), "max_ms": round(max(warm), 3),
            "spikes": sum(t > 3 * median for t in warm), "ms": [round(t, 3) for t in times]}


def growth(profile: Profile, device: torch.device, report: Report,
           variants: Sequence[str]) -> dict[str, Any]:
    """Step times per variant and tree size; ``variants``: 'policy', 'cudnn'."""
    model = build(profile, profile.growth_model, device)
    result: dict[str, Any] = {}
    for variant in variants:
        model.sdpa_backends = CUDNN_FIRST if variant == "cudnn" else None
        for tree_size in (1, 64):
            stats = _growth_stats(step_times(model, profile.context, profile.growth_steps, tree_size))
            stats["kernel"] = kernel_of(*sample_pass(model, profile.context, tree_size, tree_size > 1))
            key = f"{variant}-{tree_size}"
            result[key] = stats
            report.say(f"- {key} ({stats['kernel']}): median {stats['median_ms']} ms, max "
                       f"{stats['max_ms']} ms, {stats['spikes']} steps over 3x the median")
    model.sdpa_backends = None
    return result


def growth_avoiding_recompiles(args: argparse.Namespace, report: Report) -> dict[str, Any]:
    """The cuDNN-first variant again in a subprocess with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1."""
    env = {**os.environ, "TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}
    command = [sys.executable, str(Path(__file__)), "--device", args.device, "--growth-only",
               "cudnn", "--out-dir", str(Path(args.out_dir) / "avoid-recompile")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode:
        report.say(f"- failed: {done.stderr.strip().splitlines()[-1:]}")
        return {"error": done.stderr.strip()[-400:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    for key, stats in result.items():
        report.say(f"- {key}, AVOID_RECOMPILE=1 ({stats['kernel']}): median {stats['median_ms']}"
                   f" ms, max {stats['max_ms']} ms, {stats['spikes']} steps over 3x the median")
    return result


# --------------------------------------------------------------------------- 4. cost


def cost(profile: Profile, device: torch.device, report: Report) -> dict[str, Any]:
    result = {}
    for name in profile.models:
        model = build(profile, name, device)
        surface = measure_cost_surface(model, profile.cost_sizes, profile.cost_contexts,
                                       repeats=profile.cost_repeats)
        base = surface.curves[0].seconds[0]
        result[name] = {"contexts": list(surface.contexts), "sizes": list(profile.cost_sizes),
                        "ms": [[round(s * 1e3, 3) for s in c.seconds] for c in surface.curves]}
        report.say(f"- {name} ({model.dtype}), ms per pass (x N=1 at {surface.contexts[0]}):")
        report.say("  | N | " + " | ".join(f"ctx {c}" for c in surface.contexts) + " |")
        report.say("  |---|" + "---|" * len(surface.contexts))
        for i, n in enumerate(profile.cost_sizes):
            cells = " | ".join(f"{c.seconds[i] * 1e3:.2f} ({c.seconds[i] / base:.2f})"
                               for c in surface.curves)
            report.say(f"  | {n} | {cells} |")
        del model, surface
        release_memory(device)
    return result


# --------------------------------------------------------------------------- 5. prefill


def prefill(profile: Profile, device: torch.device, report: Report) -> dict[str, Any]:
    tokens = profile.prefill_tokens
    name = profile.growth_model
    model = build(profile, name, device, max_position_embeddings=2 * tokens)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(model.config.vocab_size, (tokens,)).tolist()
    result: dict[str, Any] = {"model": name, "tokens": tokens, "weights_bytes": weights}
    default_chunk = decoding.PREFILL_CHUNK
    try:
        for chunk in profile.prefill_chunks:
            decoding.PREFILL_CHUNK = chunk
            decoder = Decoder(model, capacity=tokens + 8)
            cache_bytes = decoder.cache.buffer.numel() * decoder.cache.buffer.element_size()
            reset_peak_memory(device)
            outcome = decoder.generate(prompt, GenerationConfig(max_new_tokens=1))
            peak = peak_memory(device)
            extra = peak - weights - cache_bytes if device.type == "cuda" else None
            result[str(chunk)] = {"seconds": round(outcome.wall_time, 3), "peak_bytes": peak,
                                  "beyond_weights_and_cache_bytes": extra}
            label = "one pass" if chunk >= tokens else f"chunks of {chunk}"
            more = f", {extra / 2**20:.0f} MiB beyond weights and cache" if extra is not None else ""
            report.say(f"- {name}, {tokens} tokens, {label}: {outcome.wall_time:.2f} s, peak "
                       f"{peak / 2**30:.2f} GiB{more}")
            del decoder
            release_memory(device)
    finally:
        decoding.PREFILL_CHUNK = default_chunk
    return result


# --------------------------------------------------------------------------- 6. tests


def cuda_tests(report: Report) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_cuda.py")]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        report.say("- timed out after 240 s")
        return {"error": "timed out"}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    for line in failures + lines[-1:]:
        report.say(f"- {line}")
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "",
            "failures": failures}


# --------------------------------------------------------------------------- 7. replay


def replay(profile: Profile, device: torch.device, report: Report, shapes: dict) -> dict[str, Any]:
    methods: dict[str, list[dict]] = shapes["methods"]
    first = next(iter(methods.values()))
    result: dict[str, Any] = {"recorded": f"{shapes['model']} {shapes['dtype']}",
                              "turns": min(profile.replay_turns, len(first))}
    for name in profile.replay_models:
        model = build(profile, name, device)
        capacity = max(t["prompt_length"] + t["new_tokens"] for t in first) + 64
        cache = model.new_cache(capacity, mask_rows=64)
        turns = result["turns"]
        runs = {"vanilla": _replay_turns(model, cache, first[:turns], profile.replay_steps, True)}
        for method, recorded in methods.items():
            runs[method] = _replay_turns(model, cache, recorded[:turns], profile.replay_steps, False)
        base = runs["vanilla"]["tokens"] / runs["vanilla"]["seconds"]
        rows = {}
        report.say(f"- {name} ({model.dtype}), {result['turns']} recorded turns:")
        report.say("  | method | MAT | mean tree | steps | tok/s (projected) | speedup |")
        report.say("  |---|---|---|---|---|---|")
        for method, run in runs.items():
            rate = run["tokens"] / run["seconds"]
            rows[method] = {**run, "tokens_per_s": round(rate, 2), "speedup": round(rate / base, 3)}
            report.say(f"  | {method} | {run['mat']:.2f} | {run['mean_tree']:.1f} | {run['steps']} |"
                       f" {rate:.1f} | {rate / base:.2f}x |")
        result[name] = rows
        del model, cache
        release_memory(device)
    return result


def _replay_turns(model: Transformer, cache: KVCache, turns: Sequence[dict], limit: int,
                  vanilla: bool) -> dict:
    """Device seconds of the recorded steps, at most ``limit`` (vanilla: one token per step
    for the same tokens)."""
    device, vocab = model.device, model.config.vocab_size
    seconds, tokens, steps, nodes = 0.0, 0, 0, 0
    with torch.inference_mode():
        for turn in turns:
            cache.reset()
            fill_cache(model, cache, turn["prompt_length"])
            recorded = ([[[-1], [0]]] * (turn["new_tokens"] - 1) if vanilla else turn["steps"])
            for parents, path in recorded[: limit - steps]:
                depths = _depths(parents)
                tree = DraftTree(tuple(torch.randint(vocab, (len(parents),)).tolist()),
                                 tuple(parents), tuple(depths))
                synchronize(device)
                start = time.perf_counter()
                _verify_step(model, cache, tree, path, 0 if vanilla else READ_BACK_TOP_K)
                synchronize(device)
                seconds += time.perf_counter() - start
                tokens += len(path)
                steps += 1
                nodes += len(parents)
    return {"seconds": seconds, "tokens": tokens, "steps": steps,
            "mat": tokens / max(steps, 1), "mean_tree": nodes / max(steps, 1)}


def _verify_step(model: Transformer, cache: KVCache, tree: DraftTree, path: list[int],
                 top_k: int) -> None:
    """One decoding step's device work, as the decoder does it: inputs up, one forward pass,
    the greedy tokens and top-``top_k`` ids read back in one transfer, the path kept."""
    device = model.device
    rows, mask = verification_inputs(tree, cache.length)
    packed = torch.from_numpy(rows).to(device)
    tree_mask = None if mask is None else torch.from_numpy(mask).to(device)
    read_back(model(packed[0], packed[1], cache, tree_mask), top_k)
    cache.keep(path)


def _depths(parents: Sequence[int]) -> list[int]:
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


# --------------------------------------------------------------------------- main


def run_section(report: Report, key: str, title: str, body: Callable[[], Any]) -> None:
    report.say(f"\n## {title}\n")
    start = time.perf_counter()
    try:
        report.summary[key] = body()
    except Exception as exc:  # a failed section is reported; the others still run
        report.summary[key] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        report.say(f"- failed: {report.summary[key]['error']}")
    report.say(f"\n({time.perf_counter() - start:.1f} s)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--shapes", default=str(DEFAULT_SHAPES),
                        help="tree shapes recorded by scripts/record_tree_shapes.py")
    parser.add_argument("--growth-only", default=None, choices=["policy", "cudnn"],
                        help=argparse.SUPPRESS)  # the subprocess of the growth section
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu for the small version)")
    if args.out_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out_dir = str(ROOT / "results" / f"gpu-check-{args.device}-{stamp}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    profile = CUDA_PROFILE if device.type == "cuda" else CPU_PROFILE
    torch.manual_seed(0)
    report = Report()
    if args.growth_only:
        report.summary["growth"] = growth(profile, device, report, [args.growth_only])
        print(json.dumps(report.summary))
        return 0
    start = time.perf_counter()
    report.say(f"# GPU check ({args.device}, {datetime.now().isoformat(timespec='seconds')})")
    cuda = device.type == "cuda"
    run_section(report, "environment", "Environment", lambda: _say_all(report, environment(device)))
    run_section(report, "kernels", "SDPA kernel per pass shape", lambda: kernels(profile, device, report))
    variants = ["policy", "cudnn"] if cuda else ["policy"]
    run_section(report, "growth", "Verify steps as the context grows by one token",
                lambda: growth(profile, device, report, variants))
    if cuda:
        run_section(report, "growth_avoid_recompile", "The same, cuDNN first, "
                    "TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1", lambda: growth_avoiding_recompiles(args, report))
    run_section(report, "cost", "Cost surfaces", lambda: cost(profile, device, report))
    run_section(report, "prefill", "Prefill memory and time", lambda: prefill(profile, device, report))
    if cuda:
        run_section(report, "tests", "CUDA tests (pytest -m cuda)", lambda: cuda_tests(report))
    else:
        report.summary["tests"] = {"skipped": "no CUDA device"}
    shapes = json.loads(Path(args.shapes).read_text())
    run_section(report, "replay", "Trace replay", lambda: replay(profile, device, report, shapes))
    report.summary["seconds"] = round(time.perf_counter() - start, 1)
    report.summary["device"] = args.device
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.summary["report"] = str(out / "report.md")
    (out / "report.md").write_text("\n".join(report.lines) + "\n")
    (out / "summary.json").write_text(json.dumps(report.summary, indent=1))
    print(json.dumps(report.summary))
    return 0


def _say_all(report: Report, info: dict[str, Any]) -> dict[str, Any]:
    for key, value in info.items():
        report.say(f"- {key}: {value}")
    return info


if __name__ == "__main__":
    sys.exit(main())
