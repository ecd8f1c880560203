"""One rank fails while the other waits in a collective: icrl.main must print the failing rank's error and
exit, not hang in its shutdown barrier (test_run_folder.py runs this under torchrun with 2 processes).

    torchrun --nproc_per_node 2 tests/dist_fail.py OUT_DIR
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import icrl  # noqa: E402


def train(args, ctx):
    if ctx.rank == 1:
        raise RuntimeError("rank 1 fails here")
    for _ in range(3):  # rank 0 waits in collectives that rank 1 never joins (as in a backward's all-reduce)
        dist.all_reduce(torch.zeros(1))


if __name__ == "__main__":
    icrl.train = train
    icrl.main(["--out", sys.argv[1], "--warm_start_steps", "0"])
