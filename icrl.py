"""ICRL training: one Qwen3 learns to solve, to critique its own attempts, and to internalise the
critique-guided improvements into its critique-free solver (../shared/SPEC.md is the method).

Run (the embedded default: tiny random Qwen3 + character tokenizer on `arithmetic`, CPU):
    python icrl.py                                             # one process
    torchrun --standalone --nproc_per_node 2 icrl.py           # what `make train` runs
Real checkpoints on GPUs (README has the full commands for Qwen3-4B/8B):
    torchrun --nproc_per_node 8 icrl.py --model /path/Qwen3-8B --task math --train_file train.jsonl \
        --eval_file test.jsonl --dtype bfloat16 --fsdp --grad_ckpt --out runs/qwen3-8b
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import CRITIQUE_RIGHT, CRITIQUE_WRONG, build_char_tokenizer, load_task, parse_knobs
from model import Qwen3, Qwen3Config, generate

# ==================================================================================================
# SPEC §2 equations: one function each, on plain tensors. Per-sample tensors are (N,), per-token
# tensors (N, T) with a 0/1 mask.
# ==================================================================================================


def critic_gain(r_init, r_refined):
    """SPEC §2.4: the critic's reward is the solver's gain after the critique, g = r' - r in [-1, 1]."""
    return r_refined - r_init


