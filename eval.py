"""ICRL evaluation (../shared/SPEC.md §4) of a checkpoint written by icrl.py (or any Hugging Face Qwen3
folder): critique-free pass@k, test-time self-critique over K rounds with the training gate, the critique's
value beyond a second draw, the critic swap and the internalisation gap.

Run:
    python eval.py --model runs/icrl/final --task boxes --out runs/icrl/eval          # `make eval`
    python eval.py --model runs/icrl/final --rounds 3 --critic_gate always ...   # K = 3, successes critiqued too
    python eval.py ... --critic_model runs/other/final    # critic swap: another checkpoint critiques
    torchrun --standalone --nproc_per_node 2 eval.py --model runs/icrl/final --task boxes --out runs/icrl/eval
        (under torchrun spell --n as --samples: torchrun takes `--n` for an abbreviation of its own flags)
    torchrun --nproc_per_node 8 eval.py --model runs/qwen3-8b/final --task math --eval_file test.jsonl \\
        --samples 16 --k 1 --k 8 --k 16 --rounds 3 --batch_examples 16 --rollout_batch 64 \\
        --max_examples 500 --max_new_tokens 2048 --critic_max_new_tokens 1024 --dtype bfloat16 --out runs/qwen3-8b/eval
Without --task, the task is the one --model was trained on, with its knobs (icrl.py's trainer_state.json in
the folder; boxes for a folder without one); on that task, the episode settings that are not given
(--enable_thinking, --max_new_tokens, --critic_max_new_tokens, --max_turns, --max_context, --obs_chars) are
that run's too (with other --task_knob values, a --max_turns its knobs gave is the knobbed task's own).

What is sampled (icrl.rollout, SPEC §2.1-2.4, the same code as training): for every example, n chains
(--n) of up to K rounds (--rounds). Round 1 is a critique-free episode tau_1 ~ S(x). While the gate lets a
chain go on (--critic_gate failure: only after a failure, as in training; always: after successes too)
and it has fewer than K episodes, the critic (the model itself, or --critic_model) writes a critique c_k
of C(x, tau_k) and the solver retries from a fresh reset with S(x, c_k). Then every chain whose first
attempt failed and was critiqued gets one more critique-free attempt ~ S(x) (a fresh reset, its own seed):
the baseline a critique has to beat. An episode succeeds when its reward is 1.

Figures (summary.json and the printed table), over all chains; null where a rate has no denominator:
    pass@k               critique-free, over first attempts: mean over examples of 1 - C(n-c, k)/C(n, k),
                         c = first attempts with reward 1 among the n (unbiased)
    acc_round_k          k = 1..K, accuracy after round k: mean over chains of the reward of the chain's
                         last episode among its first k (acc_round_1: critique-free, = pass@1 with 0/1 rewards)
    retry_acc            P(retry reward = 1 | critiqued), over all retries; retry_acc_r2.. per round when K > 2
    critique_value       on chains whose first attempt failed and was critiqued: P(round-2 retry = 1) minus
                         P(second critique-free attempt = 1), i.e. failed_retry_acc - second_attempt_acc
                         over the same `failed_chains` chains
    critique_value_se    its standard error, clustered by example (clustered_standard_error); null under 2 examples
                         (both null, and second_attempt_acc, at --temperature 0: the second attempt replays the
                         failed first one, so the difference would be failed_retry_acc)
    internalisation_gap  acc_round_K - acc_round_1
    critique_tokens      mean generated tokens per critique (stop token included, as icrl.py counts)
    critiqued_frac       share of chains critiqued at least once
    turns, trunc_frac    mean action turns per episode; share of episodes ended by context, max_turns or
                         cutoff (retries included, second attempts not)
    examples, chains     how many; plus the settings
    dropped_long_prompts examples left out before sampling: S(x) with no room, within the positions or
                         --max_context, for what the K rounds generate after it (icrl.py's rule, with a warning)
Outputs: the table on stdout, DIR/summary.json and DIR/samples.jsonl, one line per chain in (example, chain)
order: example (the task's own index of it, whatever was dropped before it), id, question, answer
(reference), chain, rounds, second_attempt_reward and second_attempt (null unless the first attempt failed
and was critiqued). rounds[k] is episode k + 1: context and text
(decoded, special tokens kept), actions, observations, reward, end (done | max_turns | repeat | context |
cutoff), action_tokens; and the critique written about it: critic_context (decoded), critique (the extracted
text the retry was given), critique_tokens, critique_finished (all null when it was not critiqued).
second_attempt is the critique value's second critique-free episode, with the same episode fields.

Under torchrun the examples are cut into --batch_examples batches dealt round-robin to the ranks, each
batch sampled with seeds from (--seed, batch index): the figures do not depend on the number of ranks.
--rollout_batch bounds the sequences per sampling call (the KV cache); it changes which seed draws which
sample (seeds are per call), not the distribution.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from icrl import (DTYPES, TRAINER_STATE, TRUNCATED_ENDS, SamplingConfig, UsageError, _Parser, add_episode_args,
                  check_out, check_sampling_flags, checked_folder, checked_task, checked_tokenizer, chunks,
                  drop_long_prompts, first_rank, init_distributed, mix_seed, print0, prompt_limit, rollout,
                  run_then_shut_down, same_setting, saved_trainer_state, show, usage_exit, warn, write_atomic)
from data import SYNTHETIC_TASKS, load_task, typed_knobs
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


def ratio(a, b):
    """A rate, or None (JSON null) where it has no denominator: never NaN, never a default 0."""
    return a / b if b else None


def critiqued_failure(row):
    """The chains critique_value is measured on: the first attempt failed and was critiqued (a retry followed)."""
    return row["rounds"][0]["reward"] < 1.0 and len(row["rounds"]) > 1


def clustered_standard_error(values, clusters):
    """The standard error of SPEC §4's critique value, a mean(values) where values sharing a cluster (the chains
    of one example: the same instance, so not independent draws) may be correlated: the sandwich estimator
    sqrt(G / (G - 1) * sum over clusters of (sum of its values - mean)^2) / n, over G clusters. None below 2."""
    groups = defaultdict(list)
    for value, cluster in zip(values, clusters):
        groups[cluster].append(value)
    if len(groups) < 2:
        return None
    n, mean, G = len(values), sum(values) / len(values), len(groups)
    spread = sum(sum(v - mean for v in group) ** 2 for group in groups.values())
    return math.sqrt(G / (G - 1) * spread) / n


def figures(rows, ks, rounds, greedy=False):
    """SPEC §4 figures from per-chain rows (`chain_row`, samples.jsonl's lines); `rounds` is K. `greedy`
    (--temperature 0): the second attempt replays the failed first one, so the critique value is not measured."""
    wins = lambda rewards: sum(r == 1.0 for r in rewards)
    by_example = defaultdict(list)
    for row in rows:
        by_example[row["example"]].append(row["rounds"][0]["reward"])
    out = {f"pass@{k}": ratio(sum(pass_at_k(len(first), wins(first), k) for first in by_example.values()),
                              len(by_example)) for k in ks}
    # Accuracy after round k: the chain's last episode among its first k (a chain the gate stopped keeps its last).
    for k in range(1, rounds + 1):
        out[f"acc_round_{k}"] = ratio(sum(row["rounds"][:k][-1]["reward"] for row in rows), len(rows))
    # Retries: rounds[k - 1] is the round-k retry, which follows the critique of rounds[k - 2].
    retries = {k: [row["rounds"][k - 1]["reward"] for row in rows if len(row["rounds"]) >= k]
               for k in range(2, rounds + 1)}
    out["retry_acc"] = ratio(sum(wins(r) for r in retries.values()), sum(len(r) for r in retries.values()))
    if rounds > 2:
        out.update({f"retry_acc_r{k}": ratio(wins(r), len(r)) for k, r in retries.items()})
    failed = [row for row in rows if critiqued_failure(row)]
    out["failed_chains"] = len(failed)
    out["failed_retry_acc"] = ratio(wins(row["rounds"][1]["reward"] for row in failed), len(failed))
    out["second_attempt_acc"] = ratio(wins(row["second_attempt_reward"] for row in failed), len(failed))
    out["critique_value"] = (None if not failed else out["failed_retry_acc"] - out["second_attempt_acc"])
    out["critique_value_se"] = clustered_standard_error(
        [(row["rounds"][1]["reward"] == 1.0) - (row["second_attempt_reward"] == 1.0) for row in failed],
        [row["example"] for row in failed])
    if greedy:  # every built-in environment is deterministic: critique_value would be failed_retry_acc
        out["second_attempt_acc"] = out["critique_value"] = out["critique_value_se"] = None
    first, last = out["acc_round_1"], out[f"acc_round_{rounds}"]
    out["internalisation_gap"] = None if first is None else last - first
    critique_tokens = [ep["critique_tokens"] for row in rows for ep in row["rounds"]
                       if ep["critique_tokens"] is not None]
    out["critique_tokens"] = ratio(sum(critique_tokens), len(critique_tokens))
    out["critiqued_frac"] = ratio(sum(len(row["rounds"]) > 1 for row in rows), len(rows))
    episodes = [ep for row in rows for ep in row["rounds"]]
    out["turns"] = ratio(sum(len(ep["actions"]) for ep in episodes), len(episodes))
    out["trunc_frac"] = ratio(sum(ep["end"] in TRUNCATED_ENDS for ep in episodes), len(episodes))
    out["examples"], out["chains"] = len(by_example), len(rows)
    return out


# ==================================================================================================
# Checkpoints
# ==================================================================================================

def checked_models(args):
    """(--model's tokenizer, its max_position_embeddings), once every folder has passed icrl.py's checks, no
    weight read (config.json and the safetensors headers; tokenizer files that load, with a chat template): a
    UsageError naming the flag. A --critic_model with fewer positions than the context lowers --max_context to
    them: C(x, tau) and its critique must fit the critic's positions, and the sampler bounds critiques and
    attempts alike by the context."""
    config = checked_folder("--model", args.model)
    tokenizer = checked_tokenizer("--model", args.model)
    if not self_critic(args):
        critic_config = checked_folder("--critic_model", args.critic_model)
        check_critic_matches(args, config, critic_config, tokenizer,
                             checked_tokenizer("--critic_model", args.critic_model))
        context = min(config.max_position_embeddings, args.max_context or config.max_position_embeddings)
        if critic_config.max_position_embeddings < context:
            args.max_context = critic_config.max_position_embeddings
            if first_rank():
                print(f"--max_context {args.max_context}: --critic_model {args.critic_model} has {args.max_context} "
                      f"positions, fewer than the context of {context}; its C(x, tau) and critique must fit them "
                      f"(and the attempts are held to them too)")
    return tokenizer, config.max_position_embeddings


def self_critic(args):
    """No --critic_model, or --model itself: the solver critiques its own episodes."""
    return args.critic_model is None or os.path.realpath(args.critic_model) == os.path.realpath(args.model)


def check_critic_matches(args, config, critic_config, tokenizer, critic_tokenizer):
    """SPEC §4 critic swap: the critic reads contexts built with --model's tokenizer and writes ids that
    --model's tokenizer decodes, so both must share one vocabulary, id for id."""
    where = f"--critic_model {args.critic_model} does not match --model {args.model}"
    if (a := config.vocab_size) != (b := critic_config.vocab_size):
        raise UsageError(f"{where}: vocab_size {b} vs {a} (config.json)")
    va, vb = tokenizer.get_vocab(), critic_tokenizer.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))
        if only:
            t = only[0]
            detail = f"{len(only)} token(s) in one tokenizer only, e.g. {t!r} (id {vb.get(t)} vs {va.get(t)})"
        else:
            t = min((t for t in va if va[t] != vb[t]), key=va.get)
            detail = f"token {t!r} has id {vb[t]} vs {va[t]}"
        raise UsageError(f"{where}: tokenizer vocabularies differ: {detail}")


