"""ICRL step / GRPO step at equal G on the tiny model on `arithmetic`, in two states, with seconds by phase.

    .venv/bin/python tests/bench_icrl.py          # (make bench) prints a table, writes bench_results/icrl.json

Both algorithms run in this process on the same weights, queries and seeds, with the same token limit for
every role (16), so the ratio counts samples and passes, not longer critiques; ICRL three times: with l_cond
from the trainer (the default), from the sampler (--calib_logp sampler), and with every sample through the
update, those of A = 0 too (the trainer leaves them out: their gradient is zero):
- all failing: the random-init model never emits the stop token, so every first attempt runs to the limit
  and fails, every chain is critiqued and retried (three times GRPO's samples, and every advantage 0);
- about half failing: after a short supervised warm start to ~50% greedy accuracy on training examples.
Beside the seconds, the work each peer's step does, counted in tokens (WorkCount), so the ratio of seconds can
be read against the ratio of work: positions through the trainer with a backward (context and response of
every sample the update runs), positions through a forward alone (l_cond, or l_old where a separate pass runs),
prompt tokens prefilled by the sampler (a prompt repeated in one call counts once) and tokens it generated."""
import contextlib
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


# The peers: ICRL as make train runs it, ICRL with l_cond from the sampler (no forward under S(x, c): the
# authors' way, SPEC §2.7's note), ICRL with every sample through the update's forward and backward, those of
# A = 0 too (as the trainer did before it left them out: TrainSample.has_gradient), and GRPO.
PEERS = {"icrl": ["--algo", "icrl"], "icrl_sampler_lcond": ["--algo", "icrl", "--calib_logp", "sampler"],
         "icrl_every_sample": ["--algo", "icrl"], "grpo": ["--algo", "grpo"]}


@contextlib.contextmanager
def every_sample_trained(on):
    """With `on`, every sample counts as having a gradient, so the update runs the samples of A = 0 too."""
    saved = icrl.TrainSample.has_gradient
    if on:
        icrl.TrainSample.has_gradient = property(lambda sample: True)
    try:
        yield
    finally:
        icrl.TrainSample.has_gradient = saved


class WorkCount:
    """Counts the tokens the trainer and the sampler are handed, by wrapping icrl's response_logprobs and
    generate for the duration of a `with`: a measurement of this script's, not a metric of the trainer's."""
    KEYS = ("train_positions", "forward_positions", "prefill_tokens", "generated_tokens")

    def __init__(self):
        self.counts = dict.fromkeys(self.KEYS, 0)

    def __enter__(self):
        self.saved = icrl.response_logprobs, icrl.generate
        logprobs, generate = self.saved

        def counted_logprobs(model, contexts, responses, *args, **kwargs):
            key = "train_positions" if torch.is_grad_enabled() else "forward_positions"
            self.counts[key] += sum(len(c) + len(r) for c, r in zip(contexts, responses))
            return logprobs(model, contexts, responses, *args, **kwargs)

        def counted_generate(model, prompts, *args, **kwargs):
            out = generate(model, prompts, *args, **kwargs)
            self.counts["prefill_tokens"] += sum(map(len, set(map(tuple, prompts))))
            self.counts["generated_tokens"] += sum(len(g.tokens) for g in out)
            return out

        icrl.response_logprobs, icrl.generate = counted_logprobs, counted_generate
        return self

    def __exit__(self, *exc):
        icrl.response_logprobs, icrl.generate = self.saved


def bench(model, tokenizer, task, peer):
    args = icrl.parse_args(PEERS[peer] + ["--warm_start_steps", "0"] + FLAGS)
    ctx = icrl.Dist()
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cfg = icrl.sampling_config(args)
    rows = []
    for step in range(STEPS + 1):  # step 0 warms up allocators and caches
        t = time.perf_counter()
        with WorkCount() as work, every_sample_trained(peer == "icrl_every_sample"):
            m = icrl.train_step(model, optimizer, tokenizer, task, cfg, args, ctx, step)
        if step:
            rows.append(dict(total=time.perf_counter() - t, sample=m["t_sample"], env=m["t_env"], train=m["t_train"],
                             acc=m["acc"], critiqued=m.get("critiqued_frac") or 0.0, **work.counts))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = icrl.parse_args(["--warm_start_steps", "600", "--warm_start_target", "0.5",
                            "--warm_start_role_steps", "50"] + FLAGS)
    ctx = icrl.Dist()
    model, tokenizer = icrl.load_model_and_tokenizer(args, ctx)
    task = icrl.load_task(args.task, split="train", seed=args.seed)
    results = {"all failing": {peer: bench(model, tokenizer, task, peer) for peer in PEERS}}
    icrl.warm_start(model, tokenizer, task, args, ctx)
    results["about half failing"] = {peer: bench(model, tokenizer, task, peer) for peer in PEERS}
    print(f"tiny config, G={args.group_size}, {args.batch_prompts} queries/step, {torch.get_num_threads()} thread(s), "
          f"mean of {STEPS} steps")
    print(f"{'state':20} {'peer':18} {'acc':>5} {'critiqued':>9} {'total s':>8} {'sample':>7} {'env':>7} {'train':>7}")
    for state, by_peer in results.items():
        for peer, r in by_peer.items():
            print(f"{state:20} {peer:18} {r['acc']:5.2f} {r['critiqued']:9.2f} {r['total']:8.2f} {r['sample']:7.2f} "
                  f"{r['env']:7.4f} {r['train']:7.2f}")
        by_peer["icrl_over_grpo"] = by_peer["icrl"]["total"] / by_peer["grpo"]["total"]
        by_peer["icrl_sampler_lcond_over_grpo"] = by_peer["icrl_sampler_lcond"]["total"] / by_peer["grpo"]["total"]
        by_peer["icrl_every_sample_over_icrl"] = by_peer["icrl_every_sample"]["total"] / by_peer["icrl"]["total"]
        by_peer["work_icrl_over_grpo"] = {k: by_peer["icrl"][k] / by_peer["grpo"][k] for k in WorkCount.KEYS
                                          if by_peer["grpo"][k]}
        print(f"{state}: ICRL step / GRPO step = {by_peer['icrl_over_grpo']:.2f}x "
              f"(l_cond from the sampler: {by_peer['icrl_sampler_lcond_over_grpo']:.2f}x); every sample through the "
              f"update, A = 0 too / ICRL = {by_peer['icrl_every_sample_over_icrl']:.2f}x")
        print(f"{state}: work per step, ICRL / GRPO: " + ", ".join(
            f"{k} {by_peer['icrl'][k]:.0f} / {by_peer['grpo'][k]:.0f}"
            + (f" = {by_peer['work_icrl_over_grpo'][k]:.2f}x" if k in by_peer["work_icrl_over_grpo"] else "")
            for k in WorkCount.KEYS))
    os.makedirs("bench_results", exist_ok=True)
    with open("bench_results/icrl.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