def group_advantages(values, group_ids, eps=1e-6):
    """SPEC §2.5: A = (v - mean(group)) / (std(group) + eps), std with Bessel's correction.

    A constant group gives A = 0; so does a group of one (its Bessel std is undefined, and one sample
    carries no relative signal)."""
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    values = values.double()  # sums of many rewards: accumulate in float64
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, group, values)
    mean = (total / count)[group]
    sq_dev = torch.zeros_like(count).index_add_(0, group, (values - mean) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()[group]
    adv = (values - mean) / (std + eps)
    return torch.where(count[group] > 1, adv, torch.zeros_like(adv)).to(out_dtype)


def calibration_weights(logp_free, logp_cond, mask, mode="token", clip=1.0):
    """SPEC §2.6: distribution-calibration weight of each refinement token, stop-gradient.

    token: w_t = min(exp(l_free_t - l_cond_t), clip). seq: one weight per refinement,
    min(exp(mean_t(l_free_t - l_cond_t)), clip): a geometric mean, never the raw product, which
    explodes with length. none: w = 1 (naive transfer). Masked positions get 0."""
    mask = mask.to(logp_free.dtype)
    log_ratio = (logp_free - logp_cond).detach()
    if mode == "token":
        weights = log_ratio.exp().clamp(max=clip)
    elif mode == "seq":
        mean_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        weights = mean_log_ratio.exp().clamp(max=clip)[:, None].expand_as(log_ratio)
    elif mode == "none":
        weights = torch.ones_like(log_ratio)
    else:
        raise ValueError(f"calibration mode must be token, seq or none, got {mode!r}")
    return weights * mask


def clipped_token_loss(logp, old_logp, adv, weight, mask, clip_low=0.2, clip_high=0.28):
    """SPEC §2.7: loss_t = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), per token,
    unreduced; rho_t = exp(logp_t - old_logp_t). The asymmetric clip is DAPO's."""
    ratio = (logp - old_logp).exp()
    adv = adv[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return -weight * surrogate * mask


def rolewise_token_mean(token_loss, mask, is_critic, solver_tokens, critic_tokens, critic_coef=1.0,
                        world_size=1):
    """SPEC §2.7 aggregation: L = L_solver + critic_coef * L_critic, each role's token-loss sum over the
    global batch divided by that role's global response-token count.

    Each rank holds a slice, and DDP averages gradients over ranks, so the local sums are scaled by
    world_size / N_global: the average of the ranks' gradients is then exactly the global token mean."""
    per_sample = (token_loss * mask).sum(-1)
    solver_sum = per_sample[~is_critic].sum()
    critic_sum = per_sample[is_critic].sum()
    loss = solver_sum * (world_size / max(solver_tokens, 1))
    return loss + critic_coef * critic_sum * (world_size / max(critic_tokens, 1))


# ==================================================================================================
# Rollout: solve -> critique -> refine (SPEC §2.1-2.3). eval.py reuses it.
# ==================================================================================================

@dataclass
class Response:
    """One sampled completion: ids (ending with the stop id when finished), sampler log-probs, text."""
    tokens: list
    logprobs: list
    finished: bool
    text: str
    reward: float = 0.0


@dataclass
class QueryRollout:
    """Everything sampled for one query x: G attempts, and in ICRL one critique and refinement each."""
    example: object
    solver_context: list
    attempts: list
    critic_contexts: list = field(default_factory=list)
    critiques: list = field(default_factory=list)
    refiner_contexts: list = field(default_factory=list)
    refinements: list = field(default_factory=list)


@dataclass
class SamplingConfig:
    group_size: int = 8
    max_new_tokens: int = 16           # solver attempts and refinements
    critic_max_new_tokens: int = 32    # critiques
    temperature: float = 1.0
    top_p: float = 1.0
    enable_thinking: bool = False
    max_batch: int = 0                 # sequences per sampling call (bounds the KV cache); 0: all at once


def stop_token_ids(tokenizer):
    """Ids that end a turn: the chat template's <|im_end|> and <|endoftext|> (a base model's EOS)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def _sample(model, tokenizer, contexts, max_new_tokens, cfg, seed):
    # Calls of at most max_batch sequences, a multiple of G, so a group's prompt is prefilled once.
    size = len(contexts) if not cfg.max_batch else max(cfg.max_batch // cfg.group_size, 1) * cfg.group_size
    gens = [g for i, part in enumerate(chunks(contexts, size))
            for g in generate(model, part, max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_ids=stop_token_ids(tokenizer), seed=mix_seed(seed, i))]
    # Text excludes the stop id; special tokens are dropped so model text can never forge a chat turn
    # when it is placed into the next role's prompt.
    return [Response(g.tokens, g.logprobs, g.finished,
                     tokenizer.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special_tokens=True))
            for g in gens]


def _score(task, examples, responses):
    # SPEC §1: a response cut off by max_new_tokens scores 0.
    for example, response in zip(examples, responses):
        response.reward = float(task.reward(example, response.text)) if response.finished else 0.0


def rollout(model, tokenizer, task, examples, cfg, seed, critique=True, critic_model=None):
    """SPEC §2.1-2.3 for a list of queries: G attempts each; with `critique`, one critique per attempt
    (by `critic_model` when given: the critic swap of SPEC §4) and one refinement per critique.
    Returns ([QueryRollout], {"sample": seconds, "score": seconds})."""
    G, times = cfg.group_size, {"sample": 0.0, "score": 0.0}
    think = cfg.enable_thinking
    if not examples:  # a rank whose share of a small evaluation is empty
        return [], times

    def run(contexts, max_new_tokens, phase, by_model):
        t = time.perf_counter()
        out = _sample(by_model, tokenizer, contexts, max_new_tokens, cfg, mix_seed(seed, phase))
        times["sample"] += time.perf_counter() - t
        return out

    def score(responses, per_response_examples):
        t = time.perf_counter()
        _score(task, per_response_examples, responses)
        times["score"] += time.perf_counter() - t

    rollouts = [QueryRollout(ex, task.solver_context(tokenizer, ex, enable_thinking=think), []) for ex in examples]
    group_examples = [ro.example for ro in rollouts for _ in range(G)]
    # 1. Solve: each context repeated G times; the sampler prefills it once.
    attempts = run([ro.solver_context for ro in rollouts for _ in range(G)], cfg.max_new_tokens, 1, model)
    score(attempts, group_examples)
    for q, ro in enumerate(rollouts):
        ro.attempts = attempts[q * G:(q + 1) * G]
    if not critique:
        return rollouts, times
    # 2. Critique every attempt, right ones included (breaking a right answer must cost, SPEC §2.2).
    for ro in rollouts:
        ro.critic_contexts = [task.critic_context(tokenizer, ro.example, a.text, enable_thinking=think)
                              for a in ro.attempts]
    critiques = run([c for ro in rollouts for c in ro.critic_contexts], cfg.critic_max_new_tokens, 2,
                    critic_model or model)
    # 3. Refine under F(x, y, c).
    for q, ro in enumerate(rollouts):
        ro.critiques = critiques[q * G:(q + 1) * G]
        ro.refiner_contexts = [task.refiner_context(tokenizer, ro.example, a.text, c.text, enable_thinking=think)
                               for a, c in zip(ro.attempts, ro.critiques)]
    refinements = run([c for ro in rollouts for c in ro.refiner_contexts], cfg.max_new_tokens, 3, model)
    score(refinements, group_examples)
    for q, ro in enumerate(rollouts):
        ro.refinements = refinements[q * G:(q + 1) * G]
    return rollouts, times


def sampling_config(args, group_size=None, temperature=None):
    return SamplingConfig(group_size or args.group_size, args.max_new_tokens, args.critic_max_new_tokens,
                          args.temperature if temperature is None else temperature, args.top_p,
                          args.enable_thinking, args.rollout_batch)


def mix_seed(*parts):
    """A 63-bit seed from integers, e.g. (seed, step, rank, phase): one generator per sampling call."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ==================================================================================================
# The trained batch (SPEC §2.5 advantages, §2.7 table)
# ==================================================================================================

@dataclass
class TrainSample:
    context: list            # what the loss conditions on
    response: list
    is_critic: bool
    adv: float
    calib_context: list = None   # F(x, y, c) of an internalised refinement: where l_cond is taken (§2.6)
    sampler_logprobs: list = None
    old_logp: torch.Tensor = None   # l_old under `context` (set by old_logprobs)
    cond_logp: torch.Tensor = None  # l_cond under `calib_context`


def build_samples(rollouts, algo="icrl", adv_mode="rolewise", train_critic=True):
    """SPEC §2.4-2.5 and the §2.7 table: attempts and internalised refinements under S(x) with solver
    advantages, critiques under C(x, y) with critic advantages. Returns a list per query."""
    values, group_ids = [], []
    for q, ro in enumerate(rollouts):
        r = torch.tensor([a.reward for a in ro.attempts])
        if algo == "grpo":
            values.append(r)
            group_ids.append(torch.full_like(r, 2 * q))
            continue
        r_refined = torch.tensor([a.reward for a in ro.refinements])
        gain = critic_gain(r, r_refined)
        critic_group = 2 * q if adv_mode == "pooled" else 2 * q + 1
        values += [r, r_refined, gain]
        group_ids += [torch.full_like(r, 2 * q), torch.full_like(r, 2 * q), torch.full_like(r, critic_group)]
    adv = group_advantages(torch.cat(values), torch.cat(group_ids).long()).tolist()
    per_query, k = [], 0
    for ro in rollouts:
        G = len(ro.attempts)
        a_attempt, k = adv[k:k + G], k + G
        samples = [TrainSample(ro.solver_context, a.tokens, False, a_attempt[i], None, a.logprobs)
                   for i, a in enumerate(ro.attempts)]
        if algo == "icrl":
            a_refined, a_critic, k = adv[k:k + G], adv[k + G:k + 2 * G], k + 2 * G
            # The internalised refinement: y' trained under S(x), the critique removed (§2.7).
            samples += [TrainSample(ro.solver_context, y.tokens, False, a_refined[i], ro.refiner_contexts[i],
                                    y.logprobs) for i, y in enumerate(ro.refinements)]
            if train_critic:
                samples += [TrainSample(ro.critic_contexts[i], c.tokens, True, a_critic[i], None, c.logprobs)
                            for i, c in enumerate(ro.critiques)]
        per_query.append(samples)
    return per_query


# ==================================================================================================
# Log-probs of responses under a context, on right-padded batches
# ==================================================================================================

def pad_batch(contexts, responses, device):
    """Right-padded (B, L) ids of context + response, the (B, T) response mask and gather positions.
    Masks come from lengths, never from token ids: the pad id may equal EOS (SPEC §2.7)."""
    ctx_len = torch.tensor([len(c) for c in contexts])
    resp_len = torch.tensor([len(r) for r in responses])
    L, T = int((ctx_len + resp_len).max()), max(int(resp_len.max()), 1)
    ids = torch.zeros(len(contexts), L, dtype=torch.long)
    targets = torch.zeros(len(contexts), T, dtype=torch.long)
    for b, (c, r) in enumerate(zip(contexts, responses)):
        ids[b, :len(c) + len(r)] = torch.tensor(c + r, dtype=torch.long)
        targets[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    mask = (torch.arange(T)[None, :] < resp_len[:, None]).float()
    # logits at position p predict token p + 1: response token t is predicted at ctx_len - 1 + t.
    positions = (ctx_len[:, None] - 1 + torch.arange(T)[None, :]).clamp(max=L - 1)
    return ids.to(device), targets.to(device), mask.to(device), positions.to(device)


def response_logprobs(model, contexts, responses, temperature, device):
    """log pi(response_t | context, response_<t) at the sampling temperature: (B, T) and its mask."""
    ids, targets, mask, positions = pad_batch(contexts, responses, device)
    logits = model(ids, logits_at=positions)                              # (B, T, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1) * mask, mask


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def micro_batches(samples, size, key=lambda s: len(s.context) + len(s.response)):
    """Micro-batches of similar length, so little of each padded batch is padding. The loss is a sum
    over samples, so the grouping changes nothing but speed."""
    return chunks(sorted(samples, key=key), size)


# ==================================================================================================
# Distributed: `python icrl.py` and `torchrun ... icrl.py` run the same code
# ==================================================================================================

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def init_distributed():
    """NCCL on GPUs, gloo on CPU, keyed on torchrun's environment variables."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def all_reduce(values, ctx, op=None):
    """All-reduce a list of floats with an explicit op (default SUM); returns floats."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def print0(ctx, *args):
    if ctx.main:
        tqdm.write(" ".join(str(a) for a in args))


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def wrap_model(model, args, ctx):
    """DDP by default; --fsdp shards parameters, gradients and optimizer state with FSDP2, one unit
    per decoder layer, so Qwen3-4B/8B fit on 8 GPUs. Parameters stay float32 (the master copy);
    --dtype bfloat16 computes in bfloat16."""
    model.grad_checkpointing = args.grad_ckpt
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[args.dtype], reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if ctx.world > 1:
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def full_weights(model, args):
    """Rollouts use full weights (issue: FSDP). Under FSDP2 every layer is gathered once for the whole
    rollout instead of once per decoded token; autocast gives --dtype compute under DDP."""
    if not args.fsdp:
        with autocast_for(model, args):
            yield unwrap(model)
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model)  # FSDP2's defaults: the root stays gathered


def model_device(model):
    return next(unwrap(model).parameters()).device


def no_grad_sync(model, args, sync):
    """Accumulate micro-batch gradients locally; synchronise on the last one only."""
    if sync:
        return contextlib.nullcontext()
    if args.fsdp:
        model.set_requires_gradient_sync(False)
        return _restore_gradient_sync(model)
    return model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ==================================================================================================
# One ICRL update (SPEC §2.6-2.8)
# ==================================================================================================

@torch.no_grad()
def old_logprobs(model, samples, args, ctx):
    """log pi_old of every response under its training context (l_old), and for internalised
    refinements also under F(x, y, c) (l_cond, SPEC §2.6). Recomputed by the trainer, so that rho = 1
    exactly on the first pass; the sampler's own log-probs only feed the logprob_gap metric."""
    try:
        _old_logprobs(model, samples, args, ctx)
    finally:
        # FSDP2 keeps its root unit gathered after a forward with no backward to follow; reshard it,
        # or model.parameters() would hand out the gathered copies instead of the trained shards.
        if hasattr(model, "reshard"):
            model.reshard()


def _old_logprobs(model, samples, args, ctx):
    for micro in micro_batches(samples, args.micro_batch):
        logp, mask = response_logprobs(model, [s.context for s in micro], [s.response for s in micro],
                                       args.temperature, ctx.device)
        for s, row, n in zip(micro, logp, mask.sum(-1).long().tolist()):
            s.old_logp = row[:n].float().cpu()
    refined = [s for s in samples if s.calib_context is not None]
    for micro in micro_batches(refined, args.micro_batch, key=lambda s: len(s.calib_context) + len(s.response)):
        logp, mask = response_logprobs(model, [s.calib_context for s in micro], [s.response for s in micro],
                                       args.temperature, ctx.device)
        for s, row, n in zip(micro, logp, mask.sum(-1).long().tolist()):
            s.cond_logp = row[:n].float().cpu()


def pad_rows(rows, T):
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def sample_weights(micro, T, args):
    """Token weights w of SPEC §2.7: 1 for attempts and critiques, §2.6 for internalised refinements."""
    mask = pad_rows([torch.ones(len(s.response)) for s in micro], T)
    weights = mask.clone()
    refined = [i for i, s in enumerate(micro) if s.calib_context is not None]
    if refined:
        free = pad_rows([micro[i].old_logp for i in refined], T)
        cond = pad_rows([micro[i].cond_logp for i in refined], T)
        weights[refined] = calibration_weights(free, cond, mask[refined], args.calib, args.calib_clip)
    return weights


def update(model, optimizer, samples_by_query, args, ctx, step):
    """SPEC §2.7-2.8: --ppo_epochs passes over --minibatch slices of the queries; one optimizer step
    per slice, its loss the role-wise token mean over the slice's global batch. Micro-batches bound
    memory without changing the loss. A non-finite loss or gradient skips the update."""
    local_queries = len(samples_by_query)
    per_update = args.minibatch // ctx.world
    stats = dict(loss_solver=0.0, loss_critic=0.0, clipped=0.0, tokens=0.0, grad_norm=0.0, updates=0,
                 skipped=0)
    gen = torch.Generator().manual_seed(mix_seed(args.seed, step, ctx.rank, 4))
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(local_queries, generator=gen).tolist() if args.ppo_epochs > 1 else list(range(local_queries))
        for start in range(0, local_queries, per_update):
            minibatch = [s for q in order[start:start + per_update] for s in samples_by_query[q]]
            n_solver, n_critic = all_reduce([sum(len(s.response) for s in minibatch if not s.is_critic),
                                             sum(len(s.response) for s in minibatch if s.is_critic)], ctx)
            micros = micro_batches(minibatch, args.micro_batch)
            finite = True
            for i, micro in enumerate(micros):
                with no_grad_sync(model, args, sync=i == len(micros) - 1), autocast_for(model, args):
                    logp, mask = response_logprobs(model, [s.context for s in micro],
                                                   [s.response for s in micro], args.temperature, ctx.device)
                    T = mask.shape[1]
                    old = pad_rows([s.old_logp for s in micro], T).to(ctx.device)
                    weight = sample_weights(micro, T, args).to(ctx.device)
                    adv = torch.tensor([s.adv for s in micro], device=ctx.device)
                    is_critic = torch.tensor([s.is_critic for s in micro], device=ctx.device)
                    token_loss = clipped_token_loss(logp, old, adv, weight, mask, args.clip_low, args.clip_high)
                    loss = rolewise_token_mean(token_loss, mask, is_critic, n_solver, n_critic,
                                               args.critic_coef, ctx.world)
                    finite &= bool(torch.isfinite(loss))
                    loss.backward()
                with torch.no_grad():
                    per_sample = token_loss.sum(-1)
                    stats["loss_solver"] += float(per_sample[~is_critic].sum()) / max(n_solver, 1)
                    stats["loss_critic"] += float(per_sample[is_critic].sum()) / max(n_critic, 1)
                    ratio = (logp - old).exp()
                    clipped = torch.where(adv[:, None] > 0, ratio > 1 + args.clip_high, ratio < 1 - args.clip_low)
                    stats["clipped"] += float((clipped.float() * mask).sum())
                    stats["tokens"] += float(mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = all_reduce([0.0 if finite else 1.0], ctx, dist.ReduceOp.MAX)[0] == 0.0
            if finite and math.isfinite(float(grad_norm)):
                for group in optimizer.param_groups:  # a function of the step alone, so resume is exact
                    group["lr"] = args.lr * min(1.0, (step + 1) / max(args.lr_warmup, 1))
                optimizer.step()
                stats["grad_norm"] += float(grad_norm)
                stats["updates"] += 1
            else:
                stats["skipped"] += 1
                print0(ctx, f"warning: step {step}: non-finite loss or gradient, update skipped")
            optimizer.zero_grad(set_to_none=True)
    return stats


def autocast_for(model, args):
    """--dtype bfloat16 under DDP computes in bfloat16 over float32 master weights (FSDP2 does this
    through its mixed-precision policy instead)."""
    return torch.autocast(model_device(model).type, dtype=DTYPES[args.dtype],
                          enabled=args.dtype != "float32" and not args.fsdp)


# ==================================================================================================
# What a step reports (SPEC §3)
# ==================================================================================================

def step_metrics(rollouts, samples, stats, times, args, ctx):
    """SPEC §3 figures over the global batch, each all-reduced with an explicit op."""
    SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX
    attempts = [a for ro in rollouts for a in ro.attempts]
    refinements = [y for ro in rollouts for y in ro.refinements]
    critiques = [c for ro in rollouts for c in ro.critiques]
    pairs = [(a.reward == 1.0, y.reward == 1.0) for ro in rollouts for a, y in zip(ro.attempts, ro.refinements)]
    refined = [s for s in samples if s.calib_context is not None]
    gap = 0.0
    for s in samples:
        reference = s.cond_logp if s.calib_context is not None else s.old_logp
        if len(s.response):
            gap = max(gap, float((torch.tensor(s.sampler_logprobs) - reference).abs().max()))
    sums = all_reduce([
        sum(a.reward for a in attempts), len(attempts),
        sum(y.reward for y in refinements), len(refinements),
        sum(1 for r, r2 in pairs if not r and r2), sum(1 for r, _ in pairs if not r),
        sum(1 for r, r2 in pairs if r and not r2), sum(1 for r, _ in pairs if r),
        sum(y.reward - a.reward for ro in rollouts for a, y in zip(ro.attempts, ro.refinements)),
        sum(len(a.tokens) for a in attempts + refinements), len(attempts) + len(refinements),
        sum(len(c.tokens) for c in critiques), len(critiques),
        stats["loss_solver"], stats["loss_critic"], stats["clipped"], stats["tokens"], stats["grad_norm"],
    ], ctx, SUM)
    (r_sum, n_att, r2_sum, n_ref, fixed, wrong, broken, right, gain_sum, solver_tok, n_solver,
     critic_tok, n_critic, loss_s, loss_c, clipped, tokens, grad_norm) = sums
    gap, t_sample, t_score, t_train = all_reduce([gap, times["sample"], times["score"], times["train"]], ctx, MAX)
    n_updates = max(stats["updates"] + stats["skipped"], 1)
    div = lambda a, b: a / b if b else 0.0
    metrics = dict(
        acc=div(r_sum, n_att), refined_acc=div(r2_sum, n_ref), fix_rate=div(fixed, wrong),
        break_rate=div(broken, right), gain=div(gain_sum, n_ref),
        len_solver=div(solver_tok, n_solver), len_critic=div(critic_tok, n_critic),
        loss_solver=loss_s / n_updates, loss_critic=loss_c / n_updates, clip_frac=div(clipped, tokens),
        grad_norm=grad_norm / ctx.world / max(stats["updates"], 1), logprob_gap=gap,
        tok_per_s=div(solver_tok + critic_tok, t_sample + t_score + t_train),
        t_sample=t_sample, t_score=t_score, t_train=t_train, skipped_updates=stats["skipped"])
    if args.algo == "icrl":
        metrics.update(calibration_summary(refined, args, ctx))
    else:  # GRPO samples no critique: report no critique figures rather than zeros
        for key in ("refined_acc", "fix_rate", "break_rate", "gain", "len_critic", "loss_critic"):
            del metrics[key]
    return metrics


def calibration_summary(refined, args, ctx):
    """Mean, 10th percentile and share below 0.5 of the §2.6 weights over all refinement tokens."""
    local = [sample_weights([s], len(s.response), args)[0] for s in refined if len(s.response)]
    local = torch.cat(local) if local else torch.zeros(0)
    gathered = [local]
    if ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, local)
    w = torch.cat(gathered)
    if not w.numel():
        return dict(calib_w_mean=0.0, calib_w_p10=0.0, calib_w_low_frac=0.0)
    return dict(calib_w_mean=float(w.mean()), calib_w_p10=float(torch.quantile(w, 0.1)),
                calib_w_low_frac=float((w < 0.5).float().mean()))


@torch.no_grad()
def critique_free_accuracy(model, tokenizer, task, examples, args, ctx, samples=0):
    """Held-out critique-free accuracy: greedy, and with `samples` > 0 also SPEC §4's pass@1, the mean
    reward of that many attempts per example at the training temperature (the quantity RL maximises;
    eval.py's pass@1). Each rank scores its share; the sums are all-reduced. Returns (greedy, pass@1)."""
    mine = examples[ctx.rank::ctx.world]
    with full_weights(model, args) as m:
        greedy, _ = rollout(m, tokenizer, task, mine, sampling_config(args, 1, 0.0), seed=0, critique=False)
        sampled, _ = rollout(m, tokenizer, task, mine, sampling_config(args, samples), seed=mix_seed(args.seed, 7),
                             critique=False) if samples else ([], None)
    greedy_correct, sampled_correct, n = all_reduce([sum(ro.attempts[0].reward for ro in greedy),
                                                     sum(a.reward for ro in sampled for a in ro.attempts), len(mine)], ctx)
    return greedy_correct / max(n, 1), sampled_correct / max(n * samples, 1)


# ==================================================================================================
# Supervised warm start for the randomly initialised default model
# ==================================================================================================

def warm_start_pairs(task, tokenizer, example, rng, think, with_critique):
    """(context, response text) pairs that teach the three SPEC §1 formats: the solver answers in
    \\boxed{}; with `with_critique`, the critic judges an attempt (right, or off by a little) and
    gives its own answer, and the refiner answers again. Critique pairs need integer answers."""
    answer = example.answer
    boxed = f"\\boxed{{{answer}}}"
    pairs = [(task.solver_context(tokenizer, example, enable_thinking=think), boxed)]
    if not with_critique or not answer.lstrip("-").isdigit():
        return pairs
    attempt = f"\\boxed{{{int(answer) + rng.choice([-10, -1, 1, 10])}}}" if rng.random() < 0.5 else boxed
    critique = CRITIQUE_RIGHT if attempt == boxed else CRITIQUE_WRONG.format(answer=answer)
    pairs.append((task.critic_context(tokenizer, example, attempt, enable_thinking=think), critique))
    pairs.append((task.refiner_context(tokenizer, example, attempt, critique, enable_thinking=think), boxed))
    return pairs


def warm_start(model, tokenizer, task, args, ctx):
    """Supervised warm start of a randomly initialised model, so that RL starts with some reward and a
    critic and refiner that know their formats: token-mean cross-entropy on warm_start_pairs, the stop
    token included so the model learns to end.

    Solver pairs alone until greedy accuracy on training examples reaches --warm_start_target (checked
    every 50 steps; when a small model "gets" arithmetic varies by hundreds of steps with the data
    order), then --warm_start_role_steps more steps that add the critic and refiner pairs on every other
    example. Returns (steps, accuracy)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.warm_start_lr)
    rng = random.Random(mix_seed(args.seed, ctx.rank, 5))
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    per_rank = args.warm_start_batch // ctx.world
    probe = task.examples[:128]  # training examples: the held-out split stays unseen until RL begins
    step, acc, roles_until = 0, 0.0, None
    while roles_until is None or step < roles_until:
        if roles_until is None and step and (step % 50 == 0 or step >= args.warm_start_steps):
            acc, _ = critique_free_accuracy(model, tokenizer, task, probe, args, ctx)
            print0(ctx, f"warm start step {step}: greedy accuracy {acc:.3f} on {len(probe)} training examples")
            if acc >= args.warm_start_target or step >= args.warm_start_steps:
                roles_until = step + args.warm_start_role_steps
        with_roles = roles_until is not None
        pairs = [p for i in range(per_rank) for p in warm_start_pairs(
            task, tokenizer, rng.choice(task.examples), rng, args.enable_thinking, with_roles and i % 2 == 0)]
        contexts = [c for c, _ in pairs]
        responses = [tokenizer.encode(text, add_special_tokens=False) + [stop] for _, text in pairs]
        with autocast_for(model, args):
            logp, mask = response_logprobs(model, contexts, responses, 1.0, ctx.device)
            loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    return step, acc


# ==================================================================================================
# Checkpoints: Hugging Face folders, written atomically; optimizer and step beside the weights
# ==================================================================================================

TRAINER_STATE = "trainer_state.pt"


def full_state(model, optimizer, ctx):
    """Full (unsharded) model and optimizer state dicts keyed by parameter name, on CPU, on rank 0
    (other ranks get empty dicts). Works the same for a plain module, DDP and FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if ctx.world == 1:
        model_state = {k: v.detach().cpu() for k, v in model_state.items()}
    return model_state, optim_state


def save_checkpoint(model, optimizer, tokenizer, args, ctx, step, name):
    """Write DIR/name as a Hugging Face folder plus trainer_state.pt. Written under a temporary name and
    renamed, so a kill during a save leaves every earlier checkpoint whole; DIR/latest names the newest."""
    model_state, optim_state = full_state(model, optimizer, ctx)
    if ctx.main:
        final, tmp = os.path.join(args.out, name), os.path.join(args.out, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        # Every random draw is seeded from (seed, step, rank), so the step is the whole RNG state.
        torch.save({"step": step, "optimizer": optim_state, "args": vars(args)}, os.path.join(tmp, TRAINER_STATE))
        if os.path.exists(final):  # only `final` is ever rewritten (a run resumed past its end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(os.path.join(args.out, "latest"), name + "\n")
    if ctx.world > 1:
        dist.barrier()


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path):
    """--resume takes a checkpoint folder or a run folder (then its `latest`)."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise FileNotFoundError(f"--resume {path}: no {TRAINER_STATE} there (not an icrl.py checkpoint)")
    return path


def load_optimizer_state(model, optimizer, optim_state, ctx):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.world > 1))


# ==================================================================================================
# Command line
# ==================================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and task
    p.add_argument("--model", default="tiny", help="a Hugging Face Qwen3 folder, or `tiny`: a random 4-layer "
                   "Qwen3 with a character tokenizer (the embedded default)")
    p.add_argument("--task", default="arithmetic", help="arithmetic | countdown | gsm8k | math (data.py)")
    p.add_argument("--train_file", default=None, help="JSONL training split (gsm8k, math)")
    p.add_argument("--eval_file", default=None, help="JSONL held-out split (gsm8k, math)")
    p.add_argument("--task_knob", action="append", default=[], metavar="KEY=VALUE", help="a task option, "
                   "repeatable, e.g. --task_knob digits=3 --task_knob ops=+-* (data.py lists each task's)")
    p.add_argument("--enable_thinking", action="store_true", help="passed to the chat template (SPEC §1)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype; weights stay float32")
    # sampling (SPEC §2.1-2.3)
    p.add_argument("--group_size", type=int, default=8, help="G: attempts per query")
    p.add_argument("--batch_prompts", type=int, default=16, help="queries per step, global (split over ranks)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="solver attempts and refinements")
    p.add_argument("--critic_max_new_tokens", type=int, default=24, help="critiques")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); log-probs use it too")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--rollout_batch", type=int, default=0, help="sequences per sampling call on each rank, "
                   "to bound the KV cache (0: a phase's whole batch at once)")
    # method (SPEC §2.4-2.7) and its ablations
    p.add_argument("--algo", default="icrl", choices=["icrl", "grpo"], help="grpo: the baseline, no critique")
    p.add_argument("--calib", default="token", choices=["token", "seq", "none"], help="§2.6 weight granularity")
    p.add_argument("--calib_clip", type=float, default=1.0, help="W: upper clip of the §2.6 weight")
    p.add_argument("--adv", default="rolewise", choices=["rolewise", "pooled"], help="§2.5 advantage groups")
    p.add_argument("--no_critic_train", action="store_true", help="sample critiques, drop them from the loss")
    p.add_argument("--critic_coef", type=float, default=1.0, help="lambda_c of §2.7")
    p.add_argument("--clip_low", type=float, default=0.2, help="eps_low of §2.7")
    p.add_argument("--clip_high", type=float, default=0.28, help="eps_high of §2.7")
    # optimisation (SPEC §2.8)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (the defaults suit the tiny "
                   "model; Qwen3-4B/8B want ~1e-6)")
    p.add_argument("--lr_warmup", type=int, default=10, help="RL steps of linear learning-rate warmup: "
                   "a fresh AdamW's first steps move every weight by ~lr whatever its gradient")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over each step's samples")
    p.add_argument("--minibatch", type=int, default=None, help="queries per optimizer update, global "
                   "(default: --batch_prompts, one update per pass)")
    p.add_argument("--micro_batch", type=int, default=64, help="sequences per forward/backward (memory only)")
    p.add_argument("--warm_start_steps", type=int, default=None, help="most solver-only warm-start steps "
                   "before RL (default: 1200 for --model tiny, else 0: no warm start)")
    p.add_argument("--warm_start_target", type=float, default=0.25, help="leave the solver-only warm start "
                   "once greedy accuracy on 128 training examples reaches this")
    p.add_argument("--warm_start_role_steps", type=int, default=100, help="then this many steps that add "
                   "the critic and refiner formats")
    p.add_argument("--warm_start_lr", type=float, default=3e-3, help="warm-start learning rate")
    p.add_argument("--warm_start_batch", type=int, default=64, help="warm-start examples per step, global")
    # systems
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--grad_ckpt", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order and every sampling call")
    # schedule and output
    p.add_argument("--steps", type=int, default=60, help="RL steps")
    p.add_argument("--eval_every", type=int, default=10, help="held-out critique-free accuracy every N steps")
    p.add_argument("--eval_examples", type=int, default=256, help="held-out examples per evaluation")
    p.add_argument("--eval_samples", type=int, default=4, help="attempts per held-out example for pass@1 "
                   "(eval_acc); greedy accuracy (eval_acc_greedy) is reported beside it")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only the final one)")
    p.add_argument("--out", default="runs/icrl", help="run folder: checkpoints and metrics.jsonl")
    p.add_argument("--resume", default=None, help="a checkpoint folder or a run folder (its latest checkpoint)")
    args = p.parse_args(argv)
    if args.warm_start_steps is None:
        args.warm_start_steps = 1200 if args.model == "tiny" else 0
    if args.minibatch is None:
        args.minibatch = args.batch_prompts
    if args.temperature <= 0:
        p.error("--temperature must be > 0: the trainer's log-probs are taken at the sampling temperature")
    return args


def check_divisibility(args, ctx):
    """No silent truncation: every rank gets the same number of queries and of updates."""
    if args.batch_prompts % ctx.world:
        raise SystemExit(f"--batch_prompts {args.batch_prompts} is not divisible by {ctx.world} ranks")
    if args.batch_prompts % args.minibatch or args.minibatch % ctx.world:
        raise SystemExit(f"--minibatch {args.minibatch} must divide --batch_prompts {args.batch_prompts} "
                         f"and be divisible by {ctx.world} ranks")


# ==================================================================================================
# Main
# ==================================================================================================

TINY_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)


def load_model_and_tokenizer(args, ctx):
    """`tiny`: random init seeded by --seed (identical on every rank) with the character tokenizer;
    otherwise a Hugging Face Qwen3 folder. A resumed run loads the checkpoint's weights."""
    from transformers import AutoTokenizer
    if args.model == "tiny":
        folder = tempfile.mkdtemp(prefix="icrl-char-tokenizer-")
        build_char_tokenizer(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(args.seed)
        model = Qwen3(Qwen3Config(vocab_size=len(tokenizer), **TINY_CONFIG))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = Qwen3.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    if args.resume:
        model = Qwen3.from_pretrained(args.resume, dtype=torch.float32, device="cpu")
    return model.to(ctx.device), tokenizer


def step_queries(examples, step, args, ctx):
    """This rank's queries at `step`: a seeded permutation per pass over the data, so the data order is
    a function of (seed, step) and a resumed run sees the same queries."""
    n, start = len(examples), step * args.batch_prompts
    out = []
    for i in range(start, start + args.batch_prompts):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(args.seed, i // n, 6)))
        out.append(examples[int(perm[i % n])])
    per_rank = args.batch_prompts // ctx.world
    return out[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]


def train(args, ctx):
    check_divisibility(args, ctx)
    start_step = 0
    if args.resume:
        args.resume = resolve_checkpoint(args.resume)
        start_step = torch.load(os.path.join(args.resume, TRAINER_STATE), weights_only=False)["step"]
    model, tokenizer = load_model_and_tokenizer(args, ctx)
    knobs = parse_knobs(args.task_knob)
    train_task = load_task(args.task, path=args.train_file, split="train", seed=args.seed, **knobs)
    eval_task = load_task(args.task, path=args.eval_file, split="test", seed=args.seed, **knobs)
    eval_examples = eval_task.examples[:args.eval_examples]
    print0(ctx, "config:", json.dumps(vars(args), indent=1))
    print0(ctx, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{len(train_task.examples)} train / {len(eval_examples)} held-out examples, {ctx.world} rank(s)")
    model = wrap_model(model, args, ctx)
    if args.warm_start_steps and not args.resume:
        t = time.perf_counter()
        steps, acc = warm_start(model, tokenizer, train_task, args, ctx)
        print0(ctx, f"warm start: {steps} supervised steps in {time.perf_counter() - t:.0f}s (greedy accuracy "
                    f"{acc:.3f} on training examples when the critic and refiner formats were added)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    if args.warm_start_steps and not args.resume:  # RL's starting point, for --model or --resume
        save_checkpoint(model, optimizer, tokenizer, args, ctx, 0, "warm_start")
    if args.resume:
        state = torch.load(os.path.join(args.resume, TRAINER_STATE), weights_only=False) if ctx.main else {}
        load_optimizer_state(model, optimizer, state.get("optimizer", {}), ctx)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if ctx.main:
        keep_metrics_until(metrics_path, start_step)

    def evaluate():
        greedy, pass1 = critique_free_accuracy(model, tokenizer, eval_task, eval_examples, args, ctx, args.eval_samples)
        return {"eval_acc": pass1, "eval_acc_greedy": greedy}

    def describe(figures):
        return f"pass@1 {figures['eval_acc']:.3f} ({args.eval_samples} samples each), greedy {figures['eval_acc_greedy']:.3f}"

    first = last = evaluate()
    print0(ctx, f"held-out critique-free accuracy when RL begins (step {start_step}"
                f"{', after the warm start' if args.warm_start_steps and not args.resume else ''}): {describe(first)}")
    cfg = sampling_config(args)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not ctx.main,
               dynamic_ncols=True)
    for step in bar:
        metrics = train_step(model, optimizer, tokenizer, train_task, cfg, args, ctx, step)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 or done == args.steps:
            metrics.update(last := evaluate())
        if ctx.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": done, **metrics}) + "\n")
            shown = {k: f"{metrics[k]:.2f}" for k in ("acc", "refined_acc", "gain") if k in metrics}
            bar.set_postfix(**shown, eval=f"{last['eval_acc']:.2f}", refresh=False)
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            save_checkpoint(model, optimizer, tokenizer, args, ctx, done, f"step_{done}")
    save_checkpoint(model, optimizer, tokenizer, args, ctx, args.steps, "final")
    gained = {k: f"{100 * (last[k] - first[k]):+.1f}" for k in last}
    print0(ctx, f"held-out critique-free accuracy at the end (step {args.steps}): {describe(last)}; "
                f"{gained['eval_acc']} and {gained['eval_acc_greedy']} points since RL began")
    return last


def train_step(model, optimizer, tokenizer, task, cfg, args, ctx, step):
    """SPEC §2: rollout, advantages, calibration weights, the clipped update; returns §3 metrics."""
    examples = step_queries(task.examples, step, args, ctx)
    model.eval()
    with full_weights(model, args) as m:
        rollouts, times = rollout(m, tokenizer, task, examples, cfg, seed=mix_seed(args.seed, step, ctx.rank),
                                  critique=args.algo == "icrl")
    t = time.perf_counter()
    model.train()
    samples_by_query = build_samples(rollouts, args.algo, args.adv, train_critic=not args.no_critic_train)
    samples = [s for qs in samples_by_query for s in qs]
    with autocast_for(model, args):
        old_logprobs(unwrap(model), samples, args, ctx)
    stats = update(model, optimizer, samples_by_query, args, ctx, step)
    times["train"] = time.perf_counter() - t
    return step_metrics(rollouts, samples, stats, times, args, ctx)


def keep_metrics_until(path, step):
    """A resumed run rewrites metrics.jsonl without the lines past its checkpoint."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(lines))


def main(argv=None):
    args = parse_args(argv)
    ctx = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        train(args, ctx)
    finally:
        shutdown(ctx, args.fsdp)


def shutdown(ctx, fsdp):
    if ctx.world == 1:
        return
    dist.barrier()
    dist.destroy_process_group()
    if fsdp and ctx.device.type == "cpu":
        # FSDP2 over gloo aborts in a C++ destructor at interpreter exit after a backward pass (seen in
        # about 1 run in 4 with torch 2.13). Everything is written by now, so skip the destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