# Episode settings that, not given, are those of the run that trained --model (--enable_thinking changes S(x)
# itself, SPEC §1), else eval.py's defaults.
EPISODE_SETTINGS = ("enable_thinking", "max_new_tokens", "critic_max_new_tokens", "max_turns", "max_context",
                    "obs_chars")


def defaults_from_checkpoint(args, fallback):
    """--task, --task_knob, --env_url and the EPISODE_SETTINGS not given (None) come from the run that trained
    --model (icrl.py's trainer_state.json), said in one line, the others only on that run's task; a --task or
    --task_knob that differs from it is warned about. A folder without that file (a plain Hugging Face model)
    defaults to boxes; an episode setting still None takes `fallback`'s value."""
    file = os.path.join(args.model, TRAINER_STATE)
    try:
        saved = saved_trainer_state(args.model).get("args", {}) if os.path.isfile(file) else {}
    except UsageError as e:
        if args.task is None:
            raise UsageError(f"{e}; pass --task") from None
        saved = {}  # not needed: --task is given
    taken = []
    if args.task is None:
        args.task = saved.get("task", "boxes")
        taken += [f"--task {args.task}"] if "task" in saved else []
    elif saved.get("task", args.task) != args.task:
        warn(f"--task {args.task} differs from {saved['task']}, the task --model was trained on ({file})")
    if args.task == saved.get("task"):
        other_knobs = False
        for key in ("task_knob", "env_url"):
            given, old = getattr(args, key), saved.get(key)
            if given is None and old:
                setattr(args, key, old)
                taken.append(f"--{key} {show(old)}")
            elif key == "task_knob" and given is not None and not same_setting(key, given, old):
                other_knobs = True
                warn(f"--task_knob {show(given)} differs from {show(old) if old else 'no knobs'}, --model's "
                     f"training ({file})")
        for key in EPISODE_SETTINGS:
            # icrl.py saves the turn limit its knobs gave when --max_turns was 0 (boxes: its tries); with other
            # knobs, the knobbed task's own instead (a limit given to icrl.py is kept)
            if key == "max_turns" and other_knobs and args.max_turns is None and \
                    saved.get(key) == tasks_own_turns(args.task, saved.get("task_knob"), saved.get("env_url")):
                taken.append("--max_turns 0 (the knobbed task's own)")
                continue
            if getattr(args, key) is None and key in saved:
                setattr(args, key, saved[key])
                taken.append(f"--{'' if saved[key] else 'no-'}{key}" if key == "enable_thinking" else
                             f"--{key} {saved[key]}")
    # the token limits nobody chose: eval.py's own, sized for the built-in tasks' tiny model (warned about in main)
    args.tiny_limits = [f"--{key} {fallback[key]}" for key in ("max_new_tokens", "critic_max_new_tokens")
                        if getattr(args, key) is None]
    for key in EPISODE_SETTINGS:
        if getattr(args, key) is None:
            setattr(args, key, fallback[key])
    args.task_knob = args.task_knob or []
    if taken and first_rank():
        print(f"{' '.join(taken)}: from {file} (the run that trained --model)")


