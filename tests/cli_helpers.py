"""Helpers of the command-line tests: a tiny random Llama with an offline byte-level
tokenizer, question files, answer-file reading, and ``main(argv)`` with its exit code."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "question.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_llama(folder: Path, *, max_positions: int = 1024, chat_template: bool = True,
                    reversed_bytes: bool = False) -> Path:
    """A random 2-layer Llama and a byte-level tokenizer (259 tokens: 3 special + 256 bytes).

    ``reversed_bytes`` numbers the 256 byte tokens in reverse: a tokenizer of the same size
    that maps ids to other tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=reversed_bytes)
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_questions(path: Path, questions: Sequence[dict[str, Any] | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(
        (q if isinstance(q, str) else json.dumps(q)) + "\n" for q in questions
    ))
    return path


def run_cli(module: Any, argv: Sequence[str]) -> int:
    """``module.main(argv)``; argparse's exits become return codes."""
    try:
        return module.main(list(argv))
    except SystemExit as exc:
        return int(exc.code)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def save_random_head(folder: Path, path: Path | None = None, seed: int = 0) -> Path:
    """A random draft head for the model in ``folder`` (every token id in its draft
    vocabulary), saved at ``path`` or where ``inference_eagle`` looks for the target's head
    (under the current ``$LOGITSPEC_CACHE``)."""
    import torch

    from logitspec.draft_head import (
        DraftHead, DraftHeadConfig, default_head_path, save_draft_head, target_key,
    )
    from logitspec.loading import load_model

    model = load_model(folder)
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig.for_target(model.config, range(model.config.vocab_size)))
    info = {"target": {"name": folder.name, "key": target_key(model, folder.name)}}
    return save_draft_head(head.attach(model), path or default_head_path(model, folder.name), info)
