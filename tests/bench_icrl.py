"""ICRL step / GRPO step at equal G on the tiny model on `arithmetic`, in two states, with seconds by phase.

    .venv/bin/python tests/bench_icrl.py          # (make bench) prints a table, writes bench_results/icrl.json

Both algorithms run in this process on the same weights, queries and seeds, with the same token limit for
every role (16), so the ratio counts samples and passes, not longer critiques:
- all failing: the random-init model never emits the stop token, so every first attempt runs to the limit
  and fails, every chain is critiqued and retried (three times GRPO's samples), the worst case;
- about half failing: after a short supervised warm start to ~50% greedy accuracy on training examples."""
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import icrl  # noqa: E402

STEPS = 3
FLAGS = ["--task", "arithmetic", "--max_new_tokens", "16", "--critic_max_new_tokens", "16", "--max_turns", "1"]


def bench(model, tokenizer, task, algo):
    args = icrl.parse_args(["--algo", algo, "--warm_start_steps", "0"] + FLAGS)
    ctx = icrl.Dist()
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cfg = icrl.sampling_config(args)
    rows = []
    for step in range(STEPS + 1):  # step 0 warms up allocators and caches
        t = time.perf_counter()
        m = icrl.train_step(model, optimizer, tokenizer, task, cfg, args, ctx, step)
        if step:
            rows.append(dict(total=time.perf_counter() - t, sample=m["t_sample"], env=m["t_env"], train=m["t_train"],
                             acc=m["acc"], critiqued=m.get("critiqued_frac") or 0.0))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = icrl.parse_args(["--warm_start_steps", "600", "--warm_start_target", "0.5",
                            "--warm_start_role_steps", "50"] + FLAGS)
    ctx = icrl.Dist()
    model, tokenizer = icrl.load_model_and_tokenizer(args, ctx)
    task = icrl.load_task(args.task, split="train", seed=args.seed)
    results = {"all failing": {algo: bench(model, tokenizer, task, algo) for algo in ("icrl", "grpo")}}
    icrl.warm_start(model, tokenizer, task, args, ctx)
    results["about half failing"] = {algo: bench(model, tokenizer, task, algo) for algo in ("icrl", "grpo")}
    print(f"tiny config, G={args.group_size}, {args.batch_prompts} queries/step, {torch.get_num_threads()} thread(s), "
          f"mean of {STEPS} steps")
    print(f"{'state':20} {'algo':5} {'acc':>5} {'critiqued':>9} {'total s':>8} {'sample':>7} {'env':>7} {'train':>7}")
    for state, by_algo in results.items():
        for algo, r in by_algo.items():
            print(f"{state:20} {algo:5} {r['acc']:5.2f} {r['critiqued']:9.2f} {r['total']:8.2f} {r['sample']:7.2f} "
                  f"{r['env']:7.4f} {r['train']:7.2f}")
        by_algo["icrl_over_grpo"] = by_algo["icrl"]["total"] / by_algo["grpo"]["total"]
        print(f"{state}: ICRL step / GRPO step = {by_algo['icrl_over_grpo']:.2f}x")
    os.makedirs("bench_results", exist_ok=True)
    with open("bench_results/icrl.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