def tasks_own_turns(task, knobs, env_url):
    """The turn limit `task` sets itself with `knobs` (what icrl.py saves when --max_turns is 0), or None where
    it cannot be built here (a file task without its file)."""
    try:
        return load_task(task, split="test", **typed_knobs(task, knobs, env_url)).max_turns
    except (OSError, ValueError, TypeError):
        return None


def examples_to_sample(args, task, tokenizer, positions):
    """(numbered, dropped): the first --max_examples examples as (the task's index, example), less those whose
    S(x) has no room, within the positions or --max_context, for what the K rounds generate after it (icrl.py's
    rule, with its warning), and how many those were. Before any weight loads: no room at all is a UsageError."""
    examples = task.examples[:args.max_examples] if args.max_examples else task.examples
    if args.max_examples > len(examples) and first_rank():
        print(f"note: {args.task} has {len(examples)} examples, fewer than --max_examples {args.max_examples}")
    # eval.py samples every role, and has no --max_prompt_tokens
    limit = prompt_limit(argparse.Namespace(**vars(args), algo="icrl", max_prompt_tokens=0), tokenizer, positions)
    kept = {id(ex) for ex in drop_long_prompts(   # by identity: two examples may be equal
        task, examples, tokenizer, limit, args, f"--task {args.task}",
        why="the positions or --max_context less what a round generates after it: --max_new_tokens, and with "
            "--rounds over 1 --critic_max_new_tokens and the critic's instructions")}
    return [(i, ex) for i, ex in enumerate(examples) if id(ex) in kept], len(examples) - len(kept)


