"""Shared helpers for benchmarks: device description, git commit, and the JSON result file."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Any

# benchmarks/results/ of a source checkout; elsewhere the current directory's benchmarks/results
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(_REPO if os.path.isdir(os.path.join(_REPO, "benchmarks")) else os.getcwd(),
                       "benchmarks", "results")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def git_commit() -> str:
    if os.environ.get("QWEN3CODER_COMMIT"):
        return os.environ["QWEN3CODER_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None,
                 out_dir: str | None = None) -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {"name": name, "device": device_name(), "date": now.isoformat(timespec="seconds"),
              "commit": git_commit(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              **(extra or {}), "metrics": metrics}
    out_dir = out_dir or os.environ.get("QWEN3CODER_RESULTS", RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{now.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))
    return path
