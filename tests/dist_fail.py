"""One rank fails while the other waits in a collective: icrl.main and eval.main must print the failing rank's
error and exit, not hang in their shutdown barrier (test_run_folder.py and test_eval.py run this under torchrun
with 2 processes).

    torchrun --nproc_per_node 2 tests/dist_fail.py icrl OUT_DIR
    torchrun --nproc_per_node 2 tests/dist_fail.py eval OUT_DIR MODEL_DIR
And one rank's environment server fails for good in training: every rank stops together, the steps saved.
    torchrun --nproc_per_node 2 tests/dist_fail.py server OUT_DIR [--fsdp]
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import icrl  # noqa: E402


def train(args, ctx):
    if ctx.rank == 1:
        raise RuntimeError("rank 1 fails here")
    for _ in range(3):  # rank 0 waits in collectives that rank 1 never joins (as in a backward's all-reduce)
        dist.all_reduce(torch.zeros(1))


def evaluate(model, tokenizer, critic, task, examples, args, ctx):
    if ctx.rank == 1:  # as an AgentGym server that stops answering would
        raise RuntimeError("rank 1 fails here")
    return []  # rank 0 goes on to gather's all_gather_object, which rank 1 never joins


def failing_rollout(real, calls=[]):
    def rollout(*args, critique=True, **kwargs):   # rank 1's second training rollout: its server has failed
        if critique and int(os.environ["RANK"]) == 1:
            calls.append(1)
            if len(calls) == 2:
                raise icrl.EnvironmentServerFailed("agentgym:alfworld: POST http://127.0.0.1:1/step: no reply within 1 s")
        return real(*args, critique=critique, **kwargs)
    return rollout


if __name__ == "__main__":
    which, out = sys.argv[1:3]
    if which == "server":
        icrl.rollout = failing_rollout(icrl.rollout)
        icrl.main(["--out", out, "--task", "arithmetic", "--warm_start_steps", "2", "--warm_start_role_steps", "1",
                   "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "4", "--critic_max_new_tokens",
                   "4", "--eval_examples", "2", "--eval_samples", "1", "--steps", "3"] + sys.argv[3:])
    elif which == "icrl":
        icrl.train = train
        icrl.main(["--out", out, "--warm_start_steps", "0"])
    else:
        ev.evaluate = evaluate
        ev.main(["--model", sys.argv[3], "--out", out, "--max_examples", "2"])