def load_models(args, device):
    """(solver model, critic model or None), from folders checked_models passed. None: the solver critiques
    itself."""
    load = lambda path: Qwen3.from_pretrained(path, dtype=DTYPES[args.dtype], device=device).eval()
    return load(args.model), None if self_critic(args) else load(args.critic_model)


# ==================================================================================================
# Sampling and records
# ==================================================================================================

def eval_config(args):
    """The rollout's SamplingConfig: n chains per example, K rounds, the gate and the episode limits."""
    return SamplingConfig(group_size=args.n, max_new_tokens=args.max_new_tokens,
                          critic_max_new_tokens=args.critic_max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, enable_thinking=args.enable_thinking, max_batch=args.rollout_batch,
                          rounds=args.rounds, critic_gate=args.critic_gate, max_turns=args.max_turns,
                          max_context=args.max_context, obs_chars=args.obs_chars,
                          compile_sampler=args.compile_sampler)


def episode_row(ep, tokenizer):
    """One episode as plain data: its context and text decoded (special tokens kept), actions, observations."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    return dict(context=decode(ep.context), text=decode(ep.tokens), actions=list(ep.actions),
                observations=list(ep.observations), reward=ep.reward, end=ep.end, action_tokens=ep.action_tokens)


def chain_row(index, example, c, chain, tokenizer):
    """One chain as plain data (gathered across ranks, one line of samples.jsonl)."""
    rounds = []
    for k, ep in enumerate(chain.episodes):
        cr = chain.critiques[k] if k < len(chain.critiques) else None
        rounds.append(dict(
            episode_row(ep, tokenizer),
            critic_context=None if cr is None else tokenizer.decode(cr.context, skip_special_tokens=False),
            critique=None if cr is None else cr.text, critique_tokens=None if cr is None else len(cr.tokens),
            critique_finished=None if cr is None else cr.finished))
    return dict(example=index, id=example.id, question=example.question, answer=example.answer, chain=c,
                rounds=rounds, second_attempt_reward=None, second_attempt=None)


def evaluate(model, tokenizer, critic, task, numbered, args, ctx):
    """This rank's per-chain rows of the (index, example) pairs `numbered`. Batch b (of --batch_examples
    examples) goes to rank b % world and is sampled with seed (--seed, b), its second attempts with
    (--seed, b, 1): every batch is the same whatever the number of ranks."""
    cfg = eval_config(args)
    second_cfg = dataclasses.replace(cfg, group_size=1)
    batches = list(enumerate(chunks(numbered, args.batch_examples)))
    mine = batches[ctx.rank::ctx.world]
    rows = []
    bar = tqdm(total=sum(len(b) for _, b in mine), disable=not ctx.main, unit="ex", dynamic_ncols=True)
    for b, batch in mine:
        rollouts, _ = rollout(model, tokenizer, task, [ex for _, ex in batch], cfg, seed=mix_seed(args.seed, b),
                              critique=True, critic_model=critic)
        batch_rows = [chain_row(i, ro.example, c, chain, tokenizer)
                      for (i, _), ro in zip(batch, rollouts) for c, chain in enumerate(ro.chains)]
        # SPEC §4 critique value: one more critique-free attempt S(x), from a fresh reset, for every chain
        # whose first attempt failed and was critiqued (duplicates of an example are separate draws).
        failed = [row for row in batch_rows if critiqued_failure(row)]
        if failed:
            by_index = dict(batch)
            second, _ = rollout(model, tokenizer, task, [by_index[row["example"]] for row in failed], second_cfg,
                                seed=mix_seed(args.seed, b, 1), critique=False)
            for row, ro in zip(failed, second):
                row["second_attempt"] = episode_row(ro.chains[0].episodes[0], tokenizer)
                row["second_attempt_reward"] = row["second_attempt"]["reward"]
        rows += batch_rows
        bar.update(len(batch))
    bar.close()
    return rows


def gather(rows, ctx):
    """All ranks' rows on rank 0, in (example, chain) order (None elsewhere)."""
    if ctx.world > 1:
        everyone = [None] * ctx.world
        dist.all_gather_object(everyone, rows)
        rows = [r for part in everyone for r in part]
    return sorted(rows, key=lambda r: (r["example"], r["chain"])) if ctx.main else None


