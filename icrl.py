"""ICRL training: one Qwen3 learns to solve, to critique its own failed episodes, and to internalise the
critique-guided retries into its critique-free solver (../shared/SPEC.md, version 2, is the method).

One step (SPEC §2): G chains per query of up to --rounds K episodes: solve under S(x); the gate sends a
failure (--critic_gate failure) to the critic, which reads the episode's summary under C(x, tau); the
retry starts from a fresh reset under S(x, c), the critique as tips. The critic earns 1 if the retry
succeeds, else r' - r; retries are trained under S(x), weighted by min(pi(y|S(x)) / pi(y|S(x, c)), W);
advantages are normalised per query and role.

Run (the embedded default: tiny random Qwen3 + character tokenizer on the multi-turn `boxes`, CPU):
    python icrl.py                                             # one process
    torchrun --standalone --nproc_per_node 2 icrl.py           # what `make train` runs
    torchrun --standalone --nproc_per_node 2 icrl.py --task arithmetic --out runs/arithmetic-icrl   # a one-turn task
Real checkpoints on GPUs (README has the full commands for Qwen3-4B/8B and AgentGym's ALFWorld):
    torchrun --nproc_per_node 8 icrl.py --model /path/Qwen3-8B --task math --train_file train.jsonl \\
        --eval_file test.jsonl --dtype bfloat16 --fsdp --grad_ckpt --lr 1e-6 --max_new_tokens 2048 \\
        --critic_max_new_tokens 1024 --micro_batch 2 --rollout_batch 32 --out runs/qwen3-8b
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (CRITIQUE_RIGHT, EMPTY_THINK, OBS_CHARS, AgentGymTask, EnvironmentServerFailed, Task, build_char_tokenizer,
                  critic_context, encode_observation,
                  end_of_turn_id, episode_summary, extract_critique, load_task, observation_turn, solver_context,
                  solver_message, task_class, typed_knobs)
from model import Qwen3, Qwen3Config, Session, check_pretrained, generate


class UsageError(SystemExit):
    """A mistake in the command line, a data file or a checkpoint: main() prints its one line (no
    traceback: tracebacks are for bugs) and exits with status 2."""


class StoppedAndSaved(Exception):
    """Every rank stopped the run together, its steps saved (an environment server failed for good): main()
    prints the one line, shuts the ranks down in order and exits with status 1."""


def first_rank():
    """Rank 0, or no torchrun: before init_distributed, where every rank checks the same things."""
    return os.environ.get("RANK", "0") == "0"


def warn(message):
    """A warning on stderr, from the first rank only (every rank checks the same things)."""
    if first_rank():
        tqdm.write(f"warning: {message}", file=sys.stderr)

# ==================================================================================================
# SPEC §2 equations: one function each, on plain tensors. Per-sample tensors are (N,), per-token
# tensors (N, T) with a 0/1 mask.
# ==================================================================================================


def critic_gain(r_before, r_after):
    """SPEC §2.5: the critic's reward g_k = 1 if the retry succeeds (r_{k+1} = 1), else r_{k+1} - r_k."""
    r_before, r_after = torch.as_tensor(r_before, dtype=torch.float64), torch.as_tensor(r_after, dtype=torch.float64)
    return torch.where(r_after == 1.0, torch.ones_like(r_after), r_after - r_before)


