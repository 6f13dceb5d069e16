"""Timing helpers: wall-clock phases with the device synchronized at their ends."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