# ==================================================================================================
# Outputs
# ==================================================================================================

def samples_jsonl(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def figure_keys(ks, rounds):
    """summary.json's figures in the table's order."""
    keys = [f"pass@{k}" for k in ks] + [f"acc_round_{k}" for k in range(1, rounds + 1)] + ["retry_acc"]
    keys += [f"retry_acc_r{k}" for k in range(2, rounds + 1)] if rounds > 2 else []
    return keys + ["critique_value", "critique_value_se", "failed_retry_acc", "second_attempt_acc", "failed_chains",
                   "internalisation_gap", "critique_tokens", "critiqued_frac", "turns", "trunc_frac"]


def table(summary, ks, rounds):
    signed, counts = ("critique_value", "internalisation_gap"), ("failed_chains",)
    plain2 = ("critique_tokens", "turns")

    def fmt(key, v):
        if v is None:
            return "n/a"
        return (f"{v:+.4f}" if key in signed else f"{v:d}" if key in counts else f"{v:.2f}" if key in plain2
                else f"{v:.4f}")
    critic = summary["critic_model"] or "self"
    lines = [f"{summary['task']} ({summary['split']}): {summary['examples']} examples x n={summary['n']} "
             f"({summary['chains']} chains), K={summary['rounds']} rounds, gate {summary['critic_gate']}, "
             f"model {summary['model']}, critic {critic}"]
    lines += [f"  {key:<22}{fmt(key, summary[key]):>10}" for key in figure_keys(ks, rounds)]
    if summary["temperature"] == 0:
        lines.append("  note: at --temperature 0 the second attempt replays the first, so critique_value, its SE and "
                     "second_attempt_acc are n/a")
    return "\n".join(lines)


# ==================================================================================================
# Command line
# ==================================================================================================

def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # p.error: one line
    # model and task
    p.add_argument("--model", default="runs/icrl/final", help="the solver: a Hugging Face Qwen3 folder "
                   "with its tokenizer files (icrl.py writes them)")
    p.add_argument("--critic_model", default=None, help="critic swap (SPEC §4): critiques from this checkpoint "
                   "(same vocabulary), attempts and retries from --model")
    p.add_argument("--task", default=None, help="arithmetic | countdown | gsm8k | math (one turn); "
                   "gridworld | guess | boxes (multi-turn); agentgym:<alfworld|webshop|sciworld|searchqa> with "
                   "--env_url (data.py). Default: the task --model was trained on (its trainer_state.json), with "
                   "its --task_knob, --env_url and episode settings (--enable_thinking, --max_new_tokens, ...) where "
                   "those are not given; boxes for a folder without one")
    p.add_argument("--env_url", default=None, help="agentgym tasks: comma-separated AgentGym server URLs, one "
                   "episode at a time each (../shared/AGENTGYM.md)")
    p.add_argument("--eval_file", default=None, help="JSONL split (gsm8k, math), or AgentGym task ids (JSONL "
                   "or one per line)")
    p.add_argument("--task_knob", action="append", default=None, metavar="KEY=VALUE", help="a task option, "
                   "repeatable, as for icrl.py (e.g. --task_knob digits=3)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split of a synthetic task (or "
                   "of agentgym's default ids); a file task's split is its --eval_file")
    p.add_argument("--task_seed", type=int, default=0, help="seed of a synthetic task's examples (icrl.py "
                   "generates its held-out split with its --seed, default 0)")
    p.add_argument("--max_examples", type=int, default=200, help="the first M examples (0: all)")
    p.add_argument("--enable_thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="passed to the chat template (SPEC §1)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and compute dtype")
    # chains and rounds (SPEC §2.1-2.4, §4)
    # --samples is --n's alias for torchrun, whose own parser rejects a later `--n` as an ambiguous
    # abbreviation of its --nnodes / --nproc_per_node before eval.py ever runs.
    p.add_argument("--n", "--samples", type=int, default=4, help="chains (attempts) per example; write "
                   "--samples under torchrun")
    p.add_argument("--k", type=int, action="append", default=None, help="report pass@k; repeat the flag "
                   "for several (pass@1 is always reported; default: 1 and n)")
    add_episode_args(p)
    # sampling
    p.add_argument("--max_new_tokens", type=int, default=16, help="each action turn (attempts and retries)")
    p.add_argument("--critic_max_new_tokens", type=int, default=24, help="critiques")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=0, help="seeds every sampling call, with the batch index")
    p.add_argument("--batch_examples", type=int, default=64, help="examples per rollout (n chains each); "
                   "batches are dealt round-robin to the ranks")
    p.add_argument("--rollout_batch", type=int, default=0, help="most sequences per sampling call, to bound "
                   "the KV cache (rounded down to a multiple of n, at least n; 0: a phase's whole batch at once)")
    # output
    p.add_argument("--out", default="runs/icrl/eval", help="folder for summary.json and samples.jsonl")
    # the EPISODE_SETTINGS not given are None here, then --model's run's (defaults_from_checkpoint) or these
    fallback = {key: p.get_default(key) for key in EPISODE_SETTINGS}
    p.set_defaults(**dict.fromkeys(EPISODE_SETTINGS))
    args = p.parse_args(argv)
    defaults_from_checkpoint(args, fallback)
    args.k = sorted(set(args.k or [args.n]) | {1})  # pass@1 always: the critique-free reference
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if bad := [k for k in args.k if not 1 <= k <= args.n]:
        p.error(f"--k {bad[0]}: pass@k needs 1 <= k <= n, and --n is {args.n} (raise --n or lower --k)")
    if args.rounds < 1 or args.max_turns < 0:
        p.error(f"--rounds must be at least 1 and --max_turns at least 0, got {args.rounds} and {args.max_turns}")
    if args.max_examples < 0 or args.batch_examples < 1:
        p.error("--max_examples must be >= 0 and --batch_examples >= 1")
    if min(args.rollout_batch, args.max_context, args.obs_chars) < 0:
        p.error("--rollout_batch, --max_context and --obs_chars must be >= 0")
    try:
        check_sampling_flags(args, greedy=True)   # icrl.py's checks; --temperature 0 is greedy decoding here
    except UsageError as e:
        p.error(str(e))
    if args.split == "train" and args.eval_file:
        p.error(f"--split train: --eval_file {args.eval_file} is read whatever the split (--split picks a "
                f"synthetic task's split); pass the file of the split to evaluate")
    return args


def main(argv=None):
    """Returns summary.json's dict on rank 0, None on the other ranks. A mistake in a flag, the task, a
    checkpoint folder or --out is one line (exit status 2) before any weight loads."""
    try:
        args = parse_args(argv)
        task = checked_task(args, args.eval_file, args.split, args.task_seed)
        tokenizer, positions = checked_models(args)
        check_out(args.out)
        numbered, dropped = examples_to_sample(args, task, tokenizer, positions)
    except UsageError as e:  # the same on every rank under torchrun: rank 0 says it
        usage_exit(e, say=first_rank())
    if args.tiny_limits and args.task not in SYNTHETIC_TASKS:
        warn(f"{' and '.join(args.tiny_limits)}: eval.py's defaults, sized for the tiny model of the built-in tasks; "
             f"a real model's answers to {args.task} need more (README's Qwen3 command: 2048 and 1024)")
    ctx = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    return run_then_shut_down(lambda: run(args, ctx, task, tokenizer, numbered, dropped), ctx, fsdp=False)


SETTINGS = ("task", "task_knob", "split", "eval_file", "model", "n", "k", "rounds", "critic_gate", "max_turns",
            "max_context", "obs_chars", "temperature", "top_p", "max_new_tokens", "critic_max_new_tokens",
            "enable_thinking", "dtype", "seed", "task_seed", "batch_examples", "rollout_batch")


def run(args, ctx, task, tokenizer, numbered, dropped):
    t0 = time.perf_counter()
    model, critic = load_models(args, ctx.device)
    args.max_turns = args.max_turns or task.max_turns
    print0(ctx, "config:", json.dumps(vars(args), indent=1))
    n_batches = math.ceil(len(numbered) / args.batch_examples)
    if n_batches < ctx.world:
        print0(ctx, f"note: {n_batches} batch(es) for {ctx.world} ranks; lower --batch_examples to use them all")
    with torch.no_grad():
        rows = gather(evaluate(model, tokenizer, critic, task, numbered, args, ctx), ctx)
    if not ctx.main:
        return None
    summary = dict(figures(rows, args.k, args.rounds, greedy=args.temperature == 0),
                   **{key: getattr(args, key) for key in SETTINGS},
                   critic_model=None if critic is None else args.critic_model, dropped_long_prompts=dropped,
                   world_size=ctx.world,
                   seconds=time.perf_counter() - t0)
    write_atomic(os.path.join(args.out, "samples.jsonl"), samples_jsonl(rows))
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(table(summary, args.k, args.rounds))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and samples.jsonl ({summary['chains']} lines)")
    return summary


if __name__ == "__main__":
    main()
