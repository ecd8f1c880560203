"""ICRL evaluation (../shared/SPEC.md §4): critique-free pass@k, one round of self-critique, the critic
swap and the internalisation gap, for a checkpoint written by icrl.py (or any Hugging Face Qwen3 folder).

Run:
    python eval.py --model runs/icrl/final --task arithmetic --out runs/icrl/eval          # `make eval`
    torchrun --standalone --nproc_per_node 2 eval.py --model runs/icrl/final --task arithmetic --out runs/icrl/eval
        (under torchrun spell --n as --samples: torchrun takes `--n` for an abbreviation of its own flags)
    torchrun --nproc_per_node 8 eval.py --model runs/qwen3-8b/final --task math --eval_file test.jsonl \
        --samples 16 --k 1 --k 8 --k 16 --batch_examples 16 \
        --max_examples 500 --max_new_tokens 2048 --critic_max_new_tokens 1024 --dtype bfloat16 --out runs/qwen3-8b/eval
    python eval.py ... --critic_model runs/other/final     # critiques by another checkpoint, solver unchanged

For every example, n attempts y_i ~ S(x) are sampled (the critique-free solver), then one critique per
attempt and one refinement per critique (icrl.rollout, SPEC §2.1-2.3). An attempt is correct when its
reward is 1. Figures, over all examples:
    pass@k               mean over examples of 1 - C(n-c, k)/C(n, k), c = correct attempts of n
    self_critique_acc    share of refinements y' that are correct
    fix_rate, break_rate P(r'=1 | r=0), P(r'=0 | r=1) over attempt/refinement pairs (null: no such attempt)
    critique_tokens      mean generated tokens per critique (its stop token included, as icrl.py counts)
    internalisation_gap  self_critique_acc - pass@1
Outputs: a table on stdout, DIR/summary.json (the figures and the settings) and DIR/samples.jsonl, one
line per attempt in (example, attempt) order: example, id, question, answer (reference), attempt,
prompt / critic_prompt / refiner_prompt (the decoded S(x), C(x, y), F(x, y, c), chat markup included),
response, critique, refinement (texts), reward, refined_reward, the *_tokens lengths and *_finished flags.

Under torchrun the examples are cut into --batch_examples batches dealt round-robin to the ranks, each
batch sampled with a seed from (--seed, batch index): the figures do not depend on the number of ranks.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import load_task, parse_knobs
from icrl import (DTYPES, SamplingConfig, chunks, init_distributed, mix_seed, print0, rollout, shutdown,
                  write_atomic)
from model import Qwen3


# ==================================================================================================
# SPEC §4 figures
# ==================================================================================================

def pass_at_k(n, c, k):
    """SPEC §4: the unbiased pass@k estimator 1 - C(n-c, k)/C(n, k) from n samples with c correct.

    In product form, 1 - prod_{i=n-c+1}^{n} (1 - k/i): binomials of large n overflow floats."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per example, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n correct samples, got c={c}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def figures(records, ks):
    """SPEC §4 figures from per-example records (`example_record`); None where a rate has no denominator."""
    attempts = [a for rec in records for a in rec["attempts"]]
    pairs = [(a["reward"] == 1.0, a["refined_reward"] == 1.0) for a in attempts]
    wrong = sum(1 for r, _ in pairs if not r)
    right = len(pairs) - wrong
    div = lambda a, b: a / b if b else None
    out = {}
    for k in ks:
        out[f"pass@{k}"] = div(sum(pass_at_k(len(rec["attempts"]), sum(a["reward"] == 1.0 for a in rec["attempts"]), k)
                                   for rec in records), len(records))
    out["self_critique_acc"] = div(sum(r2 for _, r2 in pairs), len(pairs))
    out["fix_rate"] = div(sum(1 for r, r2 in pairs if not r and r2), wrong)
    out["break_rate"] = div(sum(1 for r, r2 in pairs if r and not r2), right)
    out["critique_tokens"] = div(sum(a["critique_tokens"] for a in attempts), len(attempts))
    pass1 = div(sum(r for r, _ in pairs), len(pairs))  # = pass@1 (every example has n attempts)
    out["internalisation_gap"] = None if pass1 is None else out["self_critique_acc"] - pass1
    out["response_tokens"] = div(sum(a["response_tokens"] for a in attempts), len(attempts))
    out["refinement_tokens"] = div(sum(a["refinement_tokens"] for a in attempts), len(attempts))
    out["examples"], out["attempts"] = len(records), len(attempts)
    return out


# ==================================================================================================
# Checkpoints
# ==================================================================================================

def check_folder(flag, path):
    """One clear line, before anything heavy is loaded, when `path` is no checkpoint folder."""
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"{flag} {path}: no config.json there (not a Hugging Face checkpoint folder)")


