"""What a measurement depends on beyond its settings, and the device errors a run survives.

- :func:`runtime_meta`: the attention kernel each shape of forward pass gets, the float32
  matmul precision, the CPU's instruction set as torch dispatches to it (``AVX2``,
  ``AVX512``, ...) and, on CUDA, the CUDA, cuDNN and driver versions.
- :func:`cpu_name`: the CPU's model name (``/proc/cpuinfo``, else :mod:`platform`).
- :func:`reset_peak_memory` / :func:`peak_memory`: peak device memory over a span (CUDA:
  bytes allocated by tensors; CPU: the process's peak resident set, which never goes down).
- :func:`is_device_error`: a CUDA error other than out-of-memory (a device-side assert, an
  illegal address). After one, the process's CUDA context is unusable: every later CUDA call
  fails, so the process must end; out-of-memory is recoverable (:func:`release_memory`).
"""

from __future__ import annotations

import gc
import platform
import resource
import subprocess
from typing import Any

import torch

from .attention import AttentionPlan, kernel_of, plan
from .kv_cache import KVCache

# The passes a decoder makes: one token, a PLD chain, a full tree, a prefill chunk.
PASS_SHAPES = {"decode": (1, False), "chain": (20, False), "tree": (64, True), "prefill": (512, False)}


def sample_pass(
    model: Any, context: int, num_new: int, is_tree: bool
) -> tuple[AttentionPlan, torch.Tensor, torch.Tensor]:
    """The attention plan of a pass of ``num_new`` tokens (a tree when ``is_tree``: a causal
    tree mask) over ``context`` cached tokens of ``model``, with queries (T, H, D) and keys
    (H_kv, S, D) of its shapes (zeros, on its device, in its dtype; one layer's cache)."""
    cfg, device = model.config, model.device
    cache = KVCache(1, cfg.num_kv_heads, cfg.head_dim, context + num_new, dtype=model.dtype,
                    device=device, mask_rows=num_new)
    cache.length = context
    cache.begin(num_new)
    tree_mask = torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril_()
    attention = plan(cache, tree_mask if is_tree else None, num_new, cfg.num_heads,
                     cfg.head_dim, model.sdpa_backends)
    q = torch.zeros(num_new, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=device)
    return attention, q, cache.buffer[0, 0, :, :context + num_new]


def describe_attention(model: Any, context: int = 4096) -> dict[str, str]:
    """``{"decode": "flash, folded, no mask", ...}``: for each pass of :data:`PASS_SHAPES` over
    ``context`` cached tokens, the kernel SDPA picks under :mod:`logitspec.attention`'s plan,
    the query layout and the mask."""
    shapes = {}
    for name, (num_new, is_tree) in PASS_SHAPES.items():
        attention, q, keys = sample_pass(model, context, num_new, is_tree)
        shapes[name] = f"{kernel_of(attention, q, keys)}, {_layout(attention)}"
    return shapes


def _layout(attention: AttentionPlan) -> str:
    fold = "folded" if attention.choice.fold else "GQA in SDPA"
    mask = {"none": "no mask", "causal": "lower-right causal", "bias": "additive mask"}
    return f"{fold}, {mask[attention.choice.mask]}"


def runtime_meta(model: Any) -> dict[str, Any]:
    """The run's ``meta`` entries that depend on the machine, beyond the settings."""
    meta: dict[str, Any] = {
        "attention": describe_attention(model),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "float32_from": getattr(model, "float32_from", None),
    }
    if model.device.type == "cuda":
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    driver=cuda_driver_version())
    return meta


def cpu_name() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"`` (the first ``model name`` of
    ``/proc/cpuinfo``; :func:`platform.processor` or the architecture where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_driver_version() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it (None when it cannot)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def reset_peak_memory(device: torch.device) -> None:
    """Starts a span for :func:`peak_memory` (CUDA only: the CPU's peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA, the most allocated since :func:`reset_peak_memory`; CPU, the process's
    peak resident set so far (Linux reports it in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory(device: torch.device) -> None:
    """Frees what dropped objects still hold (the failed work after an out-of-memory error,
    once its traceback is gone; a replaced generator's cache) and returns the allocator's
    cached blocks to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_device_error(exc: BaseException) -> bool:
    """A CUDA error that leaves the CUDA context unusable (not an out-of-memory error)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")
