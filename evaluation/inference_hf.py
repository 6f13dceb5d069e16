"""HF transformers ``generate`` as a reference method: plain decoding (``hf``) or HF's prompt
lookup decoding (``hf-pld``, ``--prompt-lookup N``). ``python -m evaluation.inference_hf
--help`` lists the flags.

The checkpoint is the loaded model's folder (safetensors only, no remote code), in the run's
dtype and device. Policies:

- Settings: only the run's (``max_new_tokens``, greedy or ``temperature``/``top_p``/``top_k``,
  the EOS ids of the model and template); the checkpoint's ``generation_config.json`` is
  ignored, as by our decoders. Sampling seeds torch's global generator with the run's seed.
- Tokens: the output is cut after its first EOS (kept), so ``new_tokens`` counts as ours do.
- Steps: every forward call of the model is one decoding step (prefill included, as our
  first step's token comes from the prefill); its accepted length is read from the KV cache
  lengths HF leaves between calls (:func:`steps_from_calls`), so plain ``generate`` gives
  ``[1] * n`` and prompt lookup its true per-call counts.
- Time: ``wall_time`` is the ``generate`` call (device synchronized); no phase breakdown.
- Turns: HF re-prefills the whole conversation every turn (``reset`` has nothing to forget),
  where our decoders prefill only the new turn: second turns cost HF more.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from logitspec.decoding import GenerationConfig, GenerationResult, PromptTooLongError
from logitspec.loading import LoadedModel
from logitspec.timing import synchronize

from . import eval_loop
from .args import option, parse_args
from .methods import Method


@dataclass(frozen=True)
class HFParams:
    """The HF method's flags."""

    prompt_lookup: int | None = option(
        None, "HF prompt lookup decoding with prompt_lookup_num_tokens=N (default: plain "
        "generate)", type=int)

    def __post_init__(self) -> None:
        if self.prompt_lookup is not None and self.prompt_lookup < 1:
            raise ValueError(f"prompt_lookup must be >= 1, got {self.prompt_lookup}")


def load_hf_model(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """``AutoModelForCausalLM`` from ``folder`` (safetensors, no remote code), in eval mode,
    with a default generation config (the checkpoint's defaults do not apply)."""
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise eval_loop.RunError(f"cannot load {folder} with transformers: {first_line}") from None
    model.generation_config = HFGenerationConfig()
    return model.to(device).eval()


def steps_from_calls(
    calls: Sequence[tuple[int, int]], prompt_len: int, new_tokens: int
) -> tuple[list[int], list[int]]:
    """Accepted and drafted tokens per forward call, from ``(cached, inputs)`` per call: the
    KV cache length before the call and the number of tokens it was fed.

    Between calls HF keeps in the cache every emitted token but the last, so the text after
    call ``i`` (all but the last call) is ``cached[i + 1] + 1`` tokens long; the first call
    starts from the prompt and the last one ends at ``prompt_len + new_tokens``. A call is fed
    the uncached text's last token(s) plus its drafts.

    Example: prompt 61, calls (0, 66), (61, 1), (62, 6), (68, 1), 9 new tokens: texts 61 ->
    62 -> 63 -> 69 -> 70, so accepted [1, 1, 6, 1]; drafted [5, 0, 5, 0].
    """
    if not calls:
        raise RuntimeError("no forward call of the HF model was seen")
    ends = [c + 1 for c, _ in calls[1:]] + [prompt_len + new_tokens]
    starts = [prompt_len] + ends[:-1]
    accepted = [end - start for start, end in zip(starts, ends)]
    drafted = [cached + inputs - start for (cached, inputs), start in zip(calls, starts)]
    if min(accepted) < 1 or min(drafted) < 0:
        raise RuntimeError(f"unexpected HF cache lengths {list(calls)} for {new_tokens} tokens")
    return accepted, drafted


def _record_call(calls: list[tuple[int, int]], module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the cache length and the number of input tokens of one call."""
    cache = kwargs.get("past_key_values")
    inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
    calls.append((cache.get_seq_length() if cache is not None else 0, inputs.shape[-1]))


def _cut_at_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


class HFGenerator:
    """A :class:`~evaluation.methods.TurnGenerator` over ``hf_model.generate``."""

    def __init__(self, hf_model: Any, pad_token_id: int, prompt_lookup: int | None = None) -> None:
        self.model = hf_model
        self.pad_token_id = pad_token_id
        self.prompt_lookup = prompt_lookup
        self.max_context = hf_model.config.max_position_embeddings

    def reset(self, keep_prefix: bool = False) -> None:
        """Nothing to forget: every turn is generated from scratch (no prefix is ever
        cached, so ``keep_prefix`` changes nothing)."""

    def _hf_config(self, config: GenerationConfig) -> Any:
        from transformers import GenerationConfig as HFGenerationConfig

        sampling = {} if config.greedy else dict(
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        return HFGenerationConfig(
            max_new_tokens=config.max_new_tokens, do_sample=not config.greedy,
            eos_token_id=list(config.eos_token_ids), pad_token_id=self.pad_token_id,
            prompt_lookup_num_tokens=self.prompt_lookup, disable_compile=True, **sampling,
        )

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> GenerationResult:
        prompt = [int(t) for t in prompt_ids]
        if len(prompt) + config.max_new_tokens > self.max_context:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {config.max_new_tokens} "
                f"exceeds the model's context of {self.max_context} tokens"
            )
        device = self.model.device
        input_ids = torch.tensor([prompt], device=device)
        hf_config = self._hf_config(config)
        calls: list[tuple[int, int]] = []
        hook = self.model.register_forward_pre_hook(partial(_record_call, calls), with_kwargs=True)
        try:
            if not config.greedy:
                torch.manual_seed(config.seed)
            synchronize(device)
            start = time.perf_counter()
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=hf_config)
            synchronize(device)
            wall_time = time.perf_counter() - start
        finally:
            hook.remove()
        output = _cut_at_eos(out[0, len(prompt):].tolist(), config.eos_token_ids)
        accepted, drafted = steps_from_calls(calls, len(prompt), len(output))
        stop = "eos" if output and output[-1] in config.eos_token_ids else "length"
        return GenerationResult(output, accepted, drafted, stop, wall_time=wall_time)


def pad_token_id(loaded: LoadedModel) -> int:
    """The tokenizer's padding id, else the first EOS id (HF needs one; batch size 1 never
    pads)."""
    pad = loaded.tokenizer.pad_token_id
    return pad if pad is not None else (loaded.eos_token_ids or (0,))[0]


def make_generator(loaded: LoadedModel, params: HFParams) -> HFGenerator:
    model = load_hf_model(loaded.path, loaded.model.dtype, loaded.model.device)
    return HFGenerator(model, pad_token_id(loaded), params.prompt_lookup)


METHOD = Method(
    name="hf",
    prog="inference_hf",
    description="Answer a question file with HF transformers generate (a reference).",
    params_type=HFParams,
    make_generator=make_generator,
)
PLD_METHOD = Method(
    name="hf-pld",
    prog="inference_hf",
    description=METHOD.description,
    params_type=HFParams,
    make_generator=make_generator,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``hf``, or ``hf-pld`` (in model ids and meta) with ``--prompt-lookup``."""
    params = parse_args(METHOD, argv).params  # bad flags: one line, exit 2
    return eval_loop.main(PLD_METHOD if params.prompt_lookup else METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
