"""Concurrency under load: 8 threads x 1,000 forwards with mixed dtypes,
modules and positions on shared modules; every result equals the unpatched
one and nothing raises."""

import random
import threading

import torch

from tests.conftest import assert_identical, unpatched
from tests.models import llama_rotary


def test_eight_threads_thousand_forwards_each(patched):
    modules = [
        llama_rotary(),
        llama_rotary({"rope_type": "linear", "factor": 2.0}),
        # The dynamic type rewrites inv_freq on every call that crosses
        # max_position_embeddings, which is not thread-safe in transformers
        # itself; positions stay below it here so the reference is stable.
        llama_rotary({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=200_000),
    ]
    positions = [
        torch.tensor([[5]]),
        torch.tensor([[0], [700], [3]]),
        torch.arange(40)[None],
        torch.randint(0, 4000, (2, 9), generator=torch.Generator().manual_seed(0)),
        torch.tensor([[-1, 2]]),
        torch.tensor([[3, 100_000]]),
    ]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    cases = []
    for module in modules:
        for pos in positions:
            for dtype in dtypes:
                x = torch.randn(pos.shape[0], pos.shape[1], 8).to(dtype)
                cases.append((module, x, pos, unpatched(module, x, pos)))
    errors, counts = [], [0] * 8
    start = threading.Barrier(8)

    def worker(index):
        rng = random.Random(index)
        try:
            start.wait()
            for _ in range(1000):
                module, x, pos, expected = rng.choice(cases)
                assert_identical(expected, module(x, pos))
                counts[index] += 1
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert counts == [1000] * 8
