"""Shared fixtures: tiny random HF checkpoints (Llama, Qwen2 and their flag variants) and the
embedded SmolLM2-135M-Instruct in float32."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (derandomized), so that a failure in CI
# repeats on any machine; HYPOTHESIS_PROFILE=explore draws new ones each run, and a failing
# example is printed as a @reproduce_failure blob either way.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# LOGITSPEC_TEST_THREADS=1 on a machine shared with other jobs: OpenMP threads competing with
# other processes made a SmolLM2 forward 20x slower (4.4 s instead of 0.22 s).
if os.environ.get("LOGITSPEC_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["LOGITSPEC_TEST_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))

# Shapes small enough for milliseconds per forward, with GQA (4 query heads, 2 KV heads).
TINY_SHAPES: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (architecture, config overrides). Every flag our loader maps is covered once.
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": (
        "llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    ),
    "llama-rope-llama3": (
        "llama",
        {
            # original context 64 and head_dim 16 put wavelengths in all three llama3 bands
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Seeded random weights, norms around 1 and biases included, so logits are far from
    uniform (HF's default init gives near-constant logits that would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(std * noise)


def build_tiny_hf(arch: str, folder: Path, *, seed: int = 0, **overrides: Any):
    """An HF model of ``arch`` ('llama' or 'qwen2') with seeded random weights, saved as
    safetensors in ``folder``. Returns the model (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(TINY_SHAPES)
    kwargs.update(overrides)
    if arch == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    elif arch == "qwen2":
        kwargs.pop("head_dim", None)  # Qwen2 derives it: 64 / 4 = 16
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session", autouse=True)
def _private_cost_curves(tmp_path_factory: pytest.TempPathFactory):
    """Cost curves measured by tests (tiny models, busy machines) stay out of the user's cache;
    converted models are shared with it (the default model is converted once, not per run)."""
    from logitspec.loading import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    private = tmp_path_factory.mktemp("logitspec-cache")
    (private / "models").symlink_to(models, target_is_directory=True)
    previous = os.environ.get("LOGITSPEC_CACHE")
    os.environ["LOGITSPEC_CACHE"] = str(private)
    yield private
    if previous is None:
        del os.environ["LOGITSPEC_CACHE"]
    else:
        os.environ["LOGITSPEC_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Callable[..., tuple[Any, Path]]:
    """Factory ``tiny_hf(arch='llama', seed=0, **config_overrides) -> (hf_model, folder)``;
    cached per argument set for the whole session (do not modify what it returns)."""
    made: dict[str, tuple[Any, Path]] = {}

    def make(arch: str = "llama", *, seed: int = 0, **overrides: Any) -> tuple[Any, Path]:
        key = repr((arch, seed, sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = (build_tiny_hf(arch, folder, seed=seed, **overrides), folder)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_hf_llama(tiny_hf) -> Callable[..., tuple[Any, Path]]:
    """``tiny_hf_llama(**overrides) -> (LlamaForCausalLM, folder)``."""
    return lambda **overrides: tiny_hf("llama", **overrides)


@pytest.fixture(scope="session")
def tiny_hf_qwen2(tiny_hf) -> Callable[..., tuple[Any, Path]]:
    """``tiny_hf_qwen2(**overrides) -> (Qwen2ForCausalLM, folder)``."""
    return lambda **overrides: tiny_hf("qwen2", **overrides)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    """Our float32 Transformer on the plain tiny Llama's weights."""
    from logitspec.loading import load_model

    _, folder = tiny_hf("llama")
    return load_model(folder, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_f32():
    """SmolLM2-135M-Instruct in float32 (a LoadedModel), converted once into the cache dir."""
    from logitspec.loading import load

    return load(None, dtype="float32")
