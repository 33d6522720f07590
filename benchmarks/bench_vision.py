"""What a table would save on a vision rotary, per image forward.

Vision rotaries (Qwen2.5-VL's and ~30 others on transformers 5.x) are called
once per vision-tower forward, on per-patch (h, w) coordinates. This builds a
random-weight vision tower shaped like Qwen2.5-VL-7B's (depth 32, hidden
1280, 16 heads, patch 14, spatial merge 2; ``--depth`` to shorten it), feeds
one image of ``--image`` pixels square, and times, on one thread:

- the whole vision forward (median of ``--rounds``);
- the rotary's forward on that image's coordinates, as the tower calls it
  (median of many calls);
- the floor of a table: two gathers of the same output size (what any
  table would still pay).

The saving a table could bring per image is at most rotary - floor.

    python benchmarks/bench_vision.py [--depth 32] [--image 448] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_us(function, calls: int, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        start = time.thread_time_ns()
        for _ in range(calls):
            function()
        times.append((time.thread_time_ns() - start) / calls / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--image", type=int, default=448, help="image side in pixels (multiple of 28)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    torch.set_num_threads(1)
    config = transformers.Qwen2_5_VLConfig().vision_config
    # Qwen2.5-VL-7B's vision tower (its config.json): the class defaults differ.
    config.hidden_size, config.intermediate_size, config.num_heads, config.out_hidden_size = 1280, 3420, 16, 3584
    config.depth = args.depth
    config.fullatt_block_indexes = [i for i in config.fullatt_block_indexes if i < args.depth]
    torch.manual_seed(0)
    tower = modeling.Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()
    side = args.image // config.patch_size
    grid = torch.tensor([[1, side, side]])
    patches = side * side
    pixels = torch.randn(patches, config.in_channels * config.temporal_patch_size * config.patch_size**2)

    rotary = tower.rotary_pos_emb
    seen = {}
    original_forward = type(rotary).forward

    def recording(self, *inputs):
        seen["inputs"] = inputs
        return original_forward(self, *inputs)

    type(rotary).forward = recording
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
    finally:
        type(rotary).forward = original_forward
    inputs = seen["inputs"]
    with torch.no_grad():
        out = rotary(*inputs)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        rows = outputs[0].reshape(-1, outputs[0].shape[-1]).shape[0]
        tables = [o.reshape(rows, -1).contiguous() for o in outputs]
        index = torch.arange(rows)
        vision_ms = []
        for _ in range(args.rounds):
            start = time.thread_time_ns()
            tower(pixels, grid_thw=grid)
            vision_ms.append((time.thread_time_ns() - start) / 1e6)
        rotary_us = median_us(lambda: rotary(*inputs), 200)
        floor_us = median_us(lambda: [torch.embedding(t, index) for t in tables], 200)
    vision = statistics.median(vision_ms)
    saving = max(rotary_us - floor_us, 0.0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, one thread")
    print(
        f"Qwen2.5-VL-shaped vision tower: depth {args.depth}, hidden {config.hidden_size}, "
        f"one {args.image}x{args.image} "
        f"image = {patches} patches; rotary called once per forward"
    )
    print(f"vision forward:          {vision:10.1f} ms (median of {args.rounds})")
    print(f"rotary forward:          {rotary_us:10.1f} us ({rotary_us / 1e3 / vision:.4%} of the vision forward)")
    print(f"table floor (2 gathers): {floor_us:10.1f} us")
    print(f"most a table could save: {saving:10.1f} us per image = {saving / 1e3 / vision:.4%} of the vision forward")


if __name__ == "__main__":
    main()