def load_tokenizer(flag, path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def vocab_size(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("vocab_size")


def check_critic_matches(args, tokenizer, critic_tokenizer):
    """SPEC §4 critic swap: the critic reads contexts built with --model's tokenizer and writes ids that
    --model's tokenizer decodes, so both must share one vocabulary, id for id."""
    where = f"--critic_model {args.critic_model} does not match --model {args.model}"
    if (a := vocab_size(args.model)) != (b := vocab_size(args.critic_model)):
        raise SystemExit(f"{where}: vocab_size {b} vs {a} (config.json)")
    va, vb = tokenizer.get_vocab(), critic_tokenizer.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))
        if only:
            t = only[0]
            detail = f"{len(only)} token(s) in one tokenizer only, e.g. {t!r} (id {vb.get(t)} vs {va.get(t)})"
        else:
            t = min((t for t in va if va[t] != vb[t]), key=va.get)
            detail = f"token {t!r} has id {vb[t]} vs {va[t]}"
        raise SystemExit(f"{where}: tokenizer vocabularies differ: {detail}")


def load_models(args, device):
    """(solver model, tokenizer, critic model or None). None: the solver critiques itself."""
    check_folder("--model", args.model)
    tokenizer = load_tokenizer("--model", args.model)
    same = args.critic_model is None or os.path.realpath(args.critic_model) == os.path.realpath(args.model)
    if not same:
        check_folder("--critic_model", args.critic_model)
        check_critic_matches(args, tokenizer, load_tokenizer("--critic_model", args.critic_model))
    model = Qwen3.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device).eval()
    critic = None if same else Qwen3.from_pretrained(args.critic_model, dtype=DTYPES[args.dtype], device=device).eval()
    return model, tokenizer, critic


# ==================================================================================================
# Sampling and records
# ==================================================================================================

def example_record(index, ro, tokenizer):
    """Everything sampled for one example, as plain data (gathered across ranks, written to samples.jsonl)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    attempts = []
    for y, c, y2, c_ctx, f_ctx in zip(ro.attempts, ro.critiques, ro.refinements, ro.critic_contexts,
                                      ro.refiner_contexts):
        attempts.append(dict(
            response=y.text, reward=y.reward, response_tokens=len(y.tokens), response_finished=y.finished,
            critic_prompt=decode(c_ctx), critique=c.text, critique_tokens=len(c.tokens), critique_finished=c.finished,
            refiner_prompt=decode(f_ctx), refinement=y2.text, refined_reward=y2.reward,
            refinement_tokens=len(y2.tokens), refinement_finished=y2.finished))
    ex = ro.example
    return dict(example=index, id=ex.id, question=ex.question, answer=ex.answer,
                prompt=decode(ro.solver_context), attempts=attempts)


def evaluate(model, tokenizer, critic, task, examples, args, ctx):
    """This rank's per-example records. Batch b (of --batch_examples examples) goes to rank b % world and
    is sampled with seed (--seed, b), so every batch is the same whatever the number of ranks."""
    cfg = SamplingConfig(args.n, args.max_new_tokens, args.critic_max_new_tokens, args.temperature, args.top_p,
                         args.enable_thinking)
    batches = list(enumerate(chunks(list(enumerate(examples)), args.batch_examples)))
    mine = batches[ctx.rank::ctx.world]
    records = []
    bar = tqdm(total=sum(len(b) for _, b in mine), disable=not ctx.main, unit="ex", dynamic_ncols=True)
    for b, batch in mine:
        rollouts, _ = rollout(model, tokenizer, task, [ex for _, ex in batch], cfg, seed=mix_seed(args.seed, b),
                              critique=True, critic_model=critic)
        records += [example_record(i, ro, tokenizer) for (i, _), ro in zip(batch, rollouts)]
        bar.update(len(batch))
    bar.close()
    return records


def gather(records, ctx):
    """All ranks' records on rank 0, in example order (None elsewhere)."""
    if ctx.world > 1:
        everyone = [None] * ctx.world
        dist.all_gather_object(everyone, records)
        records = [r for part in everyone for r in part]
    return sorted(records, key=lambda r: r["example"]) if ctx.main else None


# ==================================================================================================
# Outputs
# ==================================================================================================

