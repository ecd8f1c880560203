"""One ICRL step's seconds by phase, and ICRL step / GRPO step at equal G, on the tiny default config.

    .venv/bin/python tests/bench_icrl.py          # (make bench) prints a table, writes bench_results/icrl.json

Both algorithms run in this process on the same random-init model, queries and seeds. A random model
never emits the stop token, so every response runs to max_new_tokens: the worst case for sampling."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import icrl  # noqa: E402
from data import load_task  # noqa: E402

STEPS = 3


def bench(algo):
    args = icrl.parse_args(["--algo", algo, "--warm_start_steps", "0"])
    ctx = icrl.Dist()
    model, tokenizer = icrl.load_model_and_tokenizer(args, ctx)
    task = load_task(args.task, split="train", seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cfg = icrl.sampling_config(args)
    rows = []
    for step in range(STEPS + 1):  # step 0 warms up allocators and caches
        t = time.perf_counter()
        m = icrl.train_step(model, optimizer, tokenizer, task, cfg, args, ctx, step)
        if step:
            rows.append(dict(total=time.perf_counter() - t, sample=m["t_sample"], score=m["t_score"],
                             train=m["t_train"]))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return dict(mean, G=args.group_size, batch_prompts=args.batch_prompts)


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    results = {algo: bench(algo) for algo in ("icrl", "grpo")}
    results["icrl_over_grpo"] = results["icrl"]["total"] / results["grpo"]["total"]
    print(f"tiny config, G={results['icrl']['G']}, {results['icrl']['batch_prompts']} queries/step, "
          f"{torch.get_num_threads()} thread(s), mean of {STEPS} steps")
    print(f"{'algo':6} {'total s':>8} {'sample':>8} {'score':>8} {'train':>8}")
    for algo in ("icrl", "grpo"):
        r = results[algo]
        print(f"{algo:6} {r['total']:8.2f} {r['sample']:8.2f} {r['score']:8.4f} {r['train']:8.2f}")
    print(f"ICRL step / GRPO step: {results['icrl_over_grpo']:.2f}x")
    os.makedirs("bench_results", exist_ok=True)
    with open("bench_results/icrl.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
