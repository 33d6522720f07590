"""The numerics tables are built and checked under."""

from __future__ import annotations

import contextlib

import torch


class _Process:
    #: Set in a child process made by fork(): build on one intra-op thread.
    forked = False


def mark_forked_child() -> None:
    """Called in the child after fork(). OpenMP's thread pool does not
    survive fork: a parallel region in the child waits forever for the
    parent's threads. An unpatched call of a few positions never enters one,
    but building a table does, so the child builds single-threaded (the
    values are the same: the ops are elementwise)."""
    _Process.forked = True


@contextlib.contextmanager
def exact_numerics(device_type: str):
    """Full fp32 precision, no autocast, no autograd, no inference tensors
    (and one intra-op thread in a forked child, see mark_forked_child).

    Tables are built and checked here so that (a) they can serve any later
    grad mode (a table made under inference_mode could not be used in
    training), and (b) they hold exact values even when the user enabled TF32
    matmuls, which round positions above 2048 in the transformers 4.x batched
    matmul (transformers #48428).
    """
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")
    threads = torch.get_num_threads() if _Process.forked else 1
    if threads != 1:
        torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.no_grad())
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)
        if threads != 1:
            torch.set_num_threads(threads)
