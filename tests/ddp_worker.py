"""A DDP training job for tests/test_distributed.py: a small random-weight
Llama, gloo on CPU, a few SGD steps. Rank 0 writes the per-step losses and
whether each rank's rotary forward was patched to the JSON file in argv[1].
ROPE_TEST_IMPORT_AUTO=1 makes each rank ``import rope_patch.auto`` itself."""

import json
import os
import sys

if os.environ.get("ROPE_TEST_IMPORT_AUTO") == "1":
    import rope_patch.auto  # noqa: F401

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
    )
    model = DistributedDataParallel(transformers.LlamaForCausalLM(config))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append((reduced / world).item())
    rotary = type(model.module.model.rotary_emb)
    patched = torch.tensor([int(hasattr(rotary.forward, "__rope_patch_original__"))])
    gathered = [torch.zeros_like(patched) for _ in range(world)]
    dist.all_gather(gathered, patched)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"losses": [float.hex(v) for v in losses], "patched": [int(t) for t in gathered]}, handle)
    dist.barrier()
    # gloo's threads sometimes abort the interpreter's teardown here
    # ("terminate called without an active exception"): results are written
    # and every rank passed the barrier, so leave without tearing down.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
