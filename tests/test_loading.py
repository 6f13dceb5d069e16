"""The loader: clear errors for what it refuses, sharded checkpoints, config spellings of
transformers 4.x and 5.x, the cache directory, GGUF conversion reuse, end-of-sequence ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from logitspec import loading
from logitspec.config import ModelConfig, RopeConfig, UnsupportedModelError
from logitspec.loading import (
    ModelLoadError,
    cache_dir,
    eos_token_ids,
    load_model,
    parse_dtype,
    resolve_model_path,
)

HF_BASE = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def logits_of(model, n: int = 20) -> torch.Tensor:
    ids = torch.arange(n) % model.config.vocab_size
    with torch.inference_mode():
        return model(ids, torch.arange(n), model.new_cache(n))


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_model_type(tiny_hf, tmp_path):
    folder = copy_checkpoint(tiny_hf("llama")[1], tmp_path / "ckpt")
    edit_config(folder, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        load_model(folder)


def test_missing_tensor(tiny_hf, tmp_path):
    folder = copy_checkpoint(tiny_hf("llama")[1], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError,
                       match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_model(folder)


def test_wrong_tensor_shape(tiny_hf, tmp_path):
    folder = copy_checkpoint(tiny_hf("llama")[1], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has "
                       r"shape \(64, 64\), expected \(128, 64\)"):
        load_model(folder)


def test_pickle_checkpoint_refused(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_hf("llama")[1] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors files \(found pytorch_model\.bin: "
                       "pickle checkpoints are not loaded"):
        load_model(folder)


def test_missing_and_odd_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(tmp_path / "empty")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="neither a checkpoint folder nor a .gguf file"):
        resolve_model_path(tmp_path / "weights.txt")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize(
    "text, message",
    [
        (json.dumps({k: v for k, v in HF_BASE.items() if k != "hidden_size"}),
         "lacks the field 'hidden_size'"),
        ("{not json", "cannot read"),
    ],
    ids=["missing-field", "bad-json"],
)
def test_bad_config_json(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path)


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        parse_dtype("float8")


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints


def test_sharded_checkpoint_loads_the_same(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf("llama")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((sharded / s).is_file() for s in shards)
    assert torch.equal(logits_of(load_model(sharded)), logits_of(load_model(folder)))


def test_index_names_the_files_read(tiny_hf, tmp_path):
    """With an index, only the shards it names are read (a stray file is ignored)."""
    hf_model, _ = tiny_hf("llama")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    save_file({"model.norm.weight": torch.zeros(64)}, sharded / "zz-stray.safetensors")
    model = load_model(sharded)
    assert not torch.equal(model.norm.weight, torch.zeros(64))


# ---------------------------------------------------------------------------------------------
# Config spellings


@pytest.mark.parametrize(
    "v4, v5",
    [
        ({"rope_theta": 500000.0},
         {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
        ({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 4.0}},
         {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}),
        ({"rope_theta": 5e5, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
         {"rope_parameters": {
             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
             "rope_theta": 5e5}}),
        ({"rope_scaling": None}, {"rope_parameters": {"rope_type": "default"}}),
    ],
    ids=["theta-only", "linear", "llama3", "nothing"],
)
def test_rope_spellings_agree(v4, v5):
    old = ModelConfig.from_hf({**HF_BASE, **v4})
    new = ModelConfig.from_hf({**HF_BASE, **v5})
    assert old.rope == new.rope
    expected_theta = v4.get("rope_theta", 10000.0)
    assert new.rope.theta == expected_theta


def test_llama3_rope_fields_are_read():
    rope = ModelConfig.from_hf({**HF_BASE, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
        "original_max_position_embeddings": 1024, "rope_theta": 5e5}}).rope
    assert rope == RopeConfig(theta=5e5, kind="llama3", factor=8.0, low_freq_factor=2.0,
                              high_freq_factor=3.0, original_max_position_embeddings=1024)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"model_type": "mistral", "sliding_window": 128}, "sliding-window attention"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
         "sliding-window attention"),
        ({"model_type": "gpt_neox"}, "model_type 'gpt_neox'"),
    ],
    ids=["yarn", "dynamic", "mistral-window", "qwen2-window", "neox"],
)
def test_refused_configs(changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf({**HF_BASE, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096},
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 64},
    ],
    ids=["mistral-no-window", "window-covers-context", "qwen2-window-off"],
)
def test_windows_that_never_bind_are_accepted(changes):
    assert ModelConfig.from_hf({**HF_BASE, **changes}).model_type == changes["model_type"]


@pytest.mark.parametrize(
    "changes, flags",
    [
        ({}, (False, False, False)),
        ({"model_type": "qwen2"}, (True, False, False)),
        ({"attention_bias": True}, (True, True, False)),
        ({"mlp_bias": True}, (False, False, True)),
    ],
    ids=["llama", "qwen2", "llama-attention-bias", "llama-mlp-bias"],
)
def test_bias_flags(changes, flags):
    config = ModelConfig.from_hf({**HF_BASE, **changes})
    assert (config.attention_bias, config.attention_out_bias, config.mlp_bias) == flags


def test_config_defaults_derived():
    config = ModelConfig.from_hf({**HF_BASE, "num_key_value_heads": None})
    assert config.num_kv_heads == 4 and config.head_dim == 16
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf({**HF_BASE, "num_key_value_heads": 3})


# ---------------------------------------------------------------------------------------------
# Cache directory and GGUF conversion


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LOGITSPEC_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "logitspec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "logitspec"


def fake_gguf(folder: Path, name: str = "Tiny.Q4.gguf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"GGUF" + bytes(range(64)))
    return path


def test_gguf_converted_once_then_reused(monkeypatch, tmp_path, tiny_hf):
    """A GGUF path is converted into $LOGITSPEC_CACHE once; later calls reuse the folder."""
    _, checkpoint = tiny_hf("llama")
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        for item in checkpoint.iterdir():
            shutil.copy(item, out)

    monkeypatch.setattr(loading, "_write_converted", convert)
    gguf = fake_gguf(tmp_path / "models")
    first = resolve_model_path(gguf)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("Tiny.Q4-")
    assert (first / "config.json").is_file() and len(calls) == 1
    assert resolve_model_path(gguf) == first and len(calls) == 1
    assert resolve_model_path(gguf.parent) == first and len(calls) == 1  # folder with one .gguf
    assert list(first.parent.iterdir()) == [first]  # no staging folder left behind
    assert torch.equal(logits_of(load_model(first)), logits_of(load_model(checkpoint)))


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))

    def fail(gguf: Path, out: Path) -> None:
        (out / "partial.safetensors").write_bytes(b"x")
        raise ModelLoadError(f"cannot read GGUF file {gguf}: broken")

    monkeypatch.setattr(loading, "_write_converted", fail)
    with pytest.raises(ModelLoadError, match="broken"):
        resolve_model_path(fake_gguf(tmp_path / "models"))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unreadable_gguf_message(monkeypatch, tmp_path):
    """The real conversion path, on a file transformers cannot parse."""
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        resolve_model_path(fake_gguf(tmp_path / "models", "broken.gguf"))


def test_two_ggufs_in_a_folder_is_ambiguous(tmp_path):
    fake_gguf(tmp_path, "a.gguf")
    fake_gguf(tmp_path, "b.gguf")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(tmp_path)


@pytest.mark.slow
def test_default_model_resolves_to_the_converted_folder(monkeypatch, smollm2_f32):
    """The default name resolves to a converted folder; resolving again converts nothing."""
    def refuse(gguf: Path, out: Path) -> None:
        raise AssertionError("the converted folder should have been reused")

    monkeypatch.setattr(loading, "_write_converted", refuse)
    for name in (None, *loading.DEFAULT_MODEL_NAMES):
        folder = resolve_model_path(name)
        assert folder == smollm2_f32.path and (folder / "config.json").is_file()
    assert smollm2_f32.name == loading.DEFAULT_MODEL
    tok = smollm2_f32.tokenizer
    assert tok.convert_tokens_to_ids("<|im_end|>") in smollm2_f32.eos_token_ids
    assert smollm2_f32.model.config.num_layers == 30


# ---------------------------------------------------------------------------------------------
# End-of-sequence ids


@pytest.mark.parametrize(
    "generation_config, tokenizer_eos, expected",
    [
        ({"eos_token_id": [5, 7]}, 7, (5, 7)),
        ({"eos_token_id": [5, 7]}, 9, (5, 7, 9)),
        ({"eos_token_id": 3}, 9, (3, 9)),
        ({"eos_token_id": 3}, 3, (3,)),
        ({"eos_token_id": None}, 4, (4,)),
        ({"bos_token_id": 1}, None, ()),
        (None, 8, (8,)),
        (None, None, ()),
    ],
    ids=["list", "list-plus-tokenizer", "int", "int-same", "null", "absent-key", "no-file",
         "nothing"],
)
def test_eos_token_ids(tmp_path, generation_config, tokenizer_eos, expected):
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    got = eos_token_ids(tmp_path, SimpleNamespace(eos_token_id=tokenizer_eos))
    assert got == expected


@pytest.mark.parametrize(
    "config, expected",
    [({"torch_dtype": "float16"}, "float16"), ({"dtype": "bfloat16"}, "bfloat16"),
     ({"torch_dtype": "float32", "dtype": "bfloat16"}, "float32"), ({"torch_dtype": "auto"}, None),
     ({"torch_dtype": "int8"}, None), ({}, None)],
    ids=["transformers-4", "transformers-5", "both", "auto", "not-a-model-dtype", "none"],
)
def test_checkpoint_dtype(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps({**HF_BASE, **config}))
    assert loading.checkpoint_dtype(tmp_path) == expected


def test_checkpoint_dtype_is_none_without_a_checkpoint_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for path in (None, "smollm2-135m-instruct", tmp_path / "model.gguf", tmp_path / "missing"):
        assert loading.checkpoint_dtype(path) is None


def test_load_and_the_cli_default_to_the_checkpoint_dtype(tmp_path):
    from cli_helpers import save_tiny_llama
    from evaluation.args import EvalConfig

    folder = save_tiny_llama(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert loading.load(folder).model.dtype == torch.bfloat16
    assert loading.load(folder, dtype="float32").model.dtype == torch.float32
    assert EvalConfig(model_path=str(folder), device="cpu").resolved_dtype == "bfloat16"
    assert EvalConfig(model_path=str(folder), dtype="float16").resolved_dtype == "float16"
    assert EvalConfig(device="cpu").resolved_dtype == "float32"  # the embedded model: as before


def test_random_model_is_made_in_its_dtype():
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    model = loading.random_model(config, dtype=torch.bfloat16, device="cpu", seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq[0] == 1.0
    assert model.lm_head.weight is model.embed.weight  # still tied after allocation
    assert torch.equal(model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert 0.015 < model.embed.weight.float().std().item() < 0.025
    again = loading.random_model(config, dtype=torch.bfloat16, device="cpu", seed=3)
    assert torch.equal(model.layers[1].mlp.w2.weight, again.layers[1].mlp.w2.weight)
    assert torch.isfinite(model(torch.arange(5), torch.arange(5), model.new_cache(8))).all()
