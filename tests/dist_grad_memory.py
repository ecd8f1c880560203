"""Per-rank gradient memory during gradient accumulation under FSDP2 (issue 14, item 2).

    torchrun --nproc_per_node 2 tests/dist_grad_memory.py OUT.json

dist_update.py's global batch, one update() with --micro_batch 1 (several micro-batches per optimizer
step), once with float32 and once with bfloat16 compute (FSDP2's mixed-precision policy). After every
micro-batch's backward the script adds up the storage of every gradient tensor the rank holds: the
sharded `param.grad` (its local shard) and whatever FSDP2 keeps unsharded between backward passes (the
unsharded parameter's `.grad` and the float32 `unsharded_accumulated_grad`, which
`set_requires_gradient_sync(False)` accumulates into). Rank 0 writes the figures of every rank, with the
global parameter count, to OUT.json (test_scale.py reads them)."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import icrl  # noqa: E402
from dist_update import CONFIG, QUERIES, global_batch  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402


def gradient_bytes(model):
    """Bytes of distinct gradient storages on this rank (DTensor gradients count their local shard)."""
    from torch.distributed.fsdp import FSDPModule
    tensors = [p.grad for p in model.parameters()]
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group else []:
                tensors.append(fsdp_param.unsharded_accumulated_grad)
                if hasattr(fsdp_param, "_unsharded_param"):
                    tensors.append(fsdp_param._unsharded_param.grad)
    storages = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(dtype, ctx):
    args = icrl.parse_args(["--batch_prompts", str(QUERIES), "--micro_batch", "1", "--grad_clip", "1e9", "--fsdp",
                            "--dtype", dtype])
    torch.manual_seed(0)
    model = icrl.wrap_model(Qwen3(Qwen3Config(**CONFIG)), args, ctx)
    per_rank = QUERIES // ctx.world
    mine = global_batch()[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    icrl.old_logprobs(icrl.unwrap(model), [s for qs in mine for s in qs], args, ctx)
    after_backward = []
    backward = torch.Tensor.backward

    def measured_backward(self, *a, **k):
        backward(self, *a, **k)
        after_backward.append(gradient_bytes(model))

    torch.Tensor.backward = measured_backward
    try:
        icrl.update(model, torch.optim.SGD(model.parameters(), lr=1e-3), mine, args, ctx, step=0)
    finally:
        torch.Tensor.backward = backward
    return after_backward


def main():
    ctx = icrl.init_distributed()
    n_params = sum(p.numel() for p in Qwen3(Qwen3Config(**CONFIG)).parameters())
    figures = {dtype: measure(dtype, ctx) for dtype in ("float32", "bfloat16")}
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, figures)
    if ctx.main:
        with open(sys.argv[1], "w") as f:
            json.dump({"params": n_params, "world": ctx.world, "bytes_per_rank": gathered}, f)
    icrl.shutdown(ctx, fsdp=True)


if __name__ == "__main__":
    main()