def samples_jsonl(records):
    lines = []
    for rec in records:
        head = {k: v for k, v in rec.items() if k != "attempts"}
        for i, a in enumerate(rec["attempts"]):
            lines.append(json.dumps({**head, "attempt": i, **a}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def table(summary, ks):
    rows = [f"pass@{k}" for k in ks] + ["self_critique_acc", "fix_rate", "break_rate", "critique_tokens",
                                        "internalisation_gap"]
    fmt = lambda key, v: "n/a" if v is None else (f"{v:+.4f}" if key == "internalisation_gap" else
                                                  f"{v:.2f}" if key == "critique_tokens" else f"{v:.4f}")
    critic = summary["critic_model"] or "self"
    lines = [f"{summary['task']} ({summary['split']}): {summary['examples']} examples x n={summary['n']}, "
             f"model {summary['model']}, critic {critic}"]
    lines += [f"  {key:<22}{fmt(key, summary[key]):>10}" for key in rows]
    return "\n".join(lines)


# ==================================================================================================
# Command line
# ==================================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and task
    p.add_argument("--model", default="runs/icrl/final", help="the solver: a Hugging Face Qwen3 folder "
                   "with its tokenizer files (icrl.py writes them)")
    p.add_argument("--critic_model", default=None, help="critic swap (SPEC §4): critiques from this checkpoint "
                   "(same vocabulary), attempts and refinements from --model")
    p.add_argument("--task", default="arithmetic", help="arithmetic | countdown | gsm8k | math (data.py)")
    p.add_argument("--eval_file", default=None, help="JSONL split (gsm8k, math)")
    p.add_argument("--task_knob", action="append", default=[], metavar="KEY=VALUE", help="a task option, "
                   "repeatable, as for icrl.py (e.g. --task_knob digits=3)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split of a synthetic task")
    p.add_argument("--task_seed", type=int, default=0, help="seed of a synthetic task's examples (icrl.py "
                   "generates its held-out split with its --seed, default 0)")
    p.add_argument("--max_examples", type=int, default=200, help="the first M examples (0: all)")
    p.add_argument("--enable_thinking", action="store_true", help="passed to the chat template (SPEC §1)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and compute dtype")
    # sampling
    # --samples is --n's alias for torchrun, whose own parser rejects a later `--n` as an ambiguous
    # abbreviation of its --nnodes / --nproc_per_node before eval.py ever runs.
    p.add_argument("--n", "--samples", type=int, default=4, help="attempts per example (each one critiqued "
                   "and refined); write --samples under torchrun")
    p.add_argument("--k", type=int, action="append", default=None, help="report pass@k; repeat the flag "
                   "for several (pass@1 is always reported; default: 1 and n)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="attempts and refinements")
    p.add_argument("--critic_max_new_tokens", type=int, default=24, help="critiques")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=0, help="seeds every sampling call, with the batch index")
    p.add_argument("--batch_examples", type=int, default=64, help="examples per sampling call "
                   "(n sequences each); batches are dealt round-robin to the ranks")
    # output
    p.add_argument("--out", default="runs/icrl/eval", help="folder for summary.json and samples.jsonl")
    args = p.parse_args(argv)
    args.k = sorted(set(args.k or [args.n]) | {1})  # pass@1 always: the internalisation gap is read against it
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if bad := [k for k in args.k if not 1 <= k <= args.n]:
        p.error(f"--k {bad[0]}: pass@k needs 1 <= k <= n, and --n is {args.n} (raise --n or lower --k)")
    if args.max_examples < 0 or args.batch_examples < 1:
        p.error("--max_examples must be >= 0 and --batch_examples >= 1")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def main(argv=None):
    """Returns summary.json's dict on rank 0, None on the other ranks."""
    args = parse_args(argv)
    ctx = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        return run(args, ctx)
    finally:
        shutdown(ctx, fsdp=False)


def run(args, ctx):
    t0 = time.perf_counter()
    model, tokenizer, critic = load_models(args, ctx.device)
    task = load_task(args.task, path=args.eval_file, split=args.split, seed=args.task_seed,
                     **parse_knobs(args.task_knob))
    examples = task.examples[:args.max_examples] if args.max_examples else task.examples
    print0(ctx, "config:", json.dumps(vars(args), indent=1))
    if args.max_examples > len(examples):
        print0(ctx, f"note: {args.task} has {len(examples)} examples, fewer than --max_examples {args.max_examples}")
    n_batches = math.ceil(len(examples) / args.batch_examples)
    if n_batches < ctx.world:
        print0(ctx, f"note: {n_batches} batch(es) for {ctx.world} ranks; lower --batch_examples to use them all")
    records = gather(evaluate(model, tokenizer, critic, task, examples, args, ctx), ctx)
    if not ctx.main:
        return None
    summary = dict(figures(records, args.k), task=args.task, split=args.split, eval_file=args.eval_file,
                   model=args.model, critic_model=None if critic is None else args.critic_model, n=args.n,
                   k=args.k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                   critic_max_new_tokens=args.critic_max_new_tokens, enable_thinking=args.enable_thinking,
                   dtype=args.dtype, seed=args.seed, task_seed=args.task_seed, world_size=ctx.world,
                   seconds=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "samples.jsonl"), samples_jsonl(records))
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(table(summary, args.k))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and samples.jsonl ({summary['attempts']} lines)")
    return summary


if __name__ == "__main__":
    main()
