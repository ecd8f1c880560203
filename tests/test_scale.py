"""Issue 14 on the CPU: what Qwen3-4B/8B need at scale, tested on tiny models.

FSDP2 gradient memory during accumulation, chunked log-probs over the vocabulary, the bfloat16 sampling
copy, --top_p < 1 semantics, and host syncs in the update loop. (tests/test_cuda.py has the GPU checks.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

import icrl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- item 2
def test_fsdp_gradient_memory_per_rank_is_a_shard():
    """2 gloo ranks, FSDP2, 10 micro-batches per optimizer step: after every micro-batch's backward a rank
    holds float32 gradients of its shard only, 4 / world_size bytes per global parameter (with
    set_requires_gradient_sync(False) it was 4.0 bytes per global parameter until the last micro-batch),
    in float32 and in bfloat16 compute. test_icrl.py's 2-process == 1-process test covers the gradients."""
    out = os.path.join(ROOT, ".pytest_cache", f"grad_memory_{os.getpid()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_grad_memory.py"), out]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    with open(out) as f:
        figures = json.load(f)
    os.remove(out)
    n, world = figures["params"], figures["world"]
    for rank, by_dtype in enumerate(figures["bytes_per_rank"]):
        for dtype, after_each_backward in by_dtype.items():
            assert len(after_each_backward) == 10, (rank, dtype)
            per_param = [b / n for b in after_each_backward]
            # shards are padded to a multiple of world_size rows: a few bytes over 4 / world at most
            assert all(4 / world <= x < 4 / world * 1.02 for x in per_param), (rank, dtype, per_param)