def group_advantages(values, group_ids, eps=1e-6):
    """SPEC §2.6: A = (v - mean(group)) / (std(group) + eps), std with Bessel's correction; groups of any size.

    A constant group gives A = 0, exactly (the float mean of equal values may differ from them in the last bit:
    3 x 0.1 would give A = -1.4e-11); so does a group of one (its Bessel std is undefined, and one sample
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
    lowest = torch.full_like(count, math.inf).scatter_reduce(0, group, values, "amin")
    highest = torch.full_like(count, -math.inf).scatter_reduce(0, group, values, "amax")
    varies = (highest != lowest)[group]   # a NaN makes a group vary: A stays NaN, and the update is skipped
    return torch.where(varies, adv, torch.zeros_like(adv)).to(out_dtype)


def calibration_weights(logp_free, logp_cond, mask, mode="token", clip=2.0):
    """SPEC §2.7: distribution-calibration weight of each action token of a retry, stop-gradient.

    token: w_t = min(exp(l_free_t - l_cond_t), clip). seq: one weight per retry,
    min(exp(mean_t(l_free_t - l_cond_t)), clip) over its action tokens: a geometric mean, never the raw
    product, which explodes with length. none: w = 1. Masked positions (observations, padding) get 0."""
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
    """SPEC §2.8: loss_t = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), per token,
    unreduced; rho_t = exp(logp_t - old_logp_t). The asymmetric clip is DAPO's."""
    ratio = (logp - old_logp).exp()
    adv = adv[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return -weight * surrogate * mask


def rolewise_token_mean(token_loss, mask, is_critic, solver_tokens, critic_tokens, critic_coef=1.0,
                        world_size=1):
    """SPEC §2.8 aggregation: L = L_solver + critic_coef * L_critic, each role's token-loss sum over the
    global batch divided by that role's global trained-token count.

    Each rank holds a slice, and DDP averages gradients over ranks, so the local sums are scaled by
    world_size / N_global: the average of the ranks' gradients is then exactly the global token mean."""
    per_sample = (token_loss * mask).sum(-1)
    if per_sample.device.type != "cpu":
        # on a GPU, torch.where: indexing by a mask sizes its output on the host, a sync per micro-batch
        solver_sum = torch.where(is_critic, 0.0, per_sample).sum()
        critic_sum = torch.where(is_critic, per_sample, 0.0).sum()
    else:  # no sync to avoid, and the sums bit for bit those of the runs README reports
        solver_sum = per_sample[~is_critic].sum()
        critic_sum = per_sample[is_critic].sum()
    loss = solver_sum * (world_size / max(solver_tokens, 1))
    return loss + critic_coef * critic_sum * (world_size / max(critic_tokens, 1))


# ==================================================================================================
# Episodes (SPEC §1): turns of sampled action tokens and environment observation tokens
# ==================================================================================================

@dataclass
class Episode:
    """One episode after its context. `tokens` holds action tokens (sampled: mask 1, with the sampler's
    log-probs) and observation tokens (the environment's, wrapped in the template's user turn: mask 0)."""
    context: list                  # the ids it was sampled after: S(x), or S(x, c) for a retry
    task_text: str = ""
    first_observation: str = ""
    tokens: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    sampler_logprobs: list = field(default_factory=list)   # full softmax at the temperature (see old_logprobs); 0.0 on observations
    actions: list = field(default_factory=list)            # each action's text (special tokens dropped)
    observations: list = field(default_factory=list)       # the observation after each action
    reward: float = 0.0
    end: str = ""                  # done | max_turns | repeat | context | cutoff

    @property
    def action_tokens(self):
        return sum(self.mask)


@dataclass
class Critique:
    """One sampled critique c_k and the text its retry is given (SPEC §1: inside the last <critic></critic>)."""
    context: list                  # C(x, tau_k)
    tokens: list
    logprobs: list
    finished: bool
    text: str


@dataclass
class Chain:
    """SPEC §2.1-2.4 for one of a query's G chains: episodes[k] is round k + 1; critiques[k] was written
    about episodes[k] and episodes[k + 1] is its retry. free_contexts[k] is S(x) from episode k's reset."""
    episodes: list = field(default_factory=list)
    critiques: list = field(default_factory=list)
    free_contexts: list = field(default_factory=list)

    @property
    def final_reward(self):
        return self.episodes[-1].reward


@dataclass
class QueryRollout:
    example: object
    chains: list


@dataclass
class SamplingConfig:
    group_size: int = 8
    max_new_tokens: int = 16           # each action turn
    critic_max_new_tokens: int = 32    # critiques
    temperature: float = 1.0
    top_p: float = 1.0
    enable_thinking: bool = False
    max_batch: int = 0                 # sequences per sampling call (bounds the KV cache); 0: all at once
    rounds: int = 2                    # K (SPEC §2)
    critic_gate: str = "failure"       # failure | always
    max_turns: int = 1
    max_context: int = 0               # tokens of context + episode; 0: the model's max positions
    obs_chars: int = 800
    compile_sampler: bool = False      # each decode layer through torch.compile (model.generate's `compile`)


REPEAT_LIMIT = 3  # SPEC §1: the same action this many times in a row ends the episode
TRUNCATED_ENDS = ("context", "max_turns", "cutoff")  # episode ends counted as truncated (trunc_frac, SPEC §3)


def stop_token_ids(tokenizer):
    """Ids that end a turn: the chat template's <|im_end|> and <|endoftext|> (a base model's EOS)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


class Sampler:
    """The model, tokenizer and settings a rollout samples with, and the seconds it spends."""

    def __init__(self, model, tokenizer, cfg, seed, critic_model=None):
        self.model, self.critic_model, self.tokenizer, self.cfg, self.seed = model, critic_model or model, tokenizer, cfg, seed
        if cfg.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {cfg.max_turns}")
        self.stop_ids = stop_token_ids(tokenizer)
        self.before_obs, self.after_obs = observation_turn(tokenizer, cfg.enable_thinking)
        self.end_of_turn = end_of_turn_id(tokenizer)
        self.max_context = cfg.max_context or model_positions(model)
        self.times = {"sample": 0.0, "env": 0.0}

    def sample(self, contexts, max_new_tokens, phase, critic=False, call=0, session=None, continues=None):
        """One generation per context, in calls of at most `call_size` sequences (a multiple of G, so a
        group's shared prompt is prefilled once), the i-th seeded from (seed, phase, call + i). With a
        `session` (the turns of multi-turn episodes, at most one call's worth): model.generate's Session and
        `continues`, so a turn prefills only what was appended since the last one."""
        t, cfg = time.perf_counter(), self.cfg
        size = self.call_size(len(contexts))
        if session is not None and len(contexts) > size:
            raise ValueError(f"a Session's turn holds at most {size} sequences, got {len(contexts)}")
        model = self.critic_model if critic else self.model
        # without a Session, SPEC §5's generate call exactly (a stand-in with only its arguments works)
        options = {} if session is None else {"session": session, "continues": continues}
        if cfg.compile_sampler:
            options["compile"] = True
        out = [g for i, part in enumerate(chunks(contexts, size))
               for g in generate(model, part, max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 stop_ids=self.stop_ids, seed=mix_seed(self.seed, *phase, call + i), **options)]
        self.times["sample"] += time.perf_counter() - t
        return out

    def call_size(self, n):
        """Sequences per sampling call: --rollout_batch rounded down to a multiple of G (at least G), or all n
        (at least 1: a rank's share of held-out examples may be none)."""
        if not self.cfg.max_batch:
            return max(n, 1)
        return max(self.cfg.max_batch // self.cfg.group_size, 1) * self.cfg.group_size

    def text(self, generation):
        # The stop id excluded and special ids dropped. Special-token strings the model wrote as plain
        # tokens stay text; placed in a prompt they are encoded as text (data._chat_ids), never as a turn.
        ids = generation.tokens[:-1] if generation.finished else generation.tokens
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def env_calls(self, envs, method, arg_lists):
        t = time.perf_counter()
        try:
            return call_envs(envs, method, arg_lists)
        finally:
            self.times["env"] += time.perf_counter() - t


def call_envs(envs, method, arg_lists):
    """[env.method(*args)] in order, each reply checked. Environments behind a server (Environment.remote:
    AgentGym's) are called at once, from threads, so a turn waits for its busiest server, not for the sum of
    all calls (each server still gets one call at a time: AgentGymPool); the built-in ones, plain Python,
    one after another. After a failure the calls not yet started are dropped (Executor.map cancels them)."""
    call = lambda env, args: checked_env_reply(env, method, getattr(env, method)(*args))
    if len(envs) > 1 and all(env.remote for env in envs):
        with ThreadPoolExecutor(min(len(envs), MAX_ENV_THREADS)) as threads:
            return list(threads.map(call, envs, arg_lists))
    return [call(env, args) for env, args in zip(envs, arg_lists)]


MAX_ENV_THREADS = 64   # threads of one turn's server calls (call_envs); those beyond one per server wait their turn


def checked_env_reply(env, method, reply):
    """Bad environment replies stop the run with one line naming the environment and the call."""
    name = type(env).__name__
    if method == "reset":
        if not (isinstance(reply, tuple) and len(reply) == 2 and all(isinstance(s, str) for s in reply)):
            raise RuntimeError(f"environment {name}: reset() must return (task text, first observation) strings, "
                               f"got {type(reply).__name__}")
        return reply
    if not (isinstance(reply, tuple) and len(reply) == 3):
        raise RuntimeError(f"environment {name}: step() must return (observation, reward, done), got {reply!r:.80}")
    observation, reward, done = reply
    if not isinstance(observation, str):
        raise RuntimeError(f"environment {name}: step() returned a {type(observation).__name__} observation, not a string")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not 0.0 <= reward <= 1.0:
        raise RuntimeError(f"environment {name}: step() returned reward {reward!r}, outside [0, 1]")
    return observation, float(reward), bool(done)


def full_softmax_logprobs(generation):
    """The sampler's log-probs of the full softmax at the temperature, not truncated by top-p (what the
    trainer's are: the comment above old_logprobs). A generate stand-in with SPEC §5's fields only gives
    its .logprobs."""
    return getattr(generation, "full_logprobs", generation.logprobs)


def run_episodes(sampler, envs, critiques, phase):
    """SPEC §1: one episode per environment, all sampled together turn by turn (finished episodes drop
    out). Each environment is reset first; `critiques[i]` (or None) puts the tips section into its context.
    Returns (episodes, the S(x) context of each reset)."""
    cfg, tok = sampler.cfg, sampler.tokenizer
    episodes, free_contexts, rendered = [], [], {}

    def context_of(*message):  # a query's G resets render the same S(x): through the chat template once
        if message not in rendered:
            rendered[message] = solver_context(tok, *message, enable_thinking=cfg.enable_thinking)
        return list(rendered[message])

    for critique, (task_text, first_observation) in zip(critiques, sampler.env_calls(envs, "reset", [()] * len(envs))):
        free = context_of(task_text, first_observation)
        context = free if critique is None else context_of(task_text, first_observation, critique)
        episodes.append(Episode(context, task_text, first_observation))
        free_contexts.append(free)
    # The episodes go through in groups of one sampling call each (--rollout_batch), every turn of a group
    # before the next group: a multi-turn group keeps its KV cache from turn to turn (model.Session), and
    # only one group's cache is alive at a time, so --rollout_batch still bounds it.
    size = sampler.call_size(len(episodes))
    for call, first in enumerate(range(0, len(episodes), size)):
        live = list(range(first, min(first + size, len(episodes))))
        session, continues = (Session() if cfg.max_turns > 1 else None), None
        for turn in range(cfg.max_turns):
            if not live:
                break
            gens = sampler.sample([episodes[i].context + episodes[i].tokens for i in live], cfg.max_new_tokens,
                                  (*phase, turn), call=call, session=session, continues=continues)
            for i, g in zip(live, gens):
                ep = episodes[i]
                ep.tokens += g.tokens
                ep.mask += [1] * len(g.tokens)
                ep.sampler_logprobs += full_softmax_logprobs(g)
                ep.actions.append(sampler.text(g))
            # an action cut off by max_new_tokens is never sent to the environment
            sent = [i for i, g in zip(live, gens) if g.finished]
            replies = dict(zip(sent, sampler.env_calls([envs[i] for i in sent], "step",
                                                       [(episodes[i].actions[-1],) for i in sent])))
            still, continues = [], []   # the episodes still running, and each one's row in this call
            for row, (i, g) in enumerate(zip(live, gens)):
                ep = episodes[i]
                if not g.finished:  # the end (SPEC §1: the reward stays the environment's last; 0 on turn 1)
                    ep.observations.append("")
                    ep.end = "cutoff"
                    continue
                observation, ep.reward, done = replies[i]
                ep.observations.append(observation)
                # the markers follow the end of turn: an action that stopped on another stop id gets it as context
                closing = [] if g.tokens[-1] == sampler.end_of_turn else [sampler.end_of_turn]
                obs_ids = closing + sampler.before_obs + encode_observation(tok, observation) + sampler.after_obs
                if done:
                    ep.end = "done"
                elif turn + 1 == cfg.max_turns:
                    ep.end = "max_turns"
                elif (len(ep.actions) >= REPEAT_LIMIT and   # the same command: what the environment reads
                      len({envs[i].action_key(a) for a in ep.actions[-REPEAT_LIMIT:]}) == 1):
                    ep.end = "repeat"
                elif len(ep.context) + len(ep.tokens) + len(obs_ids) + cfg.max_new_tokens > sampler.max_context:
                    ep.end = "context"  # truncated: the reward stays the environment's last
                else:
                    ep.tokens += obs_ids
                    ep.mask += [0] * len(obs_ids)
                    ep.sampler_logprobs += [0.0] * len(obs_ids)
                    still.append(i)
                    continues.append(row)
            live = still
    for env in envs:
        env.close()
    return episodes, free_contexts


def rollout(model, tokenizer, task, examples, cfg, seed, critique=True, critic_model=None):
    """SPEC §2.1-2.4 for a list of queries: G chains each. Solve; then, round by round up to K = cfg.rounds,
    the gate picks the chains to continue (failures, or all with critic_gate "always"), the critic writes
    one critique per chain (by `critic_model` when given: the critic swap of SPEC §4), and each is retried
    from a fresh reset with the critique's tips. Every phase is one batched sampling pass over all chains.
    Returns ([QueryRollout], {"sample": seconds, "env": seconds})."""
    sampler = Sampler(model, tokenizer, cfg, seed, critic_model)
    G = cfg.group_size
    chains = [Chain() for _ in examples for _ in range(G)]
    query_of = [q for q in range(len(examples)) for _ in range(G)]
    envs = lambda members: [task.env(examples[query_of[c]]) for c in members]
    # 1. Solve: tau_1 ~ pi(. | S(x)); a context repeated G times is prefilled once by the sampler.
    everyone = list(range(len(chains)))
    episodes, free = run_episodes(sampler, envs(everyone), [None] * len(chains), (1,))
    for chain, ep, f in zip(chains, episodes, free):
        chain.episodes.append(ep)
        chain.free_contexts.append(f)
    for k in range(1, cfg.rounds if critique else 1):
        # 2. Gate: a chain ends on success (critic_gate failure) or after K rounds.
        active = [c for c in everyone if len(chains[c].episodes) == k and
                  (cfg.critic_gate == "always" or chains[c].final_reward < 1.0)]
        if not active:
            break
        # 3. Critique: c_k ~ pi(. | C(x, tau_k)).
        contexts = [critic_context_within(tokenizer, chains[c].episodes[-1], cfg, sampler.max_context) for c in active]
        gens = sampler.sample(contexts, cfg.critic_max_new_tokens, (2, k), critic=True)
        for c, context, g in zip(active, contexts, gens):
            chains[c].critiques.append(Critique(context, g.tokens, full_softmax_logprobs(g), g.finished,
                                                extract_critique(sampler.text(g))))
        # 4. Retry: tau_{k+1} ~ pi(. | S(x, c_k)) from a fresh reset of the same instance.
        episodes, free = run_episodes(sampler, envs(active), [chains[c].critiques[-1].text for c in active], (3, k))
        for c, ep, f in zip(active, episodes, free):
            chains[c].episodes.append(ep)
            chains[c].free_contexts.append(f)
    rollouts = [QueryRollout(ex, chains[q * G:(q + 1) * G]) for q, ex in enumerate(examples)]
    return rollouts, sampler.times


def critic_context_within(tokenizer, ep, cfg, limit):
    """C(x, tau) (SPEC §1) with room for the critique within `limit` tokens: a summary too long for it (an
    episode may fill the budget itself) leaves out as few of its earliest turns as it must; the reward and the
    last turns stay. Fitting is monotone in the turns left out, so they are found by bisection."""
    def context(skip):
        summary = episode_summary(ep.reward, ep.actions[skip:], ep.observations[skip:], cfg.obs_chars, skip)
        return critic_context(tokenizer, ep.task_text, ep.first_observation, summary, cfg.enable_thinking)

    fits = lambda ids: len(ids) + cfg.critic_max_new_tokens <= limit
    whole = context(0)
    if fits(whole):
        return whole
    low, high = 1, len(ep.actions)   # with every turn left out it fits: prompt_limit leaves room for that
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(context(mid)) else (mid + 1, high)
    return context(low)


def model_positions(model):
    return unwrap(model).config.max_position_embeddings


def sampling_config(args, group_size=None, temperature=None):
    return SamplingConfig(group_size or args.group_size, args.max_new_tokens, args.critic_max_new_tokens,
                          args.temperature if temperature is None else temperature, args.top_p,
                          args.enable_thinking, args.rollout_batch, args.rounds, args.critic_gate,
                          args.max_turns, args.max_context, args.obs_chars, args.compile_sampler)


def mix_seed(*parts):
    """A 63-bit seed from integers, e.g. (seed, step, rank, phase): one generator per sampling call."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ==================================================================================================
# The trained batch (SPEC §2.5-2.8)
# ==================================================================================================

@dataclass
class TrainSample:
    context: list            # what the loss conditions on
    response: list           # the tokens after it (an episode: actions and observations; or a critique)
    is_critic: bool
    adv: float
    mask: list = None        # 1 on trained (action) tokens; None: every token
    calib_context: list = None   # S(x, c) of a retry: where l_cond is taken (§2.7)
    sampler_logprobs: list = None
    old_logp: torch.Tensor = None   # l_old under `context` (set by old_logprobs)
    cond_logp: torch.Tensor = None  # l_cond under `calib_context`

    @property
    def loss_mask(self):
        return self.mask if self.mask is not None else [1] * len(self.response)

    @property
    def trained_tokens(self):
        return sum(self.loss_mask)

    @property
    def has_gradient(self):
        """A != 0. With A = 0 every token's loss is -w * min(rho * 0, clip(rho) * 0) = 0 and so is its gradient
        (SPEC §2.8): the update runs no pass over such a sample (a constant group's: many, late in training),
        and its tokens still count in the role-wise means."""
        return self.adv != 0.0


def chain_values(chain):
    """(solver rewards of every episode, critic rewards g_k of every critique) of one chain (SPEC §2.5)."""
    rewards = [ep.reward for ep in chain.episodes]
    gains = critic_gain(rewards[:len(chain.critiques)], rewards[1:len(chain.critiques) + 1]).tolist()
    return rewards, gains


def build_samples(rollouts, adv_mode="rolewise", train_critic=True):
    """SPEC §2.6 advantages and the §2.8 table. Per query x two groups: the solver group (every episode of
    x: G first attempts and all retries) and the critic group (every critique of x); `pooled` merges them.
    First attempts are trained under S(x); retries under S(x) too, the critique removed, with l_cond from
    S(x, c); critiques under C(x, tau). A GRPO rollout (one round, no critique) gives the solver group
    {r_1..r_G} alone. Returns one list of samples per query."""
    values, group_ids = [], []
    for q, ro in enumerate(rollouts):
        critic_group = 2 * q if adv_mode == "pooled" else 2 * q + 1
        for chain in ro.chains:
            rewards, gains = chain_values(chain)
            values += rewards + gains
            group_ids += [2 * q] * len(rewards) + [critic_group] * len(gains)
    adv = iter(group_advantages(torch.tensor(values, dtype=torch.float64), torch.tensor(group_ids)).tolist())
    per_query = []
    for ro in rollouts:
        samples = []
        for chain in ro.chains:
            for k, ep in enumerate(chain.episodes):
                samples.append(TrainSample(chain.free_contexts[k], ep.tokens, False, next(adv), ep.mask,
                                           ep.context if k > 0 else None, ep.sampler_logprobs))
            for c in chain.critiques:
                a = next(adv)
                if train_critic:
                    samples.append(TrainSample(c.context, c.tokens, True, a, None, None, c.logprobs))
        per_query.append(samples)
    return per_query


# ==================================================================================================
# Log-probs of responses under a context, on right-padded batches
# ==================================================================================================

def pad_batch(contexts, responses, device, masks=None):
    """Right-padded (B, L) ids of context + response, the (B, T) loss mask and gather positions. Masks
    come from lengths and segment boundaries (`masks`: 0 on observation tokens), never from token ids:
    the pad id may equal EOS (SPEC §2.8)."""
    ctx_len = torch.tensor([len(c) for c in contexts])
    L = max(len(c) + len(r) for c, r in zip(contexts, responses))
    T = max(1, max(len(r) for r in responses))
    ids = torch.zeros(len(contexts), L, dtype=torch.long)
    targets = torch.zeros(len(contexts), T, dtype=torch.long)
    mask = torch.zeros(len(contexts), T)
    for b, (c, r) in enumerate(zip(contexts, responses)):
        ids[b, :len(c) + len(r)] = torch.tensor(c + r, dtype=torch.long)
        targets[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = torch.tensor(masks[b], dtype=torch.float) if masks is not None and masks[b] is not None else 1.0
    # logits at position p predict token p + 1: response token t is predicted at ctx_len - 1 + t.
    positions = (ctx_len[:, None] - 1 + torch.arange(T)[None, :]).clamp(max=L - 1)
    return to_device(ids, device), to_device(targets, device), to_device(mask, device), to_device(positions, device)


def to_device(t, device):
    """A host tensor onto `device`. On CUDA through pinned memory, non-blocking: a copy from pageable memory
    would make the host wait for it, and each such wait stalls the overlap FSDP2's prefetch relies on."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def response_logprobs(model, contexts, responses, temperature, device, masks=None):
    """log pi(response_t | context, response_<t) at the sampling temperature, 0 where the mask is: (B, T)
    and its mask. Observation tokens are context: their positions are computed but masked."""
    ids, targets, mask, positions = pad_batch(contexts, responses, device, masks)
    # float32 log-probs (B, T), the head in float32 and in chunks of positions: never (B, T, V) (model.token_logprobs)
    logp = model(ids, logits_at=positions, targets=targets, temperature=temperature)
    return logp * mask, mask


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def micro_batches(samples, size, key=lambda s: len(s.context) + len(s.response)):
    """Micro-batches of similar length, so little of each padded batch is padding. The loss is a sum
    over samples, so the grouping changes nothing but speed."""
    return chunks(sorted(samples, key=key), size)


def even_passes(passes, args, ctx):
    """Each pass (a list of micro-batches) padded to the most micro-batches any rank has in it. FSDP2 gathers
    every layer in each forward and reduce-scatters in each backward, collectives that every rank must call
    equally often; the gate (SPEC §2.2) gives ranks different numbers of samples and of retries. A padding
    micro-batch is one token with mask 0: no loss, no gradient, the same collectives. DDP calls none in a
    forward and one all-reduce per update, so it needs none."""
    if not args.fsdp or ctx.world == 1:
        return passes
    most = all_reduce([len(p) for p in passes], ctx, dist.ReduceOp.MAX)
    return [p + [[padding_sample()] for _ in range(int(n) - len(p))] for p, n in zip(passes, most)]


def padding_sample():
    """One token with mask 0: a forward and backward of every layer with no loss and a zero gradient."""
    return TrainSample([0], [0], False, 0.0, mask=[0], old_logp=torch.zeros(1))


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


# How long a rank may wait in a collective. A rank waits there while another works alone: eval.py's ranks with
# no batch left while one samples a whole batch, the gate's uneven critique rounds and multi-turn retries, rank 0
# writing a checkpoint's weights. NCCL's default, 10 minutes, would end such runs; a rank that fails still ends
# the run at once (run_then_shut_down).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


def init_distributed():
    """NCCL on GPUs, gloo on CPU, keyed on torchrun's environment variables."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=COLLECTIVE_TIMEOUT)
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
    if dist.is_initialized():  # under torchrun, world size 1 included (make gpu-check runs DDP that way)
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def full_weights(model, args):
    """Rollouts use full weights (issue: FSDP). Under FSDP2 every layer is gathered once for the whole
    rollout instead of once per decoded token, in its mixed-precision param_dtype. Under DDP (or one
    process) with --dtype bfloat16: a bfloat16 copy of the weights made once here, for the whole rollout
    (2 bytes per parameter while it lasts), so the sampler's fused weights and KV cache are bfloat16; autocast
    instead kept a float32 cache and re-cast every weight on every decode step."""
    if not args.fsdp:
        dtype = DTYPES[args.dtype]
        yield unwrap(model) if dtype == torch.float32 else unwrap(model).cast_copy(dtype)
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
    """DDP: accumulate micro-batch gradients locally, all-reduce on the last one only (DDP's gradients are
    whole on every rank anyway). FSDP2: reduce-scatter after every micro-batch. Its set_requires_gradient_sync
    (False) would keep an unsharded float32 gradient of every parameter on every rank until the last one
    (measured: 4.0 bytes per global parameter per rank, +33 GB per GPU for Qwen3-8B); reduce-scattered at
    once, each rank holds only its shard's float32 gradient (4 / world_size bytes per parameter) and
    accumulates into it. The summed gradient, so the loss, is unchanged: the reduction is linear.
    Costs one reduce-scatter per micro-batch instead of one per optimizer step."""
    if sync or args.fsdp:
        return contextlib.nullcontext()
    return model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ==================================================================================================
# One ICRL update (SPEC §2.6-2.8)
# ==================================================================================================

# Which distribution the log-probs are of, with --top_p < 1 (SPEC §2.7, §2.8). Every log-prob the loss uses
# is of the full softmax at the sampling temperature, pi(. | ...) = softmax(logits / T), whatever --top_p:
# l_old and l_free (under S(x)), l_cond (under S(x, c)), and log pi_theta in rho_t = exp(log pi_theta - l_old)
# (§2.8). The policy trained is pi_theta at temperature T, untruncated, so rho, its clip and the calibration
# weight w = min(exp(l_free - l_cond), W) (§2.7) compare that one policy with itself: new vs old, S(x) vs S(x, c).
# With --top_p < 1 the tokens are drawn from the nucleus-truncated, renormalised q_old = pi_old / Z on the
# nucleus (Z <= 1 its mass), and nothing corrects for it: rho is not an importance ratio against the behaviour
# policy (that would be pi_theta / q_old = rho * Z), tokens outside the nucleus are never sampled, and the
# update is biased toward the truncated policy. So train with --top_p 1 (the default) unless that bias is
# wanted; top_p < 1 is for evaluation. The sampler reports both (model.Generation): `logprobs` under q_old
# (SPEC §5) and `full_logprobs` under pi_old; episodes and critiques keep the full ones, so `logprob_gap` (§3)
# compares like with like and stays at float noise with any --top_p (tests/test_scale.py).
@torch.no_grad()
def old_logprobs(model, samples, args, ctx, l_old_of=None):
    """log pi_old of the tokens of the samples `l_old_of` (default: all of `samples`) under their training
    context (l_old; for a retry, l_free under S(x)), and of every retry in `samples` under S(x, c) (l_cond,
    SPEC §2.7), of the full softmax at the temperature (see the comment above). Recomputed by the trainer, so
    that rho = 1 exactly on the first pass; the sampler's own log-probs feed the logprob_gap metric, and l_cond
    where l_cond_from_sampler (then no forward under S(x, c) runs). With one update per step, `update` takes
    l_old from its own forward (one_update_per_step), which runs only over the samples with a gradient: the
    others need this pass for the step's metrics alone (train_step)."""
    try:
        _old_logprobs(model, samples, args, ctx, samples if l_old_of is None else l_old_of)
    finally:
        # FSDP2 keeps its root unit gathered after a forward with no backward to follow; reshard it,
        # or model.parameters() would hand out the gathered copies instead of the trained shards.
        if hasattr(model, "reshard"):
            model.reshard()


def _old_logprobs(model, samples, args, ctx, l_old_of):
    """The log-probs stay on the device until every micro-batch is done, then come to the host in one copy:
    a .cpu() per micro-batch would make the host wait for each forward in turn."""
    retries = [s for s in samples if s.calib_context is not None]
    if l_cond_from_sampler(args):
        for s in retries:
            s.cond_logp = torch.tensor(s.sampler_logprobs, dtype=torch.float)
        retries = []
    free, cond = even_passes([micro_batches(l_old_of, args.micro_batch),
                              micro_batches(retries, args.micro_batch,
                                            key=lambda s: len(s.calib_context) + len(s.response))], args, ctx)
    passes = []  # (micro-batch, attribute, log-probs (B, T) on the device)
    for micro in free:
        logp, _ = response_logprobs(model, [s.context for s in micro], [s.response for s in micro],
                                    args.temperature, ctx.device, [s.mask for s in micro])
        passes.append((micro, "old_logp", logp))
    for micro in cond:
        logp, _ = response_logprobs(model, [s.calib_context or s.context for s in micro], [s.response for s in micro],
                                    args.temperature, ctx.device, [s.mask for s in micro])
        passes.append((micro, "cond_logp", logp))
    to_host(passes)


def l_cond_from_sampler(args):
    """A retry's l_cond (SPEC §2.7) is the sampler's log-probs under S(x, c): with --calib_logp sampler (§2.7's
    note: the authors' way), and with --calib none, whose weights never read it (a forward under S(x, c) would
    feed only the logprob_gap metric)."""
    return args.calib_logp == "sampler" or args.calib == "none"


def to_host(passes):
    """Each (micro-batch, attribute, log-probs (B, T) on the device) into its samples, as rows cut to each
    response: one device-to-host copy for all of them."""
    if not passes:
        return
    flat = torch.cat([logp.flatten() for _, _, logp in passes]).float().cpu()   # the one device-to-host copy
    start = 0
    for micro, attribute, logp in passes:
        rows = flat[start:start + logp.numel()].view(logp.shape)
        start += logp.numel()
        for s, row in zip(micro, rows):
            setattr(s, attribute, row[:len(s.response)].clone())


def pad_rows(rows, T):
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float)
    return out


def sample_weights(micro, T, args, old=None, device="cpu"):
    """Token weights w of SPEC §2.8: 1 for first attempts and critiques, §2.7 for retries; 0 off the mask.
    l_free is each retry's row of `old` (B, T) (on `device`) where given, else its old_logp. The weights are
    computed on every row (each row's on its own) and kept on the retries' by a row flag: indexing a device
    tensor with a Python list of rows would copy that list from pageable memory, a host sync per micro-batch."""
    mask = to_device(pad_rows([s.loss_mask for s in micro], T), device)
    is_retry = [s.calib_context is not None for s in micro]
    if not any(is_retry):
        return mask
    rows = lambda attribute: [getattr(s, attribute) if retry else [] for s, retry in zip(micro, is_retry)]
    free = old if old is not None else to_device(pad_rows(rows("old_logp"), T), device)
    cond = to_device(pad_rows(rows("cond_logp"), T), device)
    calibrated = calibration_weights(free, cond, mask, args.calib, args.calib_clip)
    return torch.where(to_device(torch.tensor(is_retry), device)[:, None], calibrated, mask)


def one_update_per_step(args):
    """One optimizer step per training step: the weights of the update's forward are pi_old's, so its
    log-probs (detached) are l_old (and a retry's l_free) and no separate pass is needed (SPEC §2.8: rho = 1,
    as the separate pass gives on a first update). Saves one forward over every sample with a gradient."""
    return args.ppo_epochs == 1 and args.minibatch >= args.batch_prompts


def update(model, optimizer, samples_by_query, args, ctx, step):
    """SPEC §2.8-2.9: --ppo_epochs passes over --minibatch slices of the queries; one optimizer step
    per slice, its loss the role-wise token mean over the slice's global batch. Micro-batches bound
    memory without changing the loss. A non-finite loss or gradient of the samples it runs skips the update (a
    sample of A = 0, left out, has a zero gradient whatever its log-probs; a NaN there shows in logprob_gap).

    Host syncs: the trained-token counts of every slice are all-reduced once, before the first forward; the
    statistics stay on the device, and the host reads one flag per optimizer step (skip or not) and the
    statistics once at the end, so the micro-batches' forward and backward passes queue without a wait."""
    local_queries = len(samples_by_query)
    per_update = args.minibatch // ctx.world
    gen = torch.Generator().manual_seed(mix_seed(args.seed, step, ctx.rank, 4))
    minibatches = []
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(local_queries, generator=gen).tolist() if args.ppo_epochs > 1 else list(range(local_queries))
        for start in range(0, local_queries, per_update):
            minibatches.append([s for q in order[start:start + per_update] for s in samples_by_query[q]])
    counts = all_reduce([n for mb in minibatches for n in (sum(s.trained_tokens for s in mb if not s.is_critic),
                                                            sum(s.trained_tokens for s in mb if s.is_critic))], ctx)
    device = ctx.device
    # loss_solver, loss_critic, clipped tokens, tokens, grad_norm summed over the updates taken (a skipped one's
    # figures are dropped): float64, on the device
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    updates = skipped = critic_updates = 0
    own_old = []  # (micro-batch, "old_logp", log-probs): l_old from the update's own forward, where not given
    # Only samples with a gradient go through (TrainSample.has_gradient), and every rank runs at least one
    # micro-batch per update, a padding one where it has none of those: DDP all-reduces in the last backward,
    # and the optimizer then steps on zero gradients rather than on none (AdamW's moments and weight decay
    # still move the weights, as they did when those samples ran).
    micros_by_update = even_passes([micro_batches([s for s in mb if s.has_gradient], args.micro_batch)
                                    or [[padding_sample()]] for mb in minibatches], args, ctx)
    for u, micros in enumerate(micros_by_update):
        n_solver, n_critic = counts[2 * u], counts[2 * u + 1]
        finite = torch.ones((), dtype=torch.bool, device=device)
        this_update = torch.zeros(4, dtype=torch.float64, device=device)
        this_update[3] += sum(s.trained_tokens for s in minibatches[u] if not s.has_gradient)  # clip_frac's too
        for i, micro in enumerate(micros):
            with no_grad_sync(model, args, sync=i == len(micros) - 1), autocast_for(model, args):
                logp, mask = response_logprobs(model, [s.context for s in micro], [s.response for s in micro],
                                               args.temperature, device, [s.mask for s in micro])
                T = mask.shape[1]
                given = micro[0].old_logp is not None   # else one_update_per_step: pi_theta is pi_old here
                old = to_device(pad_rows([s.old_logp for s in micro], T), device) if given else logp.detach()
                if not given:
                    own_old.append((micro, "old_logp", old))
                weight = sample_weights(micro, T, args, old, device)
                adv = to_device(torch.tensor([s.adv for s in micro]), device)
                is_critic = to_device(torch.tensor([s.is_critic for s in micro]), device)
                token_loss = clipped_token_loss(logp, old, adv, weight, mask, args.clip_low, args.clip_high)
                loss = rolewise_token_mean(token_loss, mask, is_critic, n_solver, n_critic,
                                           args.critic_coef, ctx.world)
                finite &= torch.isfinite(loss)
                loss.backward()
            with torch.no_grad():
                per_sample = token_loss.sum(-1).double()
                ratio = (logp - old).exp()
                a = adv[:, None]  # clipped: the min picked the clipped term, so the token has no gradient
                clipped = ((a > 0) & (ratio > 1 + args.clip_high)) | ((a < 0) & (ratio < 1 - args.clip_low))
                this_update += torch.stack([torch.where(is_critic, 0.0, per_sample).sum() / max(n_solver, 1),
                                         torch.where(is_critic, per_sample, 0.0).sum() / max(n_critic, 1),
                                         (clipped.float() * mask).sum().double(), mask.sum().double()])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        bad = (~finite | ~torch.isfinite(grad_norm)).double()  # any rank's non-finite loss skips every rank
        if ctx.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():                                         # the one host sync of the optimizer step
            for group in optimizer.param_groups:  # a function of the step alone, so resume is exact
                group["lr"] = args.lr * min(1.0, (step + 1) / max(args.lr_warmup, 1))
            optimizer.step()
            sums[:4] += this_update
            sums[4] += grad_norm.detach().double()
            updates += 1
            critic_updates += n_critic > 0
        else:
            skipped += 1
            print0(ctx, f"warning: step {step}: non-finite loss or gradient, update skipped")
        optimizer.zero_grad(set_to_none=True)
    to_host(own_old)  # for the step's metrics (logprob_gap, calibration summary)
    loss_solver, loss_critic, clipped, tokens, grad_norm = sums.tolist()
    return dict(loss_solver=loss_solver, loss_critic=loss_critic, clipped=clipped, tokens=tokens,
                grad_norm=grad_norm, updates=updates, skipped=skipped, critic_updates=critic_updates)


def autocast_for(model, args):
    """--dtype bfloat16 under DDP computes in bfloat16 over float32 master weights (FSDP2 does this
    through its mixed-precision policy instead)."""
    return torch.autocast(model_device(model).type, dtype=DTYPES[args.dtype],
                          enabled=args.dtype != "float32" and not args.fsdp)


# ==================================================================================================
# What a step reports (SPEC §3)
# ==================================================================================================

def rollout_sums(rollouts, rounds):
    """Counts and sums behind the SPEC §3 rollout figures, as a dict of floats (summed over ranks)."""
    chains = [c for ro in rollouts for c in ro.chains]
    episodes = [ep for c in chains for ep in c.episodes]
    critiques = [cr for c in chains for cr in c.critiques]
    s = dict(chains=len(chains), first_reward=sum(c.episodes[0].reward for c in chains),
             critiqued=sum(1 for c in chains if c.critiques), final_reward=sum(c.final_reward for c in chains),
             critiques=len(critiques), critique_tokens=sum(len(cr.tokens) for cr in critiques),
             critic_reward=sum(g for c in chains for g in chain_values(c)[1]),
             episodes=len(episodes), action_tokens=sum(ep.action_tokens for ep in episodes),
             obs_tokens=sum(len(ep.tokens) - ep.action_tokens for ep in episodes),
             turns=sum(len(ep.actions) for ep in episodes),
             truncated=sum(ep.end in TRUNCATED_ENDS for ep in episodes),
             repeats=sum(ep.end == "repeat" for ep in episodes))
    for k in range(2, rounds + 1):  # retries of round k: P(r_k = 1 | critiqued)
        retries = [c.episodes[k - 1] for c in chains if len(c.episodes) >= k]
        s[f"retries_r{k}"], s[f"retry_wins_r{k}"] = len(retries), sum(ep.reward == 1.0 for ep in retries)
    return s


def ratio(a, b):
    """A rate, or None (null in metrics.jsonl) where it has no denominator."""
    return a / b if b else None


def step_metrics(rollouts, samples, stats, times, args, ctx):
    """SPEC §3 figures over the global batch, each all-reduced with an explicit op."""
    SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX
    rounds = args.rounds if args.algo == "icrl" else 1
    local = rollout_sums(rollouts, rounds)
    local.update({k: stats[k] for k in ("loss_solver", "loss_critic", "clipped", "tokens", "grad_norm")})
    s = dict(zip(local, all_reduce(list(local.values()), ctx, SUM)))
    gap = 0.0
    for x in samples:  # the sampler's log-probs against the trainer's, on trained tokens (SPEC §3)
        reference = x.cond_logp if x.calib_context is not None else x.old_logp
        if x.trained_tokens and not (x.calib_context is not None and l_cond_from_sampler(args)):
            largest = float(((torch.tensor(x.sampler_logprobs) - reference).abs() * torch.tensor(x.loss_mask)).max())
            gap = largest if largest > gap or math.isnan(largest) else gap   # max() would drop a NaN
    gap, t_sample, t_env, t_train = all_reduce([gap, times["sample"], times["env"], times["train"]], ctx, MAX)
    n_updates = stats["updates"]   # the updates taken: a skipped one reports no loss (skipped_updates counts it)
    metrics = dict(
        acc=ratio(s["first_reward"], s["chains"]),
        len_solver=ratio(s["action_tokens"], s["episodes"]), len_obs=ratio(s["obs_tokens"], s["episodes"]),
        turns=ratio(s["turns"], s["episodes"]), trunc_frac=ratio(s["truncated"], s["episodes"]),
        repeat_frac=ratio(s["repeats"], s["episodes"]),
        loss_solver=ratio(s["loss_solver"], n_updates), clip_frac=ratio(s["clipped"], s["tokens"]),
        grad_norm=ratio(s["grad_norm"], ctx.world * n_updates), logprob_gap=gap,
        tok_per_s=ratio(s["action_tokens"] + s["critique_tokens"], t_sample + t_env + t_train),
        t_sample=t_sample, t_env=t_env, t_train=t_train, skipped_updates=stats["skipped"])
    if args.algo == "icrl":  # GRPO samples no critique: it reports no critique figures rather than zeros
        retries = sum(s[f"retries_r{k}"] for k in range(2, rounds + 1))
        metrics.update(
            critiqued_frac=ratio(s["critiqued"], s["chains"]),
            retry_acc=ratio(sum(s[f"retry_wins_r{k}"] for k in range(2, rounds + 1)), retries),
            final_acc=ratio(s["final_reward"], s["chains"]), critic_reward=ratio(s["critic_reward"], s["critiques"]),
            len_critic=ratio(s["critique_tokens"], s["critiques"]), loss_critic=ratio(s["loss_critic"], stats["critic_updates"]),
            **calibration_summary([x for x in samples if x.calib_context is not None], args, ctx))
        if rounds > 2:
            metrics.update({f"retry_acc_r{k}": ratio(s[f"retry_wins_r{k}"], s[f"retries_r{k}"])
                            for k in range(2, rounds + 1)})
    return metrics


def calibration_summary(retries, args, ctx):
    """Mean, 10th percentile and share below 0.5 of the §2.7 weights over all retry action tokens."""
    local = [sample_weights([s], len(s.response), args)[0][torch.tensor(s.loss_mask, dtype=torch.bool)]
             for s in retries if s.trained_tokens]
    local = torch.cat(local) if local else torch.zeros(0)
    gathered = [local]
    if ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, local)
    w = torch.cat(gathered)
    if not w.numel():
        return dict(calib_w_mean=None, calib_w_p10=None, calib_w_low_frac=None)
    return dict(calib_w_mean=float(w.mean()), calib_w_p10=float(quantile(w, 0.1)),
                calib_w_low_frac=float((w < 0.5).float().mean()))


def quantile(values, q):
    """torch.quantile's linear interpolation of a 1-D tensor, for any number of values (torch.quantile refuses
    more than 2^24), NaN where a value is NaN. The rank is in the values' dtype, as torch.quantile's; past 2^24
    values a float32 rank may round past the last index, so the indices are clamped."""
    if values.isnan().any():
        return values.new_tensor(float("nan"))
    ordered = values.sort().values
    last = ordered.numel() - 1
    rank = torch.tensor(q, dtype=ordered.dtype) * last
    return ordered[rank.long().clamp(max=last)].lerp(ordered[rank.ceil().long().clamp(max=last)], rank - rank.floor())


@torch.no_grad()
def critique_free_accuracy(model, tokenizer, task, examples, args, ctx, samples=0, what="held-out evaluation"):
    """Held-out critique-free accuracy: greedy, and with `samples` > 0 also the mean reward of that many first
    attempts per example at the training temperature (the quantity RL maximises; eval.py's acc_round_1, SPEC
    §4's pass@1 for 0/1 rewards). Each rank scores its share; the sums are all-reduced. Returns (greedy, mean),
    (None, None) where an environment server failed for good on any rank: that evaluation is lost, not the run,
    and the task starts over for the next one."""
    mine = examples[ctx.rank::ctx.world]

    def sample(m):
        greedy, _ = rollout(m, tokenizer, task, mine, sampling_config(args, 1, 0.0), seed=0, critique=False)
        sampled, _ = rollout(m, tokenizer, task, mine, sampling_config(args, samples), seed=mix_seed(args.seed, 7),
                             critique=False) if samples else ([], None)
        return greedy, sampled
    try:
        greedy, sampled = on_every_rank(model, args, ctx, sample)
    except EnvironmentServerFailed as e:   # on every rank together
        warn(f"{what} failed: {e}; its figures are null")
        task.start_over()
        return None, None
    first = lambda rollouts: sum(c.episodes[0].reward for ro in rollouts for c in ro.chains)
    greedy_correct, sampled_correct, n = all_reduce([first(greedy), first(sampled), len(mine)], ctx)
    return greedy_correct / max(n, 1), sampled_correct / max(n * samples, 1)


# ==================================================================================================
# Supervised warm start for the randomly initialised default model
# ==================================================================================================

def target_ids(tokenizer, text, think):
    """A warm-start target turn: `text` and the end-of-turn id, after an empty think block with thinking on (the
    generation prompt then leaves the block to the model: a target without one would teach it to skip it)."""
    return tokenizer.encode(EMPTY_THINK * think + text, add_special_tokens=False) + [end_of_turn_id(tokenizer)]


def expert_episode(task, tokenizer, example, observation_markers, actions=None, rng=None, think=False):
    """(tokens, loss mask) of the task's expert episode from a reset (or of `actions`): each action and its
    end-of-turn (trained; target_ids), then the observation in the template's user-turn form (context), as a
    sampled episode would read (SPEC §1)."""
    before, after = observation_markers
    env = task.env(example)
    env.reset()
    tokens, mask = [], []
    for action in task.expert_actions(example, rng) if actions is None else actions:
        ids = target_ids(tokenizer, action, think)
        tokens, mask = tokens + ids, mask + [1] * len(ids)
        observation, _, done = env.step(action)
        if done:
            break
        ids = before + encode_observation(tokenizer, observation) + after
        tokens, mask = tokens + ids, mask + [0] * len(ids)
    env.close()
    return tokens, mask


def warm_start_pairs(task, tokenizer, example, think, observation_markers, attempt=None, gate="failure", rng=None,
                     obs_chars=OBS_CHARS):
    """(context, tokens, loss mask) triples that teach the SPEC §1 roles: the solver's expert episode
    under S(x); given the model's own sampled `attempt` (an Episode) that failed, a critique under C(x, tau)
    and the expert episode again under S(x, c) with the task's tip (`task.warm_start_critique`: a one-turn
    task names the failed answer, `Wrong, it is not A.`). The critic's target is that tip, or what
    `task.warm_start_critic_target` makes of it (boxes: the format alone, from `rng`). The attempt is the
    model's own, so a named answer is a real mistake and says nothing else about the right one (a made-up
    near miss would teach the retry to answer "the tip's number plus or minus a little"). Under critic_gate "failure" the
    critic never sees a success, so successes add no pair; under "always" the critic answers `Correct.`."""
    tokens, mask = expert_episode(task, tokenizer, example, observation_markers, rng=rng, think=think)
    task_text, first_observation = task.env(example).reset()
    pairs = [(solver_context(tokenizer, task_text, first_observation, enable_thinking=think), tokens, mask)]
    if attempt is None or (attempt.reward == 1.0 and gate == "failure"):
        return pairs
    if attempt.reward == 1.0:
        critique = taught = CRITIQUE_RIGHT
    else:
        critique = task.warm_start_critique(example, attempt.actions, attempt.observations)
        if critique is None:
            return pairs
        taught = task.warm_start_critic_target(example, critique, rng or random.Random(example.id))
    summary = episode_summary(attempt.reward, attempt.actions, attempt.observations, obs_chars)
    critique_ids = target_ids(tokenizer, taught, think)
    pairs.append((critic_context(tokenizer, task_text, first_observation, summary, think), critique_ids,
                  [1] * len(critique_ids)))
    retry_tokens, retry_mask = expert_episode(task, tokenizer, example, observation_markers,
                                              task.retry_expert_actions(example, critique), think=think)
    pairs.append((solver_context(tokenizer, task_text, first_observation, critique, think), retry_tokens, retry_mask))
    return pairs


def warm_start(model, tokenizer, task, args, ctx):
    """Supervised warm start of a randomly initialised model, so that RL starts with some reward and a
    critic and retry that know their formats: token-mean cross-entropy on warm_start_pairs, the stop
    token included so the model learns to end.

    Solver pairs alone until greedy accuracy on training examples reaches --warm_start_target (checked
    every 50 steps; when a small model "gets" arithmetic varies by hundreds of steps with the data
    order), then --warm_start_role_steps more steps that also sample one attempt per example and add
    the critic and retry pairs of its failures. Returns (steps, accuracy)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.warm_start_lr)
    rng = random.Random(mix_seed(args.seed, ctx.rank, 5))
    markers = observation_turn(tokenizer, args.enable_thinking)
    per_rank = args.warm_start_batch // ctx.world
    probe = task.examples[:128]  # training examples: the held-out split stays unseen until RL begins
    step, acc, roles_until = 0, 0.0, None
    while roles_until is None or step < roles_until:
        if roles_until is None and step and (step % 50 == 0 or step >= args.warm_start_steps):
            acc, _ = critique_free_accuracy(model, tokenizer, task, probe, args, ctx, what="the warm start's probe")
            if acc is None:   # the training task's own servers: the warm start cannot go on (every rank raises)
                raise EnvironmentServerFailed(f"{task.name}: a server failed for good during the warm start's probe "
                                              f"(the warning above names it)")
            print0(ctx, f"warm start step {step}: greedy accuracy {acc:.3f} on {len(probe)} training examples")
            if acc >= args.warm_start_target or step >= args.warm_start_steps:
                roles_until = step + args.warm_start_role_steps
        examples = [rng.choice(task.examples) for _ in range(per_rank)]
        attempts = [None] * per_rank
        if roles_until is not None:  # the model's own attempts, to critique and retry
            with torch.no_grad():
                rollouts, _ = on_every_rank(model, args, ctx, lambda m: rollout(
                    m, tokenizer, task, examples, sampling_config(args, 1), seed=mix_seed(args.seed, step, ctx.rank, 8),
                    critique=False))
            attempts = [ro.chains[0].episodes[0] for ro in rollouts]
        pairs = [p for example, attempt in zip(examples, attempts) for p in warm_start_pairs(
            task, tokenizer, example, args.enable_thinking, markers, attempt, args.critic_gate, rng, args.obs_chars)]
        contexts, responses, masks = zip(*pairs)
        with autocast_for(model, args):
            logp, mask = response_logprobs(model, contexts, responses, 1.0, ctx.device, masks)
            loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    return step, acc


# ==================================================================================================
# Checkpoints: Hugging Face folders, written atomically; optimizer shards and step beside the weights
# ==================================================================================================

# A checkpoint folder: the Hugging Face files (rank 0 writes the full weights: eval.py and transformers read
# them), TRAINER_STATE and OPTIMIZER/. The step and settings are a small JSON file because every rank reads
# them at resume. The AdamW state is written with torch.distributed.checkpoint (DCP), one file per rank: under
# FSDP2 each rank writes and reads its own shard (no gather to rank 0, no broadcast); under DDP or in one
# process the state is replicated and DCP writes each tensor once. DCP reshards on load, so a resume may
# change the number of ranks or --fsdp. DCP needs a folder every rank sees (a shared file system over nodes).
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer"
OLD_TRAINER_STATE = "trainer_state.pt"  # the layout before issue 14: the full optimizer in one file; refused


def full_model_state(model, ctx):
    """The full (unsharded) model state dict keyed by parameter name, on CPU, on rank 0 (other ranks get
    an empty dict). Works the same for a plain module, DDP and FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1))
    if ctx.world == 1:
        state = {k: v.detach().cpu() for k, v in state.items()}
    return state


@contextlib.contextmanager
def dcp_quietly():
    """DCP in one process (no process group) works, and warns that it assumes so on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_optimizer(model, optimizer, folder):
    """Every rank writes its part of the optimizer state into `folder` (a collective under a process group);
    returns once every rank's file and DCP's .metadata are written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    fresh = not optimizer.state
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # this rank's shard under FSDP2
    if fresh:  # get_optimizer_state_dict made the state with an optimizer step at lr 0: saved as no step taken
        for param_state in state["optimizer"]["state"].values():
            param_state["step"] = torch.zeros_like(param_state["step"])
    with dcp_quietly():
        dcp.save(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    if fresh:  # and gave it that state: its first real step must stay a first step
        optimizer.state.clear()


def load_optimizer(model, optimizer, checkpoint):
    """The checkpoint's optimizer state into `optimizer` (fresh, on this wrapping and world size): each rank
    reads only the pieces its own state dict holds. A damaged folder is a UsageError naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    folder = os.path.join(checkpoint, OPTIMIZER)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the shapes and shards to fill in place
    try:
        with dcp_quietly():
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:
        rank, cause = 0, e
        if isinstance(e, dcp.api.CheckpointException):  # every rank's errors, gathered: every rank raises
            rank, (cause, _) = next(iter(e.failures.items()))
        raise UsageError(f"{folder}: the optimizer state cannot be read (rank {rank}: {type(cause).__name__}: "
                         f"{one_line(cause, limit=100)}); resume from another checkpoint") from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_checkpoint(model, optimizer, tokenizer, args, ctx, step, name):
    """Write a checkpoint into the run folder DIR: a Hugging Face folder (weights, config.json with the
    stop ids in generation_config.json, the tokenizer) plus trainer_state.json (step, settings) and
    optimizer/ (DCP, a file per rank). `name` is warm_start, step_N or final; final is written as step_N
    (N = `step`), or is the whole checkpoint of that step `latest` names (warm_start after --steps 0), and
    DIR/final is then a relative symlink to it.

    Kill-safe at every point: the folder is written under .tmp-NAME (every rank its optimizer file, then rank
    0 the rest), fsynced and renamed; only then is DIR/latest (a file naming the newest folder) replaced,
    atomically, and then DIR/final. A whole checkpoint that `latest` names is never removed or rewritten
    (saving it again only points `final` at it), so `latest` and `final` always name a whole checkpoint; one
    found damaged (a run resumed from an earlier checkpoint reaches its step again) is written anew."""
    folder = f"step_{step}" if name == "final" else name
    named = latest_name(args.out) if ctx.main else None
    # saved already: `latest` names this folder, whole; for final, whatever folder of this step it names (--steps 0:
    # the warm start just saved is the final checkpoint, not copied again)
    saved = bool(named) and (named == folder or name == "final") and whole_checkpoint(os.path.join(args.out, named), step)
    folder = named if saved else folder
    saved = all_reduce([float(saved)], ctx)[0] > 0  # rank 0's reading of `latest`, so every rank agrees
    if saved:
        if ctx.main and name == "final":
            point_final(args.out, folder)
    else:
        path, tmp = os.path.join(args.out, folder), os.path.join(args.out, f".tmp-{folder}")
        if ctx.main:
            remove_path(tmp)
            os.makedirs(tmp)
        if ctx.world > 1:
            dist.barrier()  # .tmp-NAME is empty before any rank writes into it
        save_optimizer(model, optimizer, os.path.join(tmp, OPTIMIZER))
        model_state = full_model_state(model, ctx)
        if ctx.main:
            unwrap(model).save_pretrained(tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            # the sampling defaults of where the run started: the checkpoint it resumed (train resolved it), --model
            write_generation_config(tmp, tokenizer, args.resume or (None if args.model == "tiny" else args.model))
            # Every random draw is seeded from (seed, step, rank), so the step is the whole RNG state.
            write_trainer_state(tmp, step, args)
            fsync_tree(tmp)
            remove_path(path)  # what a kill left between this rename and the `latest` write below
            os.rename(tmp, path)
            fsync_dir(args.out)
            write_atomic(os.path.join(args.out, "latest"), folder + "\n")
            if name == "final":
                point_final(args.out, folder)
    if ctx.world > 1:
        dist.barrier()


def whole_checkpoint(folder, step):
    """The checkpoint of `step` reads as one that resumes (its trainer state and optimizer folder)."""
    try:
        return read_trainer_state(folder)["step"] == step
    except UsageError:
        return False


def write_trainer_state(folder, step, args):
    with open(os.path.join(folder, TRAINER_STATE), "w") as f:
        f.write(json.dumps({"step": step, "args": vars(args)}, indent=1) + "\n")


def point_final(out, folder):
    """DIR/final -> folder, a relative symlink replaced atomically (a `final` folder of an older layout is
    removed first: `latest` no longer names it)."""
    final, link = os.path.join(out, "final"), os.path.join(out, ".tmp-final-link")
    remove_path(link)
    os.symlink(folder, link)
    if os.path.isdir(final) and not os.path.islink(final):
        shutil.rmtree(final)
    os.replace(link, final)
    fsync_dir(out)


def write_generation_config(folder, tokenizer, model_folder=None):
    """`transformers` generate stops where our sampler does: config.json's eos_token_id (when unset) is
    the end-of-turn id <|im_end|>, and generation_config.json lists every stop id (stop_token_ids:
    <|im_end|>, <|endoftext|>). Its sampling defaults are `model_folder`'s (the --model a run started
    from: Qwen3's do_sample with temperature 0.6, top_p 0.95, top_k 20), greedy where it has none."""
    stops = stop_token_ids(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        end_of_turn = tokenizer.eos_token_id
    config_file = os.path.join(folder, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("eos_token_id") is None:
        config["eos_token_id"] = end_of_turn if end_of_turn is not None else stops
        with open(config_file, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
    pad = tokenizer.pad_token_id
    generation = {"do_sample": False}
    source = os.path.join(model_folder or "", "generation_config.json")
    if model_folder and os.path.isfile(source):
        try:
            with open(source) as f:
                saved = json.load(f)
            generation = saved if isinstance(saved, dict) else generation
        except (OSError, ValueError):
            pass   # a damaged file of the model's: greedy, as without one
    generation.update(eos_token_id=stops, pad_token_id=pad if pad is not None else (stops[0] if stops else None))
    generation.pop("bos_token_id", None)
    if config.get("bos_token_id") is not None:
        generation["bos_token_id"] = config["bos_token_id"]
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        f.write(json.dumps(generation, indent=2) + "\n")


def remove_path(path):
    """Remove a file, a symlink or a folder tree, if there."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def fsync_dir(path):
    """Make a rename or a new entry in `path` durable (where the file system allows a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file under `path`, then its folders: the data is on disk before the rename publishes it."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def latest_name(run_dir):
    """The folder DIR/latest names, or None."""
    try:
        with open(os.path.join(run_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_checkpoint(folder):
    """A checkpoint folder of this layout or of the old one (refused by read_trainer_state, with why)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in (TRAINER_STATE, OLD_TRAINER_STATE))


def is_our_checkpoint(folder):
    """A checkpoint folder this trainer names (warm_start, step_N): another trainer's may hold a trainer_state.json."""
    name = os.path.basename(os.path.normpath(folder))
    return (name == "warm_start" or name.startswith("step_") and name[5:].isdigit()) and is_checkpoint(folder)


def resolve_resume(path):
    """--resume PATH: a checkpoint folder (its run folder is its parent) or a run folder (then the
    checkpoint its `latest` names). Returns (checkpoint, run folder)."""
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: no such folder")
    if is_checkpoint(path):
        return path, os.path.dirname(os.path.normpath(path)) or "."
    name = latest_name(path)
    if name is not None:
        checkpoint = os.path.join(path, name)
        if not is_checkpoint(checkpoint):
            raise UsageError(f"--resume {path}: its latest names {name}, but there is no "
                             f"{os.path.join(checkpoint, TRAINER_STATE)}")
        return checkpoint, path
    steps = {}  # a kill between a first checkpoint's rename and the first `latest` write leaves it unnamed
    for name in sorted(os.listdir(path)):
        # final: a name for one of them; .tmp-NAME: one a kill left half saved
        if os.path.islink(os.path.join(path, name)) or name.startswith(".tmp-"):
            continue
        try:
            steps[name] = saved_trainer_state(os.path.join(path, name))["step"]
        except UsageError:
            pass
    if steps:
        newest = max(steps, key=steps.get)
        raise UsageError(f"--resume {path}: no `latest` file names a checkpoint to resume; its newest is "
                         f"{newest}: --resume {os.path.join(path, newest)}")
    raise UsageError(f"--resume {path}: no {TRAINER_STATE} there and no `latest` file: neither an icrl.py "
                     f"checkpoint nor a run folder")


def resolve_checkpoint(path):
    """--resume takes a checkpoint folder or a run folder (then its `latest`)."""
    return resolve_resume(path)[0]


def read_trainer_state(checkpoint):
    """trainer_state.json of a checkpoint to resume ({"step", "args"}), once its optimizer folder has passed a
    cheap check (check_optimizer_folder); anything missing or damaged is a UsageError naming the file or folder."""
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)) and \
            os.path.isfile(os.path.join(checkpoint, OLD_TRAINER_STATE)):
        raise UsageError(f"{checkpoint}: a checkpoint of an older icrl.py ({OLD_TRAINER_STATE}, the whole optimizer "
                         f"in one file), which this one cannot resume: it reads {TRAINER_STATE} and a sharded "
                         f"{OPTIMIZER}/ folder; resume it with the icrl.py that wrote it, or start a new run from "
                         f"its weights with --model {checkpoint}")
    try:
        state = saved_trainer_state(checkpoint)
    except UsageError as e:
        raise UsageError(f"{e}; resume from another checkpoint") from None
    check_optimizer_folder(os.path.join(checkpoint, OPTIMIZER))
    return state


def saved_trainer_state(checkpoint):
    """trainer_state.json of a checkpoint, {"step", "args"} (the settings of the run that saved it); a file
    missing, damaged or not icrl.py's is a UsageError naming it."""
    file = os.path.join(checkpoint, TRAINER_STATE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{file}: cannot be read, truncated or damaged ({type(e).__name__}: {one_line(e)})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(state.get("args", {}), dict):
        raise UsageError(f"{file}: not an icrl.py trainer state (no step)")
    return state


def check_optimizer_folder(folder):
    """Before anything loads, without reading a tensor: DCP's .metadata reads and every file it names is
    there and as long as the pieces it places in it (a kill or a copy cut short)."""
    from torch.distributed.checkpoint import FileSystemReader
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: missing (the optimizer state); resume from another checkpoint")
    metadata_file = os.path.join(folder, ".metadata")
    try:
        needed = {}
        for info in FileSystemReader(folder).read_metadata().storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a pickle cut short or garbage fails in many ways
        raise UsageError(f"{metadata_file}: cannot be read, truncated or damaged ({type(e).__name__}: "
                         f"{one_line(e)}); resume from another checkpoint") from None
    for name, size in sorted(needed.items()):
        file = os.path.join(folder, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            raise UsageError(f"{file}: {'missing' if have is None else f'truncated ({have} of {size} bytes)'} "
                             f"(the optimizer state); resume from another checkpoint")


def one_line(error, limit=300):
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# ==================================================================================================
# Command line
# ==================================================================================================

def add_episode_args(p):
    """Episode, chain and sampler flags, the same in training and in eval.py (SPEC §1, §2.1-2.4)."""
    p.add_argument("--compile_sampler", action=argparse.BooleanOptionalAction, default=False,
                   help="decode steps' layers through torch.compile: "
                   "on an H100 1.07-1.17x faster sampling at 1-64 sequences (README), after a one-off compile")
    p.add_argument("--max_turns", type=int, default=0, help="most action turns per episode (SPEC §1; 0: the "
                   "task's own, 1 for one-turn tasks)")
    p.add_argument("--max_context", type=int, default=0, help="most tokens of context + episode; an episode that "
                   "would pass it is truncated (SPEC §1; 0: the model's max_position_embeddings). The critic's "
                   "context and critique fit it too: the summary leaves out its earliest turns")
    p.add_argument("--obs_chars", type=int, default=800, help="each observation in the critic's summary is cut "
                   "to this many characters (SPEC §1)")
    p.add_argument("--rounds", type=int, default=2, help="K: most episodes per chain (solve + K-1 critique/retry "
                   "rounds; 1: critique-free only)")
    p.add_argument("--critic_gate", default="failure", choices=["failure", "always"], help="§2.2: critique failures "
                   "only (the paper), or successes too (ablation: breaking a success then costs)")


# Settings a resume may change; every other saved setting defines the run and must be given equal or not
# at all (then the saved value is taken). --steps may not go below the checkpoint's step.
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "micro_batch", "rollout_batch", "compile_sampler",
                     "grad_ckpt", "fsdp", "env_url")
NOT_SETTINGS = ("resume", "out", "overwrite")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own mistakes (a bad int, an unknown flag): one line as well
        raise UsageError(message)


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and task
    p.add_argument("--model", default="tiny", help="a Hugging Face Qwen3 folder, or `tiny`: a random 4-layer "
                   "Qwen3 with a character tokenizer (the embedded default)")
    p.add_argument("--task", default="boxes", help="arithmetic | countdown | gsm8k | math (one turn); "
                   "gridworld | guess | boxes (multi-turn); agentgym:<alfworld|webshop|sciworld|searchqa> with "
                   "--env_url (data.py)")
    p.add_argument("--env_url", default=None, help="agentgym tasks: comma-separated AgentGym server URLs, one "
                   "episode at a time each (../shared/AGENTGYM.md)")
    p.add_argument("--train_file", default=None, help="JSONL training split (gsm8k, math), or AgentGym task ids "
                   "(JSONL or one per line)")
    p.add_argument("--eval_file", default=None, help="JSONL held-out split (gsm8k, math), or AgentGym task ids "
                   "(JSONL or one per line)")
    p.add_argument("--task_knob", action="append", default=[], metavar="KEY=VALUE", help="a task option, "
                   "repeatable, e.g. --task_knob digits=3 --task_knob ops=+-* (data.py lists each task's)")
    p.add_argument("--enable_thinking", action="store_true", help="passed to the chat template (SPEC §1)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype; weights stay float32")
    # sampling and episodes (SPEC §1, §2.1-2.4)
    p.add_argument("--group_size", type=int, default=8, help="G: attempts per query")
    p.add_argument("--batch_prompts", type=int, default=16, help="queries per step, global (split over ranks)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="tokens per action turn (solver and retry)")
    p.add_argument("--critic_max_new_tokens", type=int, default=24, help="critiques")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); log-probs use it too")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; keep 1 for training: rho and the "
                   "log-probs are of the full softmax, uncorrected for the truncation (the comment above old_logprobs)")
    p.add_argument("--rollout_batch", type=int, default=0, help="sequences per sampling call on each rank, "
                   "to bound the KV cache (0: a phase's whole batch at once)")
    add_episode_args(p)
    # method (SPEC §2) and its ablations
    p.add_argument("--algo", default="icrl", choices=["icrl", "grpo"], help="grpo: the baseline, one round, no critique")
    p.add_argument("--calib", default="token", choices=["token", "seq", "none"], help="§2.7 weight granularity")
    p.add_argument("--calib_clip", type=float, default=2.0, help="W: upper clip of the §2.7 weight")
    p.add_argument("--calib_logp", default="trainer", choices=["trainer", "sampler"], help="where §2.7's l_cond "
                   "comes from: a trainer forward of each retry under S(x, c), or the sampler's log-probs of it "
                   "(the authors' way: one forward fewer per retry; the two differ by the sampler's rounding, "
                   "which logprob_gap then reports on first attempts and critiques only; with --calib none, "
                   "which reads no l_cond, no such forward runs either)")
    p.add_argument("--adv", default="rolewise", choices=["rolewise", "pooled"], help="§2.6 advantage groups")
    p.add_argument("--no_critic_train", action="store_true", help="sample critiques, drop them from the loss")
    p.add_argument("--critic_coef", type=float, default=1.0, help="lambda_c of §2.8")
    p.add_argument("--clip_low", type=float, default=0.2, help="eps_low of §2.8")
    p.add_argument("--clip_high", type=float, default=0.28, help="eps_high of §2.8")
    # optimisation (SPEC §2.9)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (the defaults suit the tiny "
                   "model; Qwen3-4B/8B want ~1e-6)")
    p.add_argument("--lr_warmup", type=int, default=10, help="RL steps of linear learning-rate warmup: "
                   "a fresh AdamW's first steps move every weight by ~lr whatever its gradient")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over each step's samples")
    p.add_argument("--minibatch", type=int, default=None, help="queries per optimizer update, global "
                   "(default: --batch_prompts, one update per pass)")
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per forward/backward (memory only; "
                   "default: 64 for --model tiny, else 2, what README's memory table assumes)")
    p.add_argument("--warm_start_steps", type=int, default=None, help="most solver-only warm-start steps "
                   "before RL (default: 1200 for --model tiny, else 0: no warm start)")
    p.add_argument("--warm_start_target", type=float, default=0.25, help="leave the solver-only warm start "
                   "once greedy accuracy on 128 training examples reaches this")
    p.add_argument("--warm_start_role_steps", type=int, default=None, help="then this many steps that add "
                   "the critic and retry formats (default: the task's own, 100; boxes 400)")
    p.add_argument("--warm_start_lr", type=float, default=3e-3, help="warm-start learning rate")
    p.add_argument("--warm_start_batch", type=int, default=64, help="warm-start examples per step, global")
    # systems
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each layer in the backward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order and every sampling call")
    # schedule and output
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the task's own, 60; boxes 150)")
    p.add_argument("--eval_every", type=int, default=10, help="held-out critique-free accuracy every N steps")
    p.add_argument("--eval_examples", type=int, default=256, help="held-out examples per evaluation")
    p.add_argument("--eval_samples", type=int, default=4, help="attempts per held-out example for the mean "
                   "reward eval_acc (pass@1 for 0/1 rewards); greedy accuracy (eval_acc_greedy) beside it")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only the final one)")
    p.add_argument("--max_prompt_tokens", type=int, default=0, help="longest S(x) kept, in tokens: longer "
                   "training and held-out examples are dropped, with a count, before the model loads (0: the "
                   "model's max_position_embeddings, or --max_context, minus what a step generates after S(x): "
                   "the action, and for ICRL a critique with its instructions)")
    p.add_argument("--out", default="runs/icrl", help="run folder: checkpoints, `latest`, `final` and "
                   "metrics.jsonl. A new run refuses a non-empty folder unless --overwrite; a resumed run "
                   "writes into its own folder (the default then)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out: the old "
                   "run's metrics.jsonl, latest, final and checkpoint folders are deleted when the new run "
                   "first writes (other files stay, and so does a --model folder inside --out)")
    may_change = ", ".join(f"--{k}" + (" (not below the checkpoint's step)" if k == "steps" else "")
                           for k in RESUME_MAY_CHANGE)
    p.add_argument("--resume", default=None, help="continue a run: a checkpoint folder (the run folder is its "
                   "parent) or a run folder (its latest checkpoint); it continues in that run folder with the "
                   f"run's saved settings. A flag given again must equal the saved value, except these, which "
                   f"may change on resume: {may_change}")
    return p


def given_flags(argv):
    """The dests of the flags written on the command line (not left at their defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv=None):
    """The command line, checked (UsageError: one line naming the flag). With --resume, the run's saved
    settings fill every flag not given, and a given one must equal the saved value (RESUME_MAY_CHANGE
    excepted); --out becomes the run's own folder and --resume its checkpoint."""
    args = build_parser().parse_args(argv)
    if args.resume:
        continue_run(args, given_flags(argv))
    if args.warm_start_steps is None:
        args.warm_start_steps = 1200 if args.model == "tiny" else 0
    try:  # the task's own defaults (an unknown --task is reported by load_tasks)
        defaults = task_class(args.task)
    except ValueError:
        defaults = Task
    if args.warm_start_role_steps is None:
        args.warm_start_role_steps = defaults.warm_start_role_steps
    if args.steps is None:
        args.steps = defaults.rl_steps
    if args.micro_batch is None:
        args.micro_batch = 64 if args.model == "tiny" else 2
    if args.minibatch is None:
        args.minibatch = args.batch_prompts
    check_flags(args)
    return args


def continue_run(args, given):
    """--resume: the checkpoint, its run folder as --out, the saved settings (see parse_args)."""
    if args.overwrite:
        raise UsageError("--overwrite starts a new run and --resume continues one: give one of them")
    checkpoint, run_dir = resolve_resume(args.resume)
    if "out" in given and os.path.realpath(args.out) != os.path.realpath(run_dir):
        raise UsageError(f"--out {args.out}: --resume {args.resume} continues its own run folder {run_dir}; "
                         f"leave --out out")
    state = read_trainer_state(checkpoint)
    start = state["step"]
    newest = latest_name(run_dir)
    if newest is not None and os.path.realpath(os.path.join(run_dir, newest)) != os.path.realpath(checkpoint):
        try:
            newest_step = read_trainer_state(os.path.join(run_dir, newest))["step"]
        except UsageError:
            newest_step = None
        if newest_step is not None and newest_step > start:
            raise UsageError(f"--resume {args.resume} is at step {start}, but its run {run_dir} went on to step "
                             f"{newest_step} ({newest}); continuing from here would overwrite that: resume {run_dir}, "
                             f"or copy {checkpoint} into a new folder and resume that copy")
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}
    flags = {action.dest: action for action in build_parser()._actions}
    for key, old in saved.items():
        if key in NOT_SETTINGS or not hasattr(args, key):
            continue
        if not flag_takes(flags[key], old):  # a hand-edited file
            raise UsageError(f"{os.path.join(checkpoint, TRAINER_STATE)}: the saved setting {key} = {json.dumps(old)} "
                             f"is not a value --{key} takes")
        if key not in given:
            setattr(args, key, old)
        elif key not in RESUME_MAY_CHANGE and not same_setting(key, getattr(args, key), old):
            raise UsageError(f"--{key} {show(getattr(args, key))} differs from this run's {show(old)} (saved in "
                             f"{os.path.join(checkpoint, TRAINER_STATE)}): a resume keeps the settings that define "
                             f"the run; those that may change: {', '.join('--' + k for k in RESUME_MAY_CHANGE)}")
    if args.steps < start:
        raise UsageError(f"--steps {args.steps} is below step {start} of --resume {checkpoint}: a resume continues "
                         f"a run, never rewinds it; pass --steps {start} or more")
    args.out, args.resume = run_dir, checkpoint


def flag_takes(action, value):
    """`value`, read from JSON, is one the flag's parser gives: a bool for a switch, a list of strings for a
    repeated flag, None where that is the default, else what its type and choices accept."""
    if action.nargs == 0:  # store_true, BooleanOptionalAction
        return isinstance(value, bool)
    if isinstance(action, argparse._AppendAction):
        return value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is None:
        return action.default is None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        converted = (action.type or str)(str(value))
    except ValueError:
        return False
    return converted == value and (action.choices is None or converted in action.choices)


def same_setting(key, new, old):
    if key == "task_knob":
        return sorted(new or []) == sorted(old or [])
    if key == "max_turns" and new == 0:  # 0: the task's own, which is what was saved
        return True
    return new == old


def show(value):
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def need(args, ok, flag, why):
    """A UsageError naming --flag, its value and `why`, unless ok."""
    if not ok:
        raise UsageError(f"--{flag} {getattr(args, flag)}: {why}")


def check_sampling_flags(args, greedy=False):
    """--temperature, --top_p and the token limits, as icrl.py and eval.py check them (greedy: eval.py's
    --temperature 0 is allowed; training's log-probs are taken at the sampling temperature, so not there)."""
    t = args.temperature
    need(args, math.isfinite(t) and (t >= 0 if greedy else t > 0), "temperature", "must be a finite number " +
         (">= 0" if greedy else "> 0 (the trainer's log-probs are taken at the sampling temperature)"))
    need(args, 0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    for flag in ("max_new_tokens", "critic_max_new_tokens"):
        need(args, getattr(args, flag) >= 1, flag, "must be at least 1")


def check_flags(args):
    """Every flag's range, before anything is loaded: a UsageError naming the flag and why."""
    check_sampling_flags(args)
    for flag, positive in (("lr", True), ("warm_start_lr", True), ("calib_clip", True), ("grad_clip", True),
                           ("critic_coef", False), ("clip_high", False), ("weight_decay", False)):
        value = getattr(args, flag)
        need(args, math.isfinite(value) and (value > 0 if positive else value >= 0), flag,
             f"must be a finite number {'> 0' if positive else '>= 0'}")
    need(args, 0 <= args.clip_low < 1, "clip_low", "must be in [0, 1)")
    need(args, 0 <= args.warm_start_target <= 1, "warm_start_target", "must be in [0, 1]")
    for flag in ("group_size", "batch_prompts", "minibatch", "micro_batch", "rounds", "ppo_epochs",
                 "eval_examples", "eval_samples", "warm_start_batch"):
        need(args, getattr(args, flag) >= 1, flag, "must be at least 1")
    for flag in ("steps", "save_every", "eval_every", "warm_start_steps", "warm_start_role_steps", "lr_warmup",
                 "rollout_batch", "max_turns", "max_context", "obs_chars", "max_prompt_tokens"):
        need(args, getattr(args, flag) >= 0, flag, "must be 0 or more")
    one_round = args.algo == "grpo" or args.rounds == 1
    need(args, args.group_size > 1 or not one_round, "group_size", "every advantage would be 0 (a group of one "
         "attempt has no relative signal), so nothing is learned; use 2 or more")
    if args.group_size == 1:
        warn("--group_size 1: a query has one chain, so its groups hold that chain alone: a first attempt that "
             "succeeds gets advantage 0, and with --rounds 2 so does every critique (the critic learns nothing)")


def check_divisibility(args, ctx):
    """No silent truncation: every rank gets the same number of queries and of updates."""
    if args.batch_prompts % ctx.world:
        raise UsageError(f"--batch_prompts {args.batch_prompts} is not divisible by {ctx.world} ranks")
    if args.batch_prompts % args.minibatch or args.minibatch % ctx.world:
        raise UsageError(f"--minibatch {args.minibatch} must divide --batch_prompts {args.batch_prompts} "
                         f"and be divisible by {ctx.world} ranks")
    if args.warm_start_steps and not args.resume and args.warm_start_batch % ctx.world:
        raise UsageError(f"--warm_start_batch {args.warm_start_batch} is not divisible by {ctx.world} ranks")


# ==================================================================================================
# Main
# ==================================================================================================

TINY_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)


def load_model_and_tokenizer(args, ctx):
    """`tiny`: random init seeded by --seed (identical on every rank) with the character tokenizer;
    otherwise a Hugging Face Qwen3 folder. A resumed run loads the checkpoint's weights."""
    tokenizer, _ = load_tokenizer(args)
    return load_model(args, ctx, tokenizer), tokenizer


def load_tokenizer(args):
    """(tokenizer, the model's max_position_embeddings), every folder checked and no weight read: --model
    (and --resume's checkpoint) have a readable config.json and safetensors headers, the tokenizer loads,
    has a chat template and fits the vocabulary. Each mistake is a UsageError naming the folder or file."""
    from transformers import AutoTokenizer
    if args.resume:  # weights and tokenizer from the checkpoint, which saved both: --model may have changed since
        flag, folder = "--resume", args.resume
        config, tokenizer = checked_folder(flag, folder), checked_tokenizer(flag, folder)
    elif args.model == "tiny":
        flag = "--model"
        with tempfile.TemporaryDirectory(prefix="icrl-char-tokenizer-") as folder:
            build_char_tokenizer(folder, args.task)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        config = Qwen3Config(vocab_size=len(tokenizer), **TINY_CONFIG)
    else:
        flag, folder = "--model", args.model
        config, tokenizer = checked_folder(flag, folder), checked_tokenizer(flag, folder)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"{flag} {args.resume or args.model}: its tokenizer has {len(tokenizer)} tokens, more than "
                         f"the model's vocab_size {config.vocab_size}")
    return tokenizer, config.max_position_embeddings


def checked_folder(flag, path):
    """The Qwen3Config of a checkpoint folder whose config.json and safetensors headers are sound."""
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such folder")
    try:
        return check_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: {one_line(e)}") from None


def checked_tokenizer(flag, path):
    """The folder's tokenizer, which the role prompts need with its chat template."""
    from transformers import AutoTokenizer
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UsageError(f"{flag} {path}: no tokenizer files there (tokenizer.json, or vocab.json and merges.txt, "
                         f"with tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers' many ways to fail on a broken folder
        raise UsageError(f"{flag} {path}: its tokenizer does not load ({type(e).__name__}: {one_line(e)})") from None
    if not tokenizer.chat_template:
        raise UsageError(f"{flag} {path}: its tokenizer has no chat template (chat_template.jinja, or chat_template "
                         f"in tokenizer_config.json); the role prompts are built with it")
    try:  # content with spaces at its ends: a template that trims it is refused now, not at such a prompt hours in
        solver_context(tokenizer, " task \n", " observation ", " tips ")
    except Exception as e:  # _chat_ids' ValueError, or the template's own (jinja) error
        raise UsageError(f"{flag} {path}: {one_line(e)}") from None
    return tokenizer


def load_model(args, ctx, tokenizer):
    """The weights, read once: a resumed run's from its checkpoint (never --model's first), else --model's
    (`tiny`: a random init seeded by --seed)."""
    if args.resume:
        model = pretrained("--resume", args.resume)
    elif args.model == "tiny":
        torch.manual_seed(args.seed)
        model = Qwen3(Qwen3Config(vocab_size=len(tokenizer), **TINY_CONFIG))
    else:
        model = pretrained("--model", args.model)
    return model.to(ctx.device)


def pretrained(flag, path):
    try:
        return Qwen3.from_pretrained(path, dtype=torch.float32, device="cpu")
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: {one_line(e)}") from None


def load_tasks(args):
    """(train task, held-out task) from --task, --task_knob, --env_url and the data files."""
    return (checked_task(args, args.train_file, "train", args.seed),
            checked_task(args, args.eval_file, "test", args.seed))


def checked_task(args, path, split, seed):
    """load_task for --task, --task_knob (typed by the task's own knobs) and --env_url, one split; each
    mistake a UsageError naming the flag or the file and line (icrl.py and eval.py)."""
    try:
        return load_task(args.task, path=path, split=split, seed=seed,
                         **typed_knobs(args.task, args.task_knob, args.env_url))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(one_line(e)) from None


MAX_CHARS_PER_TOKEN = 32  # a text longer than this many characters per token of room is over-long untokenized


def prompt_limit(args, tokenizer, positions):
    """The longest S(x), in tokens: --max_prompt_tokens, or what the model's positions (or --max_context)
    leave after the most a step generates after S(x) in one context: an action (a solve or retry turn);
    for ICRL also a critique, with the critic's instructions (it reads the action) or the retry's tips."""
    think = args.enable_thinking
    budget = args.max_new_tokens
    if args.algo == "icrl" and args.rounds > 1:
        base = len(solver_context(tokenizer, "", "", enable_thinking=think))
        tips = len(solver_context(tokenizer, "", "", "", think)) - base
        critic = max(len(critic_context(tokenizer, "", "", summary, think)) - base   # one action, or every turn
                     for summary in (episode_summary(0.0, [""], [""], args.obs_chars),   # left out to fit
                                     episode_summary(0.0, [], [], args.obs_chars, left_out=10 ** 6)))
        budget += args.critic_max_new_tokens + max(tips, critic)
    context = min(positions, args.max_context or positions)
    room = context - budget
    where = f"the model has {positions} positions" + (f" (--max_context {context})" if context < positions else "")
    if room < 1:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: {where}, and a step generates up to {budget} "
                         f"tokens after the prompt: no room is left for one")
    if args.max_prompt_tokens > room:
        raise UsageError(f"--max_prompt_tokens {args.max_prompt_tokens}: {where}, and a step generates up to "
                         f"{budget} tokens after the prompt, so a prompt may have at most {room}")
    return args.max_prompt_tokens or room


def drop_long_prompts(task, examples, tokenizer, limit, args, what,
                      why="--max_prompt_tokens, or the positions or --max_context less what a step generates"):
    """The examples whose S(x) has at most `limit` tokens; the others are dropped with a warning (a count
    and the first few lines or ids); none left is a UsageError. The work is bounded: a text over
    MAX_CHARS_PER_TOKEN characters per token of the limit is over-long without tokenizing it, and one
    whose UTF-8 bytes with the template's fit is short (a token is at least a byte); only the rest is
    tokenized. AgentGym tasks are not checked: their first observation comes from the servers."""
    if isinstance(task, AgentGymTask) or not examples:
        return examples
    think = args.enable_thinking
    template = tokenizer.apply_chat_template([{"role": "user", "content": solver_message("", "")}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=think)
    template_bytes = len(template.encode())
    kept, dropped = [], []
    for example in examples:
        env = task.env(example)
        task_text, first_observation = env.reset()
        env.close()
        chars = len(task_text) + len(first_observation)
        if chars > limit * MAX_CHARS_PER_TOKEN:
            fits = False
        elif template_bytes + len(task_text.encode()) + len(first_observation.encode()) + 1 <= limit:
            fits = True
        else:
            fits = len(solver_context(tokenizer, task_text, first_observation, enable_thinking=think)) <= limit
        (kept if fits else dropped).append(example)
    if dropped:
        shown = ", ".join(str(e.meta.get("source") or e.id)[:80] for e in dropped[:5])
        more = ", ..." if len(dropped) > 5 else ""
        if not kept:
            raise UsageError(f"{what}: every example's prompt S(x) is longer than {limit} tokens "
                             f"({why}): {shown}{more}")
        warn(f"{what}: dropped {len(dropped)} of {len(examples)} examples whose prompt S(x) is longer than {limit} "
             f"tokens ({why}): {shown}{more}")
    return kept


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
    """Everything is checked before the weights load: flags (parse_args), data files and knobs, the
    tokenizer and checkpoint folders, prompt lengths."""
    check_divisibility(args, ctx)
    start_step = 0
    if args.resume:
        args.resume = resolve_checkpoint(args.resume)
        start_step = read_trainer_state(args.resume)["step"]
        if start_step == args.steps:
            final = os.path.join(args.out, "final")
            if ctx.main and os.path.realpath(final) != os.path.realpath(args.resume):
                point_final(args.out, os.path.basename(os.path.normpath(args.resume)))  # a kill came before it
            print0(ctx, f"{args.resume} is already at step {args.steps} (--steps): nothing to train; pass a larger "
                        f"--steps to continue the run")
            return None
    train_task, eval_task = load_tasks(args)
    tokenizer, positions = load_tokenizer(args)
    limit = prompt_limit(args, tokenizer, positions)
    train_task.examples = drop_long_prompts(train_task, train_task.examples, tokenizer, limit, args,
                                            f"--train_file {args.train_file}" if args.train_file else f"{args.task} train")
    eval_examples = drop_long_prompts(eval_task, eval_task.examples, tokenizer, limit, args,
                                      f"--eval_file {args.eval_file}" if args.eval_file else f"{args.task} test")
    eval_examples = eval_examples[:args.eval_examples]
    args.max_turns = args.max_turns or train_task.max_turns
    model = load_model(args, ctx, tokenizer)
    print0(ctx, "config:", json.dumps(vars(args), indent=1))
    print0(ctx, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{len(train_task.examples)} train / {len(eval_examples)} held-out examples, {ctx.world} rank(s)")
    model = wrap_model(model, args, ctx)
    if args.warm_start_steps and not args.resume:
        t = time.perf_counter()
        try:
            steps, acc = warm_start(model, tokenizer, train_task, args, ctx)
        except EnvironmentServerFailed as e:   # every rank together (on_every_rank)
            raise StoppedAndSaved(f"the warm start: {e}; nothing was saved: run it again once the servers answer") \
                from None
        print0(ctx, f"warm start: {steps} supervised steps in {time.perf_counter() - t:.0f}s (greedy accuracy "
                    f"{acc:.3f} on training examples when the critic and retry formats were added)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if ctx.main and args.overwrite and not args.resume:
        clear_run_folder(args.out, args.model)
    os.makedirs(args.out, exist_ok=True)
    if args.warm_start_steps and not args.resume:  # RL's starting point, for --model or --resume
        save_checkpoint(model, optimizer, tokenizer, args, ctx, 0, "warm_start")
    if args.resume and start_step:  # at step 0 (a warm start) no update has been taken: nothing to load
        load_optimizer(model, optimizer, args.resume)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if ctx.main:
        keep_metrics_until(metrics_path, start_step)

    def evaluate():
        greedy, pass1 = critique_free_accuracy(model, tokenizer, eval_task, eval_examples, args, ctx, args.eval_samples)
        return {"eval_acc": pass1, "eval_acc_greedy": greedy}

    def describe(figures):
        if figures["eval_acc"] is None:
            return "not measured (an environment server failed)"
        return f"pass@1 {figures['eval_acc']:.3f} ({args.eval_samples} samples each), greedy {figures['eval_acc_greedy']:.3f}"

    first = last = evaluate()
    began = "RL began" if start_step == 0 else f"step {start_step}, where this run resumed"
    where = (f"when RL begins (step 0{', after the warm start' if args.warm_start_steps and not args.resume else ''})"
             if start_step == 0 else f"at step {start_step}, where this run resumes")
    print0(ctx, f"held-out critique-free accuracy {where}: {describe(first)}")
    cfg = sampling_config(args)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not ctx.main,
               dynamic_ncols=True)
    for step in bar:
        try:
            metrics = train_step(model, optimizer, tokenizer, train_task, cfg, args, ctx, step)
        except EnvironmentServerFailed as e:   # raised by every rank together, before this step changed anything
            if step > start_step:
                save_checkpoint(model, optimizer, tokenizer, args, ctx, step, f"step_{step}")
            saved = (f"its {step} step{'s' * (step != 1)}" if step else "its warm start") + " saved"
            go_on = (f"the run stopped with {saved}: --resume {args.out} goes on"
                     if step > start_step or latest_name(args.out) else "no step was taken: run it again")
            raise StoppedAndSaved(f"step {step + 1}: {e}; {go_on} once the servers answer") from None
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 or done == args.steps:
            metrics.update(last := evaluate())
        if ctx.main:
            with open(metrics_path, "a") as f:
                f.write(metrics_line({"step": done, **metrics}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            shown = {k: f"{figures[k]:.2f}" for figures, k in ((metrics, "acc"), (metrics, "retry_acc"), (last, "eval_acc"))
                     if figures.get(k) is not None}
            bar.set_postfix(**shown, refresh=False)
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            save_checkpoint(model, optimizer, tokenizer, args, ctx, done, f"step_{done}")
    save_checkpoint(model, optimizer, tokenizer, args, ctx, args.steps, "final")
    if None in (last["eval_acc"], first["eval_acc"]):
        print0(ctx, f"held-out critique-free accuracy at the end (step {args.steps}): {describe(last)}")
    else:
        gained = {k: f"{100 * (last[k] - first[k]):+.1f}" for k in last}
        print0(ctx, f"held-out critique-free accuracy at the end (step {args.steps}): {describe(last)}; "
                    f"{gained['eval_acc']} and {gained['eval_acc_greedy']} points since {began}")
    return last


def on_every_rank(model, args, ctx, sample):
    """sample(m), the rollouts from the full weights m (full_weights). A server that failed for good on any rank
    raises EnvironmentServerFailed on every rank, with the first failing rank's message, before any other
    collective: all stop together (train saves the steps done; the held-out evaluation gives no figures)."""
    failure = None
    with full_weights(model, args) as m:
        try:
            result = sample(m)
        except EnvironmentServerFailed as e:
            failure = one_line(e)
    del m  # a bfloat16 sampling copy (full_weights) is freed before training
    if all_reduce([float(failure is not None)], ctx, dist.ReduceOp.MAX)[0]:
        if ctx.world > 1:
            messages = [None] * ctx.world
            dist.all_gather_object(messages, failure)
            failure = next(f"rank {rank}: {m}" for rank, m in enumerate(messages) if m is not None)
        raise EnvironmentServerFailed(failure)
    return result


def train_step(model, optimizer, tokenizer, task, cfg, args, ctx, step):
    """SPEC §2: rollout, advantages, calibration weights, the clipped update; returns §3 metrics."""
    examples = step_queries(task.examples, step, args, ctx)
    model.eval()
    rollouts, times = on_every_rank(model, args, ctx, lambda m: rollout(
        m, tokenizer, task, examples, cfg, seed=mix_seed(args.seed, step, ctx.rank), critique=args.algo == "icrl"))
    t = time.perf_counter()
    model.train()
    samples_by_query = build_samples(rollouts, args.adv, train_critic=not args.no_critic_train)
    samples = [s for qs in samples_by_query for s in qs]
    # with one update per step, l_old of the samples with a gradient comes from the update's own forward
    l_old_of = [s for s in samples if not s.has_gradient] if one_update_per_step(args) else samples
    with autocast_for(model, args):
        old_logprobs(unwrap(model), samples, args, ctx, l_old_of)
    stats = update(model, optimizer, samples_by_query, args, ctx, step)
    times["train"] = time.perf_counter() - t
    return step_metrics(rollouts, samples, stats, times, args, ctx)


def metrics_line(record):
    """One line of metrics.jsonl, strict JSON: NaN and infinities (a skipped update's loss) become null."""
    return json.dumps(finite_or_none(record), allow_nan=False)


def finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def read_metrics(path, quiet=False):
    """[(line, record)] of metrics.jsonl. A torn last line (a kill during its write) is dropped with a
    warning naming the file; a bad line elsewhere is a UsageError naming file and line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            out.append((line + "\n", record))
        elif number == len(lines):
            if not quiet:
                warn(f"{path}: dropped its torn last line {number} ({line[:40]!r}), a kill during its write")
        else:
            raise UsageError(f"{path}:{number}: not a metrics line ({line[:40]!r}); only the last line may be "
                             f"torn by a kill: mend or remove it")
    return out


def keep_metrics_until(path, step):
    """A resumed run rewrites metrics.jsonl without the lines past its checkpoint (and a torn last line)."""
    if not os.path.exists(path):
        return
    write_atomic(path, "".join(line for line, record in read_metrics(path) if record["step"] <= step))


def check_run_folder(args):
    """Before anything loads: a new run refuses a non-empty --out unless --overwrite; a resumed run's
    metrics.jsonl must be readable (a torn last line is fine: it is dropped when the run starts)."""
    if args.resume:
        read_metrics(os.path.join(args.out, "metrics.jsonl"), quiet=True)
        return
    check_out(args.out)
    entries = sorted(os.listdir(args.out))
    if entries and not args.overwrite:
        listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UsageError(f"--out {args.out} is not empty ({listed}): pass --overwrite to replace the run there, "
                         f"or --resume {args.out} to continue it")
    # --overwrite keeps the --model folder (clear_run_folder), unless the new run saves a checkpoint of its name
    # --steps 0 after a warm start saves no step_0: its final is the warm start (save_checkpoint)
    saves = [f"step_{args.steps}"] * bool(args.steps or not args.warm_start_steps) + \
        ["warm_start"] * bool(args.warm_start_steps) + \
        ([f"step_{k}" for k in range(args.save_every, args.steps, args.save_every)] if args.save_every else [])
    over = [name for name in saves if os.path.realpath(os.path.join(args.out, name)) == os.path.realpath(args.model)]
    if entries and over:
        raise UsageError(f"--model {args.model}: the new run would save its {over[0]} checkpoint over it in --out "
                         f"{args.out}; copy it out of {args.out} first, or give another --out")


def check_out(out):
    """--out, created and writable before any weight loads: a bad path found at the end loses the work."""
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out {out}: not a writable folder ({type(e).__name__}: {one_line(e)})") from None


def clear_run_folder(out, model):
    """--overwrite: remove an old run's files from `out` (metrics, latest, final, every checkpoint folder,
    leftovers of killed saves, and make eval's `eval/`: figures of checkpoints that go); anything else stays,
    and so does the folder `model` (the new run's --model, e.g. the old run's warm_start)."""
    if not os.path.isdir(out):
        return
    model = os.path.realpath(model)
    removed, kept = [], []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        holds_model = model == os.path.realpath(path) or model.startswith(os.path.realpath(path) + os.sep)
        ours = not holds_model and (name in ("metrics.jsonl", "metrics.jsonl.tmp", "latest", "latest.tmp", "final")
                                    or name.startswith(".tmp-") or is_our_checkpoint(path)
                                    or name == "eval" and os.path.isfile(os.path.join(path, "summary.json")))
        (removed if ours else kept).append(name)
        if ours:
            remove_path(path)
    print(f"--overwrite: removed the old run from {out} ({len(removed)} entries)"
          + (f"; kept {', '.join(kept)}" if kept else ""))


def main(argv=None):
    """A user's mistake (UsageError) prints one line and exits with status 2, before the model loads."""
    try:
        args = parse_args(argv)
        check_run_folder(args)
        need(args, not args.fsdp or "RANK" in os.environ, "fsdp", "shards over torchrun's processes: run under "
             "torchrun (--nproc_per_node 1 for one process), or pass --no-fsdp")
    except UsageError as e:  # the same on every rank under torchrun: rank 0 says it
        usage_exit(e, say=first_rank())
    ctx = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    run_then_shut_down(lambda: train(args, ctx), ctx, args.fsdp)


def run_then_shut_down(work, ctx, fsdp):
    """work()'s result, then the ranks' shutdown (icrl.py and eval.py). A UsageError is one line (status 2).
    Any other error under torchrun prints its traceback and ends this process at once: another rank may
    wait in a collective, so a shutdown barrier would hang and hide the error (torchrun then stops the
    other ranks)."""
    try:
        result = work()
    except UsageError as e:
        usage_exit(e)
    except StoppedAndSaved as e:   # every rank has the same line: the first rank says it
        if first_rank():
            tqdm.write(f"error: {one_line(e, limit=2000)}", file=sys.stderr)
            sys.stderr.flush()
        shutdown(ctx, fsdp, status=1)
        raise SystemExit(1) from None
    except BaseException:
        if ctx.world > 1:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    shutdown(ctx, fsdp)
    return result


def usage_exit(error, say=True):
    if say:
        print(f"error: {one_line(error, limit=2000)}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def shutdown(ctx, fsdp, status=0):
    """The ranks end together; `status` is the exit status where the process must end here (FSDP2 on CPU)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    if fsdp and ctx.device.type == "cpu":
        # FSDP2 over gloo aborts in a C++ destructor at interpreter exit after a backward pass (seen in
        # about 1 run in 4 with torch 2.13). Everything is written by now, so skip the destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    main()
