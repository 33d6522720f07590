"""What every part of the GPU check (benchmarks/gpu_check.py) shares: its
settings (dtypes, models, positions), the run's Outcome and a part's
Deadline, and the scopes and counters the parts use (patched with other
settings, unpatched, deterministic, matmul precision, NaN counts)."""

from __future__ import annotations

import contextlib
import gc
import json
import time

import torch

import rope_patch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Small model for compile / graph steps (bf16 on CUDA, fp32 on CPU).
STEP_MODEL = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
NUMERICS_POSITIONS = 32768
#: generate: name -> (label, benchmark model type, config overrides). The
#: llama3 type brings rope_type llama3 (factor 8), theta 5e5, 131072 positions.
GENERATE_MODELS = {
    "qwen3-0.6b": (
        "Qwen3-0.6B-shaped, 28 layers",
        "qwen3",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": True,
        },
    ),
    "llama3-8b": (
        "Llama-3-8B-shaped, 4 of 32 layers",
        "llama3",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 4,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
        },
    ),
}
#: --cpu-smoke: the same models shrunk to seconds on a CPU.
SMOKE_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}
GENERATE_MODES = {
    "eager": "eager, exact bound check (default)",
    "sync_free": "eager, sync_free=True",
    "compile": "static cache, torch.compile(model.forward)",
}
#: Seconds a static-cache compile of a model needs at least (per decoder
#: layer, and fixed), on an H100/H200: the mode is skipped when less is left.
COMPILE_SECONDS = (2.5, 30.0)
GENERATE_PROMPT = 16


def log(line: str = "") -> None:
    print(line, flush=True)


class Outcome:
    """What the run found: failures, incomplete parts, summary lines, table rows."""

    def __init__(self, transformers_version: str, summary_json: str | None = None):
        self.failures: list[str] = []
        self.incomplete: list[str] = []
        self.summary: list[str] = []
        self.rows: list[dict] = []
        self.transformers = transformers_version
        self.summary_json = summary_json

    def fail(self, line: str) -> None:
        self.failures.append(line)
        log(f"FAIL {line}")

    def skip(self, part: str, reason: str, incomplete: bool = True) -> None:
        """A part or a step of it did not run: printed, and counted unless allowed."""
        log(f"SKIPPED {part}: {reason}")
        if incomplete:
            self.incomplete.append(f"{part}: {reason}")

    def check(self, part: str, line: str) -> None:
        """A check's result: a summary line, a row of the "checks" table, and printed."""
        self.summary.append(line)
        self.row("checks", part=part, result=line)
        log(line)

    def row(self, table: str, **cells) -> None:
        """A row of a summary table; appended to ``summary_json`` at once, so
        that a run killed at its time limit keeps what it measured."""
        row = {"table": table, "transformers": self.transformers, **cells}
        self.rows.append(row)
        if self.summary_json:
            with open(self.summary_json, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def status(self) -> int:
        if self.failures:
            return 1
        return 3 if self.incomplete else 0


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def repatched(**kwargs):
    """Patched with ``kwargs`` for the block (unpatch forgets earlier tables);
    patched with defaults again afterwards."""
    if rope_patch.is_patched():
        rope_patch.unpatch()
    if not rope_patch.patch(**kwargs):
        raise RuntimeError(f"rope_patch.patch({kwargs}) did not patch")
    try:
        yield
    finally:
        rope_patch.unpatch()
        rope_patch.patch()


@contextlib.contextmanager
def unpatched_scope():
    """rope_patch fully unpatched for the block (the class's own forward)."""
    was = rope_patch.is_patched()
    if was:
        rope_patch.unpatch()
    try:
        yield
    finally:
        if was:
            rope_patch.patch()


@contextlib.contextmanager
def _torch_setting(read, write, value):
    """Set a global torch setting for the block, then put back what it was."""
    before = read()
    write(value)
    try:
        yield
    finally:
        write(before)


def deterministic():
    return _torch_setting(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, True)


def matmul_precision(value: str):
    return _torch_setting(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, value)


def nan_count(out) -> int:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return sum(int(torch.isnan(t).sum()) for t in tensors if t.is_floating_point())


def numel(out) -> int:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.numel() for t in tensors)


def us(value) -> str:
    return "-" if value is None else f"{value:.1f}"
