"""scripts/gpu_check.sh --device cpu: the small version of every section runs and its JSON
summary (the last stdout line) holds what the full check reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "results" / "tree-shapes" / "smollm2-135m-float32.json"
KERNELS = {"flash", "efficient", "math", "cudnn", "unknown"}


def test_cpu_version_reports_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out-dir",
         str(tmp_path / "out"), "--shapes", str(SHAPES)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and not any(
        isinstance(v, dict) and "error" in v for v in summary.values())
    for model in ("tiny-mha", "tiny-gqa"):
        planned = summary["kernels"][model]["planned"]
        assert set(planned) == {"decode", "chain", "tree", "prefill"}
        assert planned["decode"].endswith("folded, no mask")
        assert all(text.split(",")[0] in KERNELS for text in planned.values())
    assert set(summary["growth"]) == {"policy-1", "policy-64"}
    assert all(len(g["ms"]) == 6 and g["median_ms"] > 0 for g in summary["growth"].values())
    assert summary["cost"]["tiny-gqa"]["contexts"] == [64, 256]
    assert {"512", "1024"} <= set(summary["prefill"])
    assert summary["tests"] == {"skipped": "no CUDA device"}
    rows = summary["replay"]["tiny-mha"]
    assert rows["vanilla"]["speedup"] == 1.0 and rows["vanilla"]["mat"] == 1.0
    recorded = json.loads(SHAPES.read_text())["methods"]
    assert set(rows) == {"vanilla", *recorded}
    assert all(r["tokens_per_s"] > 0 and r["steps"] > 0 for r in rows.values())
    assert any(r["mat"] > 1.0 for r in rows.values())  # the recorded trees accept drafts
    report = Path(summary["report"]).read_text()
    assert "## Trace replay" in report and "| vanilla |" in report
