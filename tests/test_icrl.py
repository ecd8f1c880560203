"""icrl.py beyond the equations: the built batch, masks, distributed gradients, NaN safety, resume."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import icrl
from data import Environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    from data import build_char_tokenizer
    path = str(tmp_path_factory.mktemp("tok"))
    build_char_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def tiny_model(vocab_size, seed=0):
    from model import Qwen3, Qwen3Config
    torch.manual_seed(seed)
    return Qwen3(Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True))


class ScriptedSampler:
    """Stands in for model.generate: solver turns answer from `answers[(round, chain)]`, critics write
    `Wrong, it is 5.`; each reply ends with <|im_end|>. Records every prompt it was given."""

    def __init__(self, tokenizer, answers, critic_replies=None):
        self.tok, self.answers, self.calls = tokenizer, answers, []
        self.critic_replies = critic_replies or {}   # call number -> the critic's reply in that call
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, model, prompts, max_new_tokens, **kwargs):
        from model import Generation
        texts = [self.tok.decode(p) for p in prompts]
        self.calls.append(texts)
        out = []
        for i, text in enumerate(texts):
            if "Critique the attempt" in text:
                reply = self.critic_replies.get(len(self.calls), "Wrong, it is 5.")
            else:
                round_ = 1 + text.count("Tips from the previous critique")
                chain = self.retry_chains[i] if round_ > 1 else i
                reply = self.answers[(len(self.calls), chain)]
            ids = self.tok.encode(reply, add_special_tokens=False) + [self.im_end]
            out.append(Generation(ids, [-0.25] * len(ids), True))
        return out


def scripted_rollout(monkeypatch, tokenizer, answers, retry_chains, rounds, gate, G=3, critic_replies=None):
    from data import load_task
    task = load_task("arithmetic", n=1)
    example = task.examples[0]
    example = type(example)("arithmetic:2+3", "2+3", "5")
    script = ScriptedSampler(tokenizer, answers, critic_replies)
    script.retry_chains = retry_chains
    monkeypatch.setattr(icrl, "generate", script)
    cfg = icrl.SamplingConfig(group_size=G, rounds=rounds, critic_gate=gate)
    rollouts, _ = icrl.rollout(tiny_model(len(tokenizer)), tokenizer, task, [example], cfg, seed=0)
    return rollouts[0], script


# Sampling calls in order: 1 solve, 2 critique round 1, 3 retry round 2, 4 critique round 2, 5 retry round 3.
K3_ANSWERS = {(1, 0): "\\boxed{5}", (1, 1): "\\boxed{4}", (1, 2): "\\boxed{4}",   # chain 0 succeeds at once
              (3, 1): "\\boxed{6}", (3, 2): "\\boxed{5}",                         # chain 2 fixed in round 2
              (5, 1): "\\boxed{5}"}                                               # chain 1 fixed in round 3


def test_failure_gate_and_three_rounds(monkeypatch, char_tokenizer):
    """SPEC §2.1-2.4 with K = 3: a success is never critiqued; a failure is critiqued and retried until it
    succeeds or K episodes; each phase is one batched sampling call over the active chains."""
    ro, script = scripted_rollout(monkeypatch, char_tokenizer, K3_ANSWERS, retry_chains=[1, 2], rounds=3,
                                  gate="failure")
    # retry_chains maps row -> chain in each retry call: call 3 has chains [1, 2]; call 5 has chain [1] only
    assert [[ep.reward for ep in c.episodes] for c in ro.chains] == [[1.0], [0.0, 0.0, 1.0], [0.0, 1.0]]
    assert [len(c.critiques) for c in ro.chains] == [0, 2, 1]
    assert [len(call) for call in script.calls] == [3, 2, 2, 1, 1]
    # the critic read the failed episode's summary, its reward included (SPEC §1)
    assert "Reward of the attempt: 0\nAction: \\boxed{4}" in script.calls[1][0]
    assert "Reward of the attempt: 0\nAction: \\boxed{6}" in script.calls[3][0]
    # the retry sees the tips, never the failed attempt
    retry_prompt = script.calls[2][0]
    assert "Tips from the previous critique: Wrong, it is 5." in retry_prompt and "\\boxed{4}" not in retry_prompt
    chain = ro.chains[1]
    assert chain.critiques[0].text == "Wrong, it is 5."
    assert chain.free_contexts[0] == chain.free_contexts[1] == chain.free_contexts[2] == chain.episodes[0].context

    # SPEC §2.5-2.6 on this batch. Solver group: every episode {1 | 0, 0, 1 | 0, 1}: mean 1/2,
    # Bessel var = 6 * 1/4 / 5 = 0.3. Critic group: g = {0 (0 -> 0), 1 (retry wins), 1}: mean 2/3, var 1/3.
    samples = icrl.build_samples([ro])[0]
    solver = [s for s in samples if not s.is_critic]
    critics = [s for s in samples if s.is_critic]
    a = 0.5 / (0.3 ** 0.5 + 1e-6)
    assert [s.adv for s in solver] == pytest.approx([a, -a, -a, a, -a, a], abs=1e-5)
    b = 1 / (3 ** 0.5)
    assert [s.adv for s in critics] == pytest.approx([(-2 / 3) / (b + 1e-6), (1 / 3) / (b + 1e-6), (1 / 3) / (b + 1e-6)], abs=1e-5)
    # §2.8 table: retries are trained under S(x) (critique removed) with l_cond taken under S(x, c)
    first, retries = solver[0], [s for s in solver if s.calib_context is not None]
    assert len(retries) == 3 and all(s.context == first.context for s in solver)
    assert all("Tips from the previous critique" in char_tokenizer.decode(s.calib_context) for s in retries)
    assert [s.response for s in retries] == [ep.tokens for c in ro.chains for ep in c.episodes[1:]]
    assert [s.context for s in critics] == [c.context for ch in ro.chains for c in ch.critiques]
    assert all("Critique the attempt" in char_tokenizer.decode(s.context) for s in critics)
    # pooled (ablation): one group over the 6 rewards and 3 gains {1,0,0,1,0,1, 0,1,1}: mean 5/9
    pooled = icrl.build_samples([ro], adv_mode="pooled")[0]
    values = [1, 0, 0, 1, 0, 1, 0, 1, 1]
    std = (sum((v - 5 / 9) ** 2 for v in values) / 8) ** 0.5
    assert std == pytest.approx(0.527046, abs=1e-6)
    # in sample order: chain 0 (1); chain 1 episodes (0, 0, 1), critiques (0, 1); chain 2 (0, 1), critique (1)
    assert [s.adv for s in pooled] == pytest.approx([(v - 5 / 9) / (std + 1e-6) for v in values], abs=1e-5)
    frozen = icrl.build_samples([ro], train_critic=False)[0]
    assert [s.adv for s in frozen] == [s.adv for s in solver] and not any(s.is_critic for s in frozen)


def test_always_gate_critiques_successes(monkeypatch, char_tokenizer):
    answers = {(1, 0): "\\boxed{5}", (1, 1): "\\boxed{4}", (1, 2): "\\boxed{5}",
               (3, 0): "\\boxed{3}", (3, 1): "\\boxed{5}", (3, 2): "\\boxed{5}"}
    ro, script = scripted_rollout(monkeypatch, char_tokenizer, answers, retry_chains=[0, 1, 2], rounds=2,
                                  gate="always")
    assert [len(c.critiques) for c in ro.chains] == [1, 1, 1]
    assert "Reward of the attempt: 1\nAction: \\boxed{5}" in script.calls[1][0]
    # a broken success costs the critic: g = 0 - 1 = -1; the fixed one earns 1; the kept success 1
    assert [icrl.chain_values(c)[1] for c in ro.chains] == [[-1.0], [1.0], [1.0]]
    # with the failure gate and K = 2, only chain 1 is critiqued
    ro, _ = scripted_rollout(monkeypatch, char_tokenizer, answers, retry_chains=[1], rounds=2, gate="failure")
    assert [len(c.critiques) for c in ro.chains] == [0, 1, 0]


def test_each_retry_reads_the_latest_critique(monkeypatch, char_tokenizer):
    """SPEC §2.3-2.4: tau_{k+1} ~ pi(. | S(x, c_k)): the round-3 retry reads c_2, the critique of the failed
    round-2 retry, not c_1. K3_ANSWERS (chain 1 fails twice), the critic writing "Tip one." in call 2 (round 1)
    and "Tip two." in call 4 (round 2); the retry's l_cond context S(x, c) is the one it was sampled in."""
    ro, script = scripted_rollout(monkeypatch, char_tokenizer, K3_ANSWERS, retry_chains=[1, 2], rounds=3,
                                  gate="failure", critic_replies={2: "Tip one.", 4: "Tip two."})
    assert [c.text for c in ro.chains[1].critiques] == ["Tip one.", "Tip two."]
    round3 = script.calls[4][0]   # call 5: chain 1's round-3 retry
    assert "Tips from the previous critique: Tip two." in round3 and "Tip one." not in round3
    retries = [s for s in icrl.build_samples([ro])[0] if s.calib_context is not None]
    tips = [char_tokenizer.decode(s.calib_context) for s in retries]   # chain 1 rounds 2 and 3, chain 2 round 2
    assert ["Tip one." in t for t in tips] == [True, False, True] and ["Tip two." in t for t in tips] == [False, True, False]


def chain_of(rewards):
    """A chain whose episodes have these rewards, a critique between each two (SPEC §2.1-2.4)."""
    return icrl.Chain([icrl.Episode([1], reward=r, tokens=[5], mask=[1], sampler_logprobs=[0.0]) for r in rewards],
                      [icrl.Critique([2], [6], [0.0], True, "tip") for _ in rewards[1:]], [[1]] * len(rewards))


def test_critic_reward_compares_a_retry_with_the_episode_critiqued():
    """SPEC §2.5: g_k = 1 if r_{k+1} = 1, else r_{k+1} - r_k, r_k the reward of the episode c_k read (the one
    just before the retry), not the first attempt's. With 0/1 rewards and the failure gate r_k is always 0, so
    only partial rewards (multi-turn) and K = 3 tell them apart:
    [0, 0.5, 0.75] -> [0.5 - 0, 0.75 - 0.5] = [0.5, 0.25]; [0.5, 0.25, 1] -> [0.25 - 0.5, 1] = [-0.25, 1];
    [1, 0.5, 0.25] (--critic_gate always) -> [-0.5, -0.25]; mean critic reward (SPEC §3) 0.75 / 6 = 0.125."""
    chains = [chain_of([0.0, 0.5, 0.75]), chain_of([0.5, 0.25, 1.0]), chain_of([1.0, 0.5, 0.25])]
    assert [icrl.chain_values(c)[1] for c in chains] == [[0.5, 0.25], [-0.25, 1.0], [-0.5, -0.25]]
    sums = icrl.rollout_sums([icrl.QueryRollout("x", chains)], rounds=3)
    assert sums["critic_reward"] / sums["critiques"] == pytest.approx(0.125)


def test_advantage_groups_are_per_query():
    """SPEC §2.6: two groups per query x, its solver group and its critic group; no group spans two queries.
    Query 0: chains [0 -> 1], [1]; query 1: chains [0 -> 1], [0 -> 0].
    q0 solver {0, 1, 1}: mean 2/3, Bessel var (4/9 + 1/9 + 1/9) / 2 = 1/3: A = -1.1547, 0.57735, 0.57735.
    q0 critic {g = 1}: a group of one: A = 0 (pooled with q1's gains {1, 1, 0} it would not be).
    q1 solver {0, 1, 0, 0}: mean 1/4, var (3/16 + 9/16) / 3 = 1/4, std 1/2: A = -0.5, 1.5, -0.5, -0.5.
    q1 critic {1, 0}: mean 1/2, var 1/2: A = +/-0.5 / sqrt(1/2) = +/-0.70711.
    Sample order: per chain its episodes, then its critiques."""
    rollouts = [icrl.QueryRollout("q0", [chain_of([0.0, 1.0]), chain_of([1.0])]),
                icrl.QueryRollout("q1", [chain_of([0.0, 1.0]), chain_of([0.0, 0.0])])]
    q0, q1 = icrl.build_samples(rollouts)
    s, e = math.sqrt(1 / 3), 1e-6
    assert [x.adv for x in q0] == pytest.approx([-2 / 3 / (s + e), 1 / 3 / (s + e), 0.0, 1 / 3 / (s + e)], abs=1e-6)
    c = 0.5 / (math.sqrt(0.5) + e)
    assert [x.adv for x in q1] == pytest.approx([-0.25 / (0.5 + e), 0.75 / (0.5 + e), c,
                                                 -0.25 / (0.5 + e), -0.25 / (0.5 + e), -c], abs=1e-6)
    assert [x.is_critic for x in q1] == [False, False, True, False, False, True]
    assert (-2 / 3 / s, c) == pytest.approx((-1.1547, 0.70711), abs=1e-5)


def test_step_reports_by_hand():
    """SPEC §3 on a K = 3 batch of four chains with rewards [1], [0, 0, 1], [0, 1], [0, 0, 0]:
    critique-free accuracy (mean r_1) 1/4; share critiqued 3/4; retries 0, 1 | 1 | 0, 0: retry success 2/5,
    per round r2 1/3 (chains 2-4) and r3 1/2 (chains 2, 4); accuracy after the last round (1 + 1 + 1 + 0) / 4;
    critic rewards g = 0, 1 | 1 | 0, 0: mean 2/5; one token per critique."""
    rollouts = [icrl.QueryRollout("x", [chain_of([1.0]), chain_of([0.0, 0.0, 1.0]), chain_of([0.0, 1.0]),
                                        chain_of([0.0, 0.0, 0.0])])]
    args = icrl.parse_args(["--rounds", "3"])
    stats = dict(loss_solver=0.0, loss_critic=0.0, clipped=0.0, tokens=1.0, grad_norm=0.0, updates=1, skipped=0,
                 critic_updates=1)
    m = icrl.step_metrics(rollouts, [], stats, {"sample": 1.0, "env": 0.0, "train": 1.0}, args, icrl.Dist())
    assert (m["acc"], m["critiqued_frac"], m["retry_acc"], m["retry_acc_r2"], m["retry_acc_r3"], m["final_acc"],
            m["critic_reward"], m["len_critic"]) == pytest.approx((1 / 4, 3 / 4, 2 / 5, 1 / 3, 1 / 2, 3 / 4, 2 / 5, 1.0))


def test_calibration_and_logprob_gap_figures_by_hand():
    """SPEC §3 from the built samples: the §2.7 weights over retry action tokens (observations left out) are
    min(exp(l_free - l_cond), 2) = 0.25, 2 (clipped from 4) and 1: mean 3.25 / 3, 10th percentile 0.25 + 0.2 *
    (1 - 0.25) = 0.4, share below 0.5 1/3. logprob_gap: the largest |sampler - trainer| on trained tokens, a retry's
    against l_cond (it was sampled under S(x, c)): 0.1 on the first attempt, 0.3 on a retry; the masked 4 is no
    trained token."""
    first = icrl.TrainSample([1], [5, 6], False, 0.5, sampler_logprobs=[-1.1, -2.0])
    first.old_logp = torch.tensor([-1.0, -2.0])
    a = icrl.TrainSample([1], [5, 6, 7], False, 0.5, mask=[1, 1, 0], calib_context=[1, 9],
                         sampler_logprobs=[-1.0, -1.3, -9.0])
    a.cond_logp = torch.tensor([-1.0, -1.0, -5.0])
    a.old_logp = a.cond_logp + torch.tensor([math.log(0.25), math.log(4.0), 0.0])
    b = icrl.TrainSample([1], [8], False, -0.5, calib_context=[1, 9], sampler_logprobs=[-0.5])
    b.cond_logp = b.old_logp = torch.tensor([-0.5])
    rollouts = [icrl.QueryRollout("x", [chain_of([0.0, 1.0])])]
    stats = dict(loss_solver=0.0, loss_critic=0.0, clipped=1.0, tokens=4.0, grad_norm=0.0, updates=1, skipped=0,
                 critic_updates=0)
    m = icrl.step_metrics(rollouts, [first, a, b], stats, {"sample": 1.0, "env": 0.0, "train": 1.0},
                          icrl.parse_args([]), icrl.Dist())
    assert (m["calib_w_mean"], m["calib_w_p10"], m["calib_w_low_frac"], m["logprob_gap"], m["clip_frac"]) == \
        pytest.approx((3.25 / 3, 0.4, 1 / 3, 0.3, 1 / 4), abs=1e-6)
    # a NaN among the trainer's log-probs (a first attempt's l_old, from the no-grad pass where the update left
    # the sample out for its A = 0) is not dropped by the max: the figure says something is wrong
    first.old_logp = torch.tensor([float("nan"), -2.0])
    m = icrl.step_metrics(rollouts, [a, first, b], stats, {"sample": 1.0, "env": 0.0, "train": 1.0},
                          icrl.parse_args([]), icrl.Dist())
    assert math.isnan(m["logprob_gap"])


def test_tenth_percentile_of_any_number_of_weights():
    """calib_w_p10 (SPEC §3) is torch.quantile's linear interpolation, also past the 2^24 values torch.quantile
    refuses (a large batch of long retries)."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        w = torch.rand(n, generator=gen)
        assert icrl.quantile(w, 0.1) == torch.quantile(w, 0.1)
    for q in (0.0, 0.1, 1.0):
        assert icrl.quantile(w, q) == torch.quantile(w, q)
    n = 2 ** 24 + 1
    assert float(icrl.quantile(torch.arange(n, dtype=torch.float32).flip(0) / (n - 1), 0.1)) == pytest.approx(0.1, abs=1e-6)
    n = 2 ** 25   # the rank (n - 1) * q, in float32, rounds past the last index
    assert float(icrl.quantile(torch.ones(n), 1.0)) == 1.0
    assert icrl.quantile(torch.tensor([0.5, float("nan"), 1.0]), 0.1).isnan()   # as torch.quantile: NaN in, NaN out


def test_sampling_config_takes_the_episode_flags():
    """The training rollout's SamplingConfig carries SPEC §1-2's episode and chain flags (K, the gate, the
    limits), as eval.py's does (test_eval.test_round_and_episode_flags)."""
    args = icrl.parse_args(["--group_size", "3", "--rounds", "4", "--critic_gate", "always", "--max_turns", "5",
                            "--max_context", "900", "--obs_chars", "50", "--rollout_batch", "12",
                            "--max_new_tokens", "7", "--critic_max_new_tokens", "9", "--temperature", "0.7",
                            "--top_p", "0.9", "--enable_thinking"])
    cfg = icrl.sampling_config(args)
    assert (cfg.group_size, cfg.rounds, cfg.critic_gate, cfg.max_turns, cfg.max_context, cfg.obs_chars,
            cfg.max_batch, cfg.max_new_tokens, cfg.critic_max_new_tokens, cfg.temperature, cfg.top_p,
            cfg.enable_thinking) == (3, 4, "always", 5, 900, 50, 12, 7, 9, 0.7, 0.9, True)


def test_retry_trained_under_solver_context_with_calibration_weights(monkeypatch, char_tokenizer):
    """A retry's l_old is l_free (under S(x)), its weights min(exp(l_free - l_cond), W) with l_cond under
    S(x, c); a first attempt and a critique have weight 1 on every token."""
    ro, _ = scripted_rollout(monkeypatch, char_tokenizer, K3_ANSWERS, retry_chains=[1, 2], rounds=2, gate="failure")
    model = tiny_model(len(char_tokenizer), seed=1)
    samples = icrl.build_samples([ro])[0]
    args = icrl.parse_args(["--temperature", "0.8"])
    icrl.old_logprobs(model, samples, args, icrl.Dist())
    retry = next(s for s in samples if s.calib_context is not None)
    free, _ = icrl.response_logprobs(model, [retry.context], [retry.response], 0.8, "cpu")
    cond, _ = icrl.response_logprobs(model, [retry.calib_context], [retry.response], 0.8, "cpu")
    torch.testing.assert_close(retry.old_logp, free[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(retry.cond_logp, cond[0], rtol=0, atol=1e-6)
    assert not torch.equal(free, cond)  # the critique changes the context
    T = len(retry.response)
    w = icrl.sample_weights([retry], T, args)[0]
    torch.testing.assert_close(w, (free[0] - cond[0]).exp().clamp(max=2.0), rtol=0, atol=1e-6)
    for s in samples:
        if s.calib_context is None:
            assert icrl.sample_weights([s], len(s.response), args)[0].tolist() == [1.0] * len(s.response)


def test_one_update_per_step_takes_old_logprobs_from_its_own_forward(monkeypatch, char_tokenizer):
    """With one optimizer step per training step (--ppo_epochs 1, one minibatch) the update's own forward is
    pi_old's, so the separate l_old pass is skipped: the same weights after the update as with it (rho = 1
    either way), and the same l_old and l_free left on the samples for the step's metrics."""
    ro, _ = scripted_rollout(monkeypatch, char_tokenizer, K3_ANSWERS, retry_chains=[1, 2], rounds=2, gate="failure")
    args = icrl.parse_args(["--temperature", "0.8", "--micro_batch", "2", "--lr", "1e-2", "--lr_warmup", "1"])
    assert icrl.one_update_per_step(args)
    assert not icrl.one_update_per_step(icrl.parse_args(["--ppo_epochs", "2"]))
    assert not icrl.one_update_per_step(icrl.parse_args(["--batch_prompts", "16", "--minibatch", "8"]))
    results = []
    for separate in (True, False):
        model = tiny_model(len(char_tokenizer), seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        samples = icrl.build_samples([ro])[0]
        icrl.old_logprobs(model, samples, args, icrl.Dist(), l_old_of=None if separate else [])
        assert all((s.old_logp is not None) == separate for s in samples)
        assert all(s.cond_logp is not None for s in samples if s.calib_context is not None)
        stats = icrl.update(model, optimizer, [samples], args, icrl.Dist(), step=0)
        assert stats["updates"] == 1 and stats["clipped"] == 0
        results.append((model.state_dict(), [s.old_logp for s in samples], stats["loss_solver"]))
    (a, old_a, loss_a), (b, old_b, loss_b) = results
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
    for x, y in zip(old_a, old_b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert abs(loss_a - loss_b) < 1e-6
    assert max(float((v - tiny_model(len(char_tokenizer), seed=1).state_dict()[k]).abs().max())
               for k, v in a.items()) > 1e-3  # the update moved the weights (10^4 x the tolerance)


def test_loss_table_by_hand():
    """SPEC §2.8 for one query: first attempt (A = 1, w = 1), retry (A = -1, w from §2.7), critique
    (A = 0.5, w = 1), one token each at rho = 1.1 (first), 0.7 (retry), 1.5 (critique).
    first: -1 * min(1.1, 1.1) = -1.1; retry: w = min(e^(ln 3), 2) = 2, -2 * min(-0.7, -0.8) = 1.6;
    critique: -min(0.75, 1.28 * 0.5 = 0.64) = -0.64. L = (-1.1 + 1.6) / 2 + 1 * (-0.64) / 1 = -0.39."""
    args = icrl.parse_args([])
    first = icrl.TrainSample([1], [5], False, 1.0)
    retry = icrl.TrainSample([1], [6], False, -1.0, None, [2])
    critique = icrl.TrainSample([3], [7], True, 0.5)
    first.old_logp, retry.old_logp, critique.old_logp = (torch.tensor([-1.0]),) * 3
    retry.cond_logp = torch.tensor([-1.0 - math.log(3)])   # l_free - l_cond = ln 3
    micro = [first, retry, critique]
    weight = icrl.sample_weights(micro, 1, args)
    assert weight.flatten().tolist() == pytest.approx([1.0, 2.0, 1.0])
    old = icrl.pad_rows([s.old_logp for s in micro], 1)
    logp = old + torch.log(torch.tensor([[1.1], [0.7], [1.5]]))
    token_loss = icrl.clipped_token_loss(logp, old, torch.tensor([1.0, -1.0, 0.5]), weight, torch.ones(3, 1))
    assert token_loss.flatten().tolist() == pytest.approx([-1.1, 1.6, -0.64], abs=1e-6)
    loss = icrl.rolewise_token_mean(token_loss, torch.ones(3, 1), torch.tensor([False, False, True]), 2, 1)
    assert float(loss) == pytest.approx(-0.39, abs=1e-6)


def rho_batch(model, rhos=(1.1, 0.7, 1.5)):
    """test_loss_table_by_hand's three one-token samples for `update`: l_old set under `model` so that rho =
    1.1 (first attempt, A = 1), 0.7 (retry, A = -1, l_free - l_cond = ln 3) and 1.5 (critique, A = 0.5)."""
    first = icrl.TrainSample([1, 2], [5], False, 1.0)
    retry = icrl.TrainSample([1, 2], [6], False, -1.0, None, [1, 9, 2])
    critique = icrl.TrainSample([3, 4], [7], True, 0.5)
    for sample, rho in zip((first, retry, critique), rhos):
        with torch.no_grad():   # l_old is a constant of the loss, as old_logprobs computes it
            logp, _ = icrl.response_logprobs(model, [sample.context], [sample.response], 1.0, "cpu")
        sample.old_logp = logp[0] - math.log(rho)
    retry.cond_logp = retry.old_logp - math.log(3)
    return [first, retry, critique]


@pytest.mark.parametrize("flags, loss_solver, loss_critic", [
    ([], (-1.1 + 1.6) / 2, -0.64),                        # test_loss_table_by_hand: w = min(3, W = 2) = 2
    (["--calib", "none"], (-1.1 + 0.8) / 2, -0.64),       # w = 1: retry -1 * min(-0.7, -0.8) = 0.8
    (["--calib_clip", "1.5"], (-1.1 + 1.2) / 2, -0.64),   # w = min(3, 1.5): 1.5 * 0.8
    # clip to [0.6, 1.1]: first -min(1.1, 1.1) = -1.1; retry -2 * min(-0.7, -0.7) = 1.4; critique -min(0.75, 0.55)
    (["--clip_low", "0.4", "--clip_high", "0.1"], (-1.1 + 1.4) / 2, -0.55),
], ids=["defaults", "calib-none", "calib_clip", "clip-bounds"])
def test_update_takes_the_loss_flags(flags, loss_solver, loss_critic):
    """SPEC §2.7-2.8 through `update` and the command line: --calib, --calib_clip, --clip_low and --clip_high
    reach the loss (the ablation --calib none included). The per-role losses update reports are the role-wise
    token means, here of one token per sample: solver (first + retry) / 2, critic / 1."""
    model = tiny_model(40)
    args = icrl.parse_args(["--batch_prompts", "1", "--lr", "1e-9"] + flags)
    stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=1e-9), [rho_batch(model)], args, icrl.Dist(), 0)
    assert (stats["loss_solver"], stats["loss_critic"]) == pytest.approx((loss_solver, loss_critic), abs=1e-5)


def positions_with_gradient(monkeypatch):
    """A list that grows by the positions (context + response) of every sample icrl.response_logprobs runs
    with autograd on: the update's passes, not the no-grad l_old and l_cond ones."""
    seen, real = [], icrl.response_logprobs

    def counted(model, contexts, responses, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.extend(len(c) + len(r) for c, r in zip(contexts, responses))
        return real(model, contexts, responses, *args, **kwargs)
    monkeypatch.setattr(icrl, "response_logprobs", counted)
    return seen


def test_samples_of_zero_advantage_run_no_pass_but_count_in_the_means(monkeypatch):
    """SPEC §2.8 with A = 0: loss_t = -w * min(rho * 0, clip(rho) * 0) = 0 on every token, and so is its gradient;
    the update runs only the samples with A != 0, while the role-wise means still count every trained token.
    rho_batch (one token each: first A = 1 at rho 1.1, retry A = -1 with w = 2 at rho 0.7, critique A = 0.5 at
    rho 1.5) plus a first attempt of A = 0 with 3 tokens and a critique of A = 0 with 2:
      loss_solver = (-1.1 + 1.6) / (2 + 3) = 0.1, loss_critic = -0.64 / (1 + 2) = -0.21333;
      clip_frac's denominator: 1 + 1 + 1 + 3 + 2 = 8 tokens.
    The passes with a gradient hold the three samples of A != 0 (3 positions each) and nothing else. Under plain
    SGD the step moves the weights by -lr * (2/5 g_solver + 1/3 g_critic), with g the gradients of the three alone
    (denominators 2 and 1): the move of those three alone at lr * 2/5 with --critic_coef (1/3) / (2/5) = 5/6."""
    def move(batch, lr, coef):
        model = tiny_model(40)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        args = icrl.parse_args(["--batch_prompts", "1", "--lr", str(lr), "--lr_warmup", "1", "--grad_clip", "1e9",
                                "--critic_coef", str(coef)])
        samples = rho_batch(model) + batch()
        stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=lr), [samples], args, icrl.Dist(), 0)
        return stats, torch.cat([(v - start[k]).flatten() for k, v in model.state_dict().items()])
    zeros = lambda: [icrl.TrainSample([1, 2], [5, 6, 7], False, 0.0, old_logp=torch.zeros(3)),
                     icrl.TrainSample([3, 4, 9], [7, 8], True, 0.0, old_logp=torch.zeros(2))]
    seen = positions_with_gradient(monkeypatch)
    stats, moved = move(zeros, 0.1, 1.0)
    assert seen == [3, 3, 3]
    assert (stats["loss_solver"], stats["loss_critic"]) == pytest.approx((0.1, -0.64 / 3), abs=1e-5)
    assert stats["tokens"] == 8 and stats["updates"] == 1
    _, alone = move(lambda: [], 0.1 * 2 / 5, 5 / 6)
    assert moved.abs().max() > 1e-3
    torch.testing.assert_close(moved, alone, rtol=0, atol=1e-6)


def test_an_update_of_zero_advantages_steps_the_optimizer_on_zero_gradients(monkeypatch):
    """Every sample of A = 0: no sample runs (one padding token does: DDP and FSDP2 need a backward on every
    rank), and the optimizer steps on gradients of exactly zero, as it did when those samples ran: AdamW's
    moments from an earlier step still move the weights. Reference: the same AdamW state stepped by hand on
    zero gradients."""
    model = tiny_model(40)
    args = icrl.parse_args(["--batch_prompts", "1", "--lr", "0.01", "--lr_warmup", "1"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    icrl.update(model, optimizer, [rho_batch(model, (1, 1, 1))], args, icrl.Dist(), 0)   # moments to carry
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # not shared: load_state_dict keeps the tensors
    seen = positions_with_gradient(monkeypatch)
    zeros = [icrl.TrainSample([1, 2], [5, 6], False, 0.0, old_logp=torch.zeros(2)),
             icrl.TrainSample([3], [7], True, 0.0, old_logp=torch.zeros(1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = icrl.update(model, optimizer, [zeros], args, icrl.Dist(), 1)
    assert seen == [2]   # the padding sample: one context token, one response token
    assert stats["updates"] == 1 and stats["tokens"] == 3 and stats["loss_solver"] == 0.0 and stats["grad_norm"] == 0.0
    for p in reference.parameters():
        p.grad = torch.zeros_like(p)
    reference_optimizer.step()
    after, expected = model.state_dict(), reference.state_dict()
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-4   # the moments moved them
    for k in after:
        torch.testing.assert_close(after[k], expected[k], rtol=0, atol=0, msg=k)


def test_loss_critic_is_null_when_no_critique_was_trained():
    """No critic token in the updates taken (every chain succeeded, or --no_critic_train): loss_critic is null,
    as len_critic and critic_reward are, not a 0 that reads as a loss."""
    model = tiny_model(40)
    args = icrl.parse_args(["--batch_prompts", "1", "--lr", "1e-9"])
    first, retry, _ = rho_batch(model)
    stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=1e-9), [[first, retry]], args, icrl.Dist(), 0)
    assert stats["critic_updates"] == 0 and stats["loss_solver"] == pytest.approx((-1.1 + 1.6) / 2, abs=1e-5)
    rollouts = [icrl.QueryRollout("x", [chain_of([1.0]), chain_of([1.0])])]
    m = icrl.step_metrics(rollouts, [], stats, {"sample": 1.0, "env": 0.0, "train": 1.0}, args, icrl.Dist())
    assert m["loss_critic"] is None and m["loss_solver"] == pytest.approx(0.25, abs=1e-5)


def test_critic_coef_scales_the_critic_term_of_the_update():
    """SPEC §2.8: L = L_solver + lambda_c * L_critic (--critic_coef). Under plain SGD (no gradient clip) a step moves
    the weights by -lr * (g_solver + lambda_c * g_critic): linear in lambda_c, so the moves at lambda_c = 0, 1, 2
    are evenly spaced, and lambda_c = 0 moves them as the batch without its critique does. rho = 1 on every
    token, so no term is clipped (a clipped token has no gradient)."""
    def move(coef, batch=slice(None)):
        model = tiny_model(40)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        args = icrl.parse_args(["--batch_prompts", "1", "--lr", "0.1", "--lr_warmup", "1", "--grad_clip", "1e9",
                                "--critic_coef", str(coef)])
        stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=0.1), [rho_batch(model, (1, 1, 1))[batch]], args,
                            icrl.Dist(), 0)
        assert stats["updates"] == 1
        return torch.cat([(v - start[k]).flatten() for k, v in model.state_dict().items()])
    d0, d1, d2 = move(0.0), move(1.0), move(2.0)
    assert (d1 - d0).abs().max() > 1e-2                     # the critique moves the weights (~0.1)
    torch.testing.assert_close(d2 - d1, d1 - d0, rtol=0, atol=1e-6)
    torch.testing.assert_close(d0, move(1.0, slice(0, 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags", [[], ["--adv", "pooled"], ["--no_critic_train"]], ids=["rolewise", "pooled", "frozen"])
def test_train_step_takes_the_advantage_and_critic_flags(monkeypatch, char_tokenizer, flags):
    """SPEC §2.6 and its ablations through a training step: --adv pooled and --no_critic_train reach the trained
    batch. K3_ANSWERS with K = 2, G = 3 on 2+3: chains [1], [0, 0] (g = 0), [0, 1] (g = 1).
    rolewise: solver {1, 0, 0, 0, 1}: mean 0.4, Bessel var (2 * 0.36 + 3 * 0.16) / 4 = 0.3, A = 0.6 or -0.4 over
      (sqrt(0.3) + eps); critic {0, 1}: A = -/+0.5 / (sqrt(0.5) + eps).
    pooled: {1, 0, 0, 0, 0, 1, 1} (solver and critic values): mean 3/7, var (3 * 16/49 + 4 * 9/49) / 6 = 2/7,
      A = 4/7 or -3/7 over (sqrt(2/7) + eps).
    frozen (--no_critic_train): rolewise advantages, no critique trained.
    Sample order: per chain its episodes, then its critiques."""
    from data import Example, load_task
    script = ScriptedSampler(char_tokenizer, K3_ANSWERS)
    script.retry_chains = [1, 2]
    monkeypatch.setattr(icrl, "generate", script)
    built, real_build = [], icrl.build_samples
    monkeypatch.setattr(icrl, "build_samples", lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1])
    task = load_task("arithmetic", n=1)
    task.examples = [Example("arithmetic:2+3", "2+3", "5")]
    args = icrl.parse_args(["--batch_prompts", "1", "--group_size", "3", "--rounds", "2"] + flags)
    args.max_turns = 1   # train() sets the task's own
    model = tiny_model(len(char_tokenizer))
    icrl.train_step(model, torch.optim.AdamW(model.parameters()), char_tokenizer, task, icrl.sampling_config(args),
                    args, icrl.Dist(), step=0)
    (samples,) = built[0]
    e = 1e-6
    if flags == ["--adv", "pooled"]:
        hi, lo = 4 / 7 / (math.sqrt(2 / 7) + e), -3 / 7 / (math.sqrt(2 / 7) + e)
        expected = [hi, lo, lo, lo, lo, hi, hi]
    else:
        hi, lo, c = 0.6 / (math.sqrt(0.3) + e), -0.4 / (math.sqrt(0.3) + e), 0.5 / (math.sqrt(0.5) + e)
        expected = [hi, lo, lo, -c, lo, hi, c]
    is_critic = [False, False, False, True, False, False, True]
    if flags == ["--no_critic_train"]:
        expected, is_critic = [a for a, k in zip(expected, is_critic) if not k], [False] * 5
    assert [s.is_critic for s in samples] == is_critic
    assert [s.adv for s in samples] == pytest.approx(expected, abs=1e-6)


def test_masks_come_from_lengths_when_pad_equals_eos():
    eos = 0  # the pad id used by pad_batch
    ids, targets, mask, positions = icrl.pad_batch([[5, 6], [7]], [[8, eos], [9, 9, eos]], "cpu")
    assert ids.tolist() == [[5, 6, 8, 0], [7, 9, 9, 0]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]  # the EOS inside a response counts, the pad does not
    assert targets.tolist() == [[8, eos, 0], [9, 9, eos]]
    assert positions.tolist() == [[1, 2, 3], [0, 1, 2]]  # logits that predict each response token


def test_response_logprobs_match_a_plain_forward():
    from model import Qwen3, Qwen3Config
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True))
    contexts, responses = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    logp, mask = icrl.response_logprobs(model, contexts, responses, 0.7, "cpu")
    for b in range(2):
        seq = torch.tensor([contexts[b] + responses[b]])
        full = torch.log_softmax(model(seq)[0].float() / 0.7, -1)
        for t, tok in enumerate(responses[b]):
            assert logp[b, t].item() == pytest.approx(full[len(contexts[b]) - 1 + t, tok].item(), abs=1e-5)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def run_update(out, nproc=1, fsdp=False, zero_advantage=False):
    script = os.path.join(ROOT, "tests", "dist_update.py")
    cmd = [sys.executable, script, out] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd += (["--fsdp"] if fsdp else []) + (["--zero_advantage"] if zero_advantage else [])
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, timeout=240)
    return torch.load(out)


@pytest.mark.parametrize("zero_advantage", [False, True], ids=["", "rank1-all-A0"])
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_gradient_equals_one_process(tmp_path, fsdp, zero_advantage):
    """dist_update.py's global batch; with zero_advantage, samples of A = 0 in it, and none with a gradient on
    rank 1 (it runs a padding micro-batch, no hang, and the gradient is still the global one)."""
    from dist_update import CONFIG
    from model import Qwen3, Qwen3Config
    single = run_update(str(tmp_path / "one.pt"), zero_advantage=zero_advantage)
    double = run_update(str(tmp_path / "two.pt"), nproc=2, fsdp=fsdp, zero_advantage=zero_advantage)
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=2e-6, msg=name)
    torch.manual_seed(0)  # the update did something: the weights moved from their initial values
    init = Qwen3(Qwen3Config(**CONFIG)).state_dict()
    assert max(float((single[n] - init[n]).abs().max()) for n in single) > 2e-5  # 10x the tolerance above


def test_non_finite_loss_skips_the_update(capsys):
    from model import Qwen3, Qwen3Config
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True))
    args = icrl.parse_args(["--batch_prompts", "1", "--lr", "0.1"])
    ctx = icrl.Dist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = [icrl.TrainSample([1, 2], [3, 4], False, 1.0), icrl.TrainSample([1, 2], [5], False, float("nan"))]
    icrl.old_logprobs(model, samples, args, ctx)
    stats = icrl.update(model, optimizer, [samples], args, ctx, step=0)
    assert stats["skipped"] == 1 and stats["updates"] == 0
    assert "update skipped" in capsys.readouterr().out
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not optimizer.state  # AdamW moments untouched too
    samples[1].adv = -1.0  # the same batch with a finite advantage does update
    assert icrl.update(model, optimizer, [samples], args, ctx, step=0)["updates"] == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calib_logp_sampler_takes_l_cond_from_the_sampler(monkeypatch):
    """--calib_logp sampler (SPEC §2.7's note: the authors' way): a retry's l_cond is the sampler's log-probs of
    its tokens under S(x, c), and the trainer runs no forward under S(x, c); the weights follow by hand from
    l_free (the trainer's, under S(x)) and those numbers, W = 2."""
    model = tiny_model(40)
    args = icrl.parse_args(["--calib_logp", "sampler", "--batch_prompts", "1"])
    s_xc = [1, 9, 9, 2]
    retry = icrl.TrainSample([1, 2], [3, 4, 5], False, 1.0, mask=[1, 0, 1], calib_context=s_xc,
                             sampler_logprobs=[-0.5, 0.0, -9.0])
    first = icrl.TrainSample([1, 2], [6], False, -1.0, sampler_logprobs=[-1.0])
    seen, real = [], icrl.response_logprobs
    monkeypatch.setattr(icrl, "response_logprobs", lambda m, contexts, *a, **k: seen.extend(contexts) or
                        real(m, contexts, *a, **k))
    icrl.old_logprobs(model, [first, retry], args, icrl.Dist())
    assert seen and s_xc not in seen                      # l_old / l_free under S(x) only
    assert retry.cond_logp.tolist() == [-0.5, 0.0, -9.0]
    free = retry.old_logp.tolist()
    expected = [min(math.exp(free[0] + 0.5), 2.0), 0.0, min(math.exp(free[2] + 9.0), 2.0)]
    assert expected[2] == 2.0 and expected[0] < 2.0       # W binds on one token, not on the other
    torch.testing.assert_close(icrl.sample_weights([retry], 3, args)[0], torch.tensor(expected))
    seen.clear()
    icrl.old_logprobs(model, [first, retry], icrl.parse_args(["--batch_prompts", "1"]), icrl.Dist())
    assert s_xc in seen                                    # the default: the trainer's forward under S(x, c)
    seen.clear()
    none = icrl.parse_args(["--calib", "none", "--batch_prompts", "1"])
    icrl.old_logprobs(model, [first, retry], none, icrl.Dist())
    assert seen and s_xc not in seen                       # --calib none reads no l_cond: no forward for it
    assert icrl.sample_weights([retry], 3, none)[0].tolist() == [1.0, 0.0, 1.0]


def test_a_skipped_update_leaves_the_others_of_the_step_and_their_figures(capsys):
    """Two updates in a step (--minibatch 1 of 2 queries), the first with a non-finite advantage: it is skipped,
    the second is taken, and the step's loss and grad norm are the second's alone, not NaN."""
    import copy
    model = tiny_model(40)
    args = icrl.parse_args(["--batch_prompts", "2", "--minibatch", "1", "--lr", "0.1"])
    bad = [icrl.TrainSample([1, 2], [3, 4], False, float("nan"))]
    good = [icrl.TrainSample([1, 2], [3, 4], False, 1.0), icrl.TrainSample([1, 2], [5], False, -1.0)]
    alone = copy.deepcopy(model)
    icrl.old_logprobs(model, bad + good, args, icrl.Dist())
    stats = icrl.update(model, torch.optim.AdamW(model.parameters(), lr=0.1), [bad, good], args, icrl.Dist(), step=0)
    assert (stats["updates"], stats["skipped"]) == (1, 1) and "update skipped" in capsys.readouterr().out
    one = icrl.parse_args(["--batch_prompts", "1", "--lr", "0.1"])
    expected = icrl.update(alone, torch.optim.AdamW(alone.parameters(), lr=0.1), [good], one, icrl.Dist(), step=0)
    assert math.isfinite(stats["loss_solver"]) and stats["loss_solver"] == pytest.approx(expected["loss_solver"])
    assert stats["grad_norm"] == pytest.approx(expected["grad_norm"]) and stats["grad_norm"] > 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, alone.state_dict()[k], msg=k)


def test_non_finite_gradient_with_a_finite_loss_skips_the_update(capsys):
    """update's contract: a non-finite loss *or gradient* skips the update. Here the loss is finite and a
    hook makes the (tied) embedding's gradient infinite: no weight and no AdamW moment may change."""
    model = tiny_model(40)
    args = icrl.parse_args(["--batch_prompts", "1", "--lr", "0.1"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = [icrl.TrainSample([1, 2], [3, 4], False, 1.0), icrl.TrainSample([1, 2], [5], False, -1.0)]
    icrl.old_logprobs(model, samples, args, icrl.Dist())
    hook = model.model.embed_tokens.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    stats = icrl.update(model, optimizer, [samples], args, icrl.Dist(), step=0)
    hook.remove()
    assert stats["skipped"] == 1 and stats["updates"] == 0 and stats["loss_solver"] == 0.0  # no loss reported
    assert "update skipped" in capsys.readouterr().out
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not optimizer.state


def test_data_order_is_a_function_of_seed_and_step():
    """step_queries: a step's queries depend on (--seed, step) alone, so a resumed run, in a new process with
    another global RNG state, sees the queries the run straight through saw; each pass over the data is a
    permutation of it; --seed seeds the data order (README). 10 examples, 4 queries a step: steps 0-4 hold two
    passes of 10, each every example once. With 2 ranks, rank r takes the r-th half of the step's queries."""
    examples = list(range(10))
    args = icrl.parse_args(["--batch_prompts", "4"])
    torch.manual_seed(1)
    straight = [q for step in range(5) for q in icrl.step_queries(examples, step, args, icrl.Dist())]
    assert sorted(straight[:10]) == sorted(straight[10:]) == examples
    torch.manual_seed(2)   # a resumed process: another global RNG state; it goes on from step 3
    assert [q for step in (3, 4) for q in icrl.step_queries(examples, step, args, icrl.Dist())] == straight[12:]
    halves = [icrl.step_queries(examples, 1, args, icrl.Dist(rank=r, world=2)) for r in (0, 1)]
    assert halves == [straight[4:6], straight[6:8]]
    other_seed = icrl.parse_args(["--batch_prompts", "4", "--seed", "1"])
    assert [q for step in range(5) for q in icrl.step_queries(examples, step, other_seed, icrl.Dist())] != straight


def test_grpo_samples_no_critique(monkeypatch, char_tokenizer):
    """SPEC §2: --algo grpo is one round and no critique, whatever --rounds: a GRPO step whose first attempts
    all fail (what the failure gate would send to the critic) makes one sampling call, the G first attempts."""
    from data import load_task
    from model import Generation
    im_end = char_tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls = []

    def generate(model, prompts, max_new_tokens, **kwargs):
        calls.append([char_tokenizer.decode(p) for p in prompts])
        ids = char_tokenizer.encode("\\boxed{-1}", add_special_tokens=False) + [im_end]   # never a sum of two positives
        return [Generation(ids, [-0.1] * len(ids), True) for _ in prompts]

    monkeypatch.setattr(icrl, "generate", generate)
    args = icrl.parse_args(["--algo", "grpo", "--rounds", "2", "--batch_prompts", "1", "--group_size", "2"])
    args.max_turns = 1   # train() sets the task's own
    model = tiny_model(len(char_tokenizer))
    metrics = icrl.train_step(model, torch.optim.AdamW(model.parameters()), char_tokenizer,
                              load_task("arithmetic", n=4), icrl.sampling_config(args), args, icrl.Dist(), step=0)
    assert [len(c) for c in calls] == [2] and not any("Critique the attempt" in p for c in calls for p in c)
    assert metrics["acc"] == 0.0 and "critiqued_frac" not in metrics


TINY_RUN = ["--task", "arithmetic", "--warm_start_steps", "2", "--warm_start_role_steps", "1", "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "6",
            "--critic_max_new_tokens", "6", "--eval_examples", "4", "--eval_every", "0", "--micro_batch", "8"]


def saved_optimizer(checkpoint):
    """A checkpoint's AdamW state by parameter name, loaded into a fresh optimizer by icrl.load_optimizer."""
    model = icrl.Qwen3.from_pretrained(checkpoint)
    optimizer = torch.optim.AdamW(model.parameters())
    icrl.load_optimizer(model, optimizer, checkpoint)
    return {name: optimizer.state[p] for name, p in model.named_parameters()}


# TINY_RUN's arithmetic earns no reward after 2 warm-start steps, so its RL steps have zero advantages and never
# move the weights; guess with 3 tries at numbers up to 6, after 4 warm-start steps, does.
MOVING_RUN = TINY_RUN + ["--task", "guess", "--task_knob", "max_number=6", "--task_knob", "max_guesses=3",
                         "--warm_start_steps", "4"]


def test_resume_ends_with_the_same_weights(tmp_path, capsys):
    straight, first = str(tmp_path / "straight"), str(tmp_path / "first")
    icrl.main(MOVING_RUN + ["--steps", "3", "--out", straight])
    icrl.main(MOVING_RUN + ["--steps", "1", "--out", first, "--save_every", "1"])
    capsys.readouterr()
    icrl.main(MOVING_RUN + ["--steps", "3", "--out", first, "--resume", first])
    out = capsys.readouterr().out   # the gain a resumed run prints is since where it resumed, and says so
    assert "at step 1, where this run resumes" in out and "since step 1, where this run resumed" in out, out
    a = load_file(os.path.join(straight, "final", "model.safetensors"))
    b = load_file(os.path.join(first, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    rl_start = load_file(os.path.join(straight, "warm_start", "model.safetensors"))
    assert max((a[k] - rl_start[k]).abs().max().item() for k in a) > 1e-5   # RL moved them: the equality means something
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and so is the AdamW state, read back as a resume reads it (one process: DCP without a process group)
    straight_state, first_state = (saved_optimizer(os.path.join(run, "final")) for run in (straight, first))
    assert straight_state.keys() == first_state.keys()
    for name in straight_state:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(straight_state[name][k], first_state[name][k]), (name, k)
    steps = [json.loads(line)["step"] for line in open(os.path.join(first, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    for key in ("acc", "critiqued_frac", "retry_acc", "final_acc", "critic_reward", "calib_w_mean", "calib_w_p10",
                "calib_w_low_frac", "len_solver", "len_critic", "loss_solver", "loss_critic", "clip_frac",
                "grad_norm", "logprob_gap", "tok_per_s", "t_sample", "t_env", "t_train", "eval_acc", "eval_acc_greedy"):
        assert key in json.loads(open(os.path.join(first, "metrics.jsonl")).readlines()[-1]), key


def test_checkpoint_is_a_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "run")
    icrl.main(TINY_RUN + ["--steps", "1", "--out", out, "--algo", "grpo"])
    folder = os.path.join(out, "final")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ours = icrl.Qwen3.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("12+34")])
    torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    # RL's starting point is kept, so another algorithm can start from the same weights (--model); `final`
    # names the last step's folder (a symlink swapped atomically), `latest` names it too.
    assert sorted(os.listdir(out)) == ["final", "latest", "metrics.jsonl", "step_1", "warm_start"]
    assert os.readlink(os.path.join(out, "final")) == "step_1" == open(os.path.join(out, "latest")).read().strip()
    rl_start = os.path.join(out, "warm_start")
    assert icrl.Qwen3.from_pretrained(rl_start).config.vocab_size == ours.config.vocab_size
    assert AutoTokenizer.from_pretrained(rl_start).vocab == tokenizer.vocab
    assert icrl.read_trainer_state(rl_start)["step"] == 0


def test_a_checkpoint_keeps_its_models_sampling_defaults(tmp_path):
    """generation_config.json of a checkpoint trained from a --model folder keeps that folder's sampling
    defaults (Qwen3's do_sample, temperature 0.6, top_p 0.95, top_k 20: greedy decoding repeats in thinking
    mode) with our stop ids; from the tiny default, greedy."""
    start = str(tmp_path / "start")
    icrl.main(TINY_RUN + ["--steps", "0", "--out", start])
    assert json.load(open(os.path.join(start, "warm_start", "generation_config.json")))["do_sample"] is False  # tiny: greedy
    qwen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1], "bos_token_id": 2}
    with open(os.path.join(start, "warm_start", "generation_config.json"), "w") as f:
        json.dump(qwen, f)
    out = str(tmp_path / "run")
    icrl.main(TINY_RUN + ["--warm_start_steps", "0", "--model", os.path.join(start, "warm_start"), "--steps", "1",
                          "--out", out])
    saved = json.load(open(os.path.join(out, "final", "generation_config.json")))
    tokenizer = icrl.checked_tokenizer("--model", os.path.join(out, "final"))
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == \
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert saved["eos_token_id"] == icrl.stop_token_ids(tokenizer)
    shutil.rmtree(start)   # a resumed run takes them from the checkpoint it resumes, whatever became of --model
    icrl.main(["--resume", out, "--steps", "2"])
    assert json.load(open(os.path.join(out, "final", "generation_config.json")))["temperature"] == 0.6


def test_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    icrl.main(TINY_RUN + ["--steps", "2", "--save_every", "1", "--out", out])
    before = load_file(os.path.join(out, "step_1", "model.safetensors"))

    def killed(*args, **kwargs):  # the process dies after the weights and the optimizer, before the step
        raise KeyboardInterrupt

    monkeypatch.setattr(icrl, "write_trainer_state", killed)
    with pytest.raises(KeyboardInterrupt):
        icrl.main(TINY_RUN + ["--steps", "4", "--save_every", "1", "--out", out, "--resume", out])
    monkeypatch.undo()
    assert open(os.path.join(out, "latest")).read().strip() == "step_2"   # still the last whole one
    assert os.readlink(os.path.join(out, "final")) == "step_2"
    assert not os.path.exists(os.path.join(out, "step_3"))
    assert icrl.resolve_checkpoint(out) == os.path.join(out, "step_2")
    after = load_file(os.path.join(out, "step_1", "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(icrl.UsageError, match=icrl.TRAINER_STATE):
        icrl.resolve_checkpoint(os.path.join(out, ".tmp-step_3"))


def test_fsdp_run_samples_with_the_trained_weights(tmp_path):
    """2 ranks, FSDP2 over gloo, a whole run: the rollout gathers the sharded weights (SPEC §3's
    logprob_gap: sampler vs trainer log-probs stays at float noise) and the checkpoint is whole, with a file
    of optimizer state per rank; a 2-rank resume continues it."""
    out = str(tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                os.path.join(ROOT, "icrl.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(torchrun + ["--fsdp", "--steps", "2", "--out", out] + TINY_RUN, check=True, cwd=ROOT, env=env,
                   timeout=240)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["logprob_gap"] < 1e-4 for m in lines)
    assert icrl.Qwen3.from_pretrained(os.path.join(out, "final")).config.num_hidden_layers == 4
    optimizer_files = sorted(os.listdir(os.path.join(out, "final", icrl.OPTIMIZER)))
    assert optimizer_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    subprocess.run(torchrun + ["--resume", out, "--steps", "3"], check=True, cwd=ROOT, env=env, timeout=240)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    assert icrl.read_trainer_state(os.path.join(out, "final"))["step"] == 3


# ==================================================================================================
# Multi-turn episodes (SPEC §1)
# ==================================================================================================

class EchoEnv(Environment):
    """A scripted environment: observation `seen <action>` (or `invalid` for anything but a single
    lower-case word), never done unless the action is `stop`; reward 0.5 after `half`, 1 after `stop`.
    It reads an action as the built-in environments do (Environment.action_key)."""

    def __init__(self):
        self.turns = 0

    def reset(self):
        self.turns = 0
        return "Say words.", "Go."

    def step(self, action):
        self.turns += 1
        word = self.action_key(action)
        if word == "stop":
            return "bye", 1.0, True
        if not word.isalpha() or not word.islower():
            return "invalid, say one word", 0.0, False
        return f"seen {word}", 0.5 if word == "half" else 0.0, False

    def close(self):
        pass


class EchoTask:
    examples = ["x"]

    def env(self, example):
        return EchoEnv()


class ScriptedActions:
    """model.generate stand-in: row i of call n answers actions[n][i % len] and ends with <|im_end|>; an action
    written "CUT:text" is text cut off by max_new_tokens (no stop token, not finished), "EOS:text" text that
    stopped on <|endoftext|> instead."""

    def __init__(self, tokenizer, actions):
        self.tok, self.actions, self.calls = tokenizer, actions, []
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, model, prompts, max_new_tokens, **kwargs):
        from model import Generation
        self.calls.append([self.tok.decode(p) for p in prompts])
        row = self.actions[len(self.calls) - 1]
        out = []
        for i in range(len(prompts)):
            text = row[i % len(row)]
            cut, eos = text.startswith("CUT:"), text.startswith("EOS:")
            stop = [] if cut else [self.tok.convert_tokens_to_ids("<|endoftext|>") if eos else self.im_end]
            ids = self.tok.encode(text.removeprefix("CUT:").removeprefix("EOS:"), add_special_tokens=False) + stop
            out.append(Generation(ids, [-0.1] * len(ids), not cut))
        return out


def echo_rollout(monkeypatch, tokenizer, actions, **cfg):
    script = ScriptedActions(tokenizer, actions)
    monkeypatch.setattr(icrl, "generate", script)
    config = icrl.SamplingConfig(**{"group_size": 1, "max_new_tokens": 8, **cfg})
    rollouts, _ = icrl.rollout(tiny_model(len(tokenizer)), tokenizer, EchoTask(), ["x"], config, seed=0, critique=False)
    return rollouts[0].chains[0].episodes[0], script


def test_compile_sampler_reaches_generate(monkeypatch, char_tokenizer):
    """--compile_sampler (icrl.py and eval.py) asks model.generate for compiled decode layers on every call;
    without it the call is SPEC §5's, with no compile argument."""
    import eval as ev
    assert icrl.sampling_config(icrl.parse_args(["--compile_sampler"])).compile_sampler
    assert not icrl.sampling_config(icrl.parse_args([])).compile_sampler
    assert ev.eval_config(ev.parse_args(["--model", "m", "--compile_sampler"])).compile_sampler
    for flag in (False, True):
        script, seen = ScriptedActions(char_tokenizer, [["half"], ["stop"]]), []
        monkeypatch.setattr(icrl, "generate", lambda *a, **kw: seen.append(kw) or script(*a, **kw))
        config = icrl.SamplingConfig(group_size=1, max_new_tokens=8, max_turns=2, compile_sampler=flag)
        icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, EchoTask(), ["x"], config, seed=0, critique=False)
        assert len(seen) == 2 and all(kw.get("compile", "absent") == (True if flag else "absent") for kw in seen)


def test_episode_end_conditions(monkeypatch, char_tokenizer):
    # done: the environment ends it, with its reward
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["half"], ["stop"]], max_turns=5)
    assert (ep.end, ep.reward, ep.actions, ep.observations) == ("done", 1.0, ["half", "stop"], ["seen half", "bye"])
    # max_turns: the reward is the environment's last
    ep, script = echo_rollout(monkeypatch, char_tokenizer, [["a"], ["half"]], max_turns=2)
    assert (ep.end, ep.reward, len(ep.actions), len(script.calls)) == ("max_turns", 0.5, 2, 2)
    # the same action 3 times in a row
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["go"], ["go"], ["go"], ["go"]], max_turns=9)
    assert (ep.end, len(ep.actions)) == ("repeat", 3)
    # ... the same command, that is: what the environment reads, whatever the reasoning or spacing around it
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["go"], [" go "], ["<think>hm</think>go"], ["go"]], max_turns=9)
    assert (ep.end, ep.observations) == ("repeat", ["seen go"] * 3)
    # an invalid action gets the environment's answer and counts as a turn
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["Go Go"], ["stop"]], max_turns=9)
    assert (ep.end, ep.observations, len(ep.actions)) == ("done", ["invalid, say one word", "bye"], 2)
    # the context budget: the next turn would not fit, so the episode is truncated after this one
    context_len = len(icrl.solver_context(char_tokenizer, "Say words.", "Go."))
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["half"], ["b"]], max_turns=9,
                         max_context=context_len + 2 + 8)
    assert (ep.end, ep.reward, len(ep.actions)) == ("context", 0.5, 1)


def test_a_cut_off_turn_ends_the_episode_with_the_environments_last_reward(monkeypatch, char_tokenizer):
    """SPEC §1: R(tau) is the environment's last reward. A turn cut off by max_new_tokens is never sent to the
    environment and ends the episode: after "half" (0.5) the episode keeps 0.5; cut off on its first turn
    (as a single-turn response) it has no reward from the environment: 0."""
    ep, script = echo_rollout(monkeypatch, char_tokenizer, [["half"], ["CUT:more"], ["stop"]], max_turns=5)
    assert (ep.end, ep.reward, ep.observations, len(script.calls)) == ("cutoff", 0.5, ["seen half", ""], 2)
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["CUT:half"]], max_turns=5)
    assert (ep.end, ep.reward, ep.observations) == ("cutoff", 0.0, [""])


def test_an_action_stopped_by_another_stop_id_still_closes_its_turn(monkeypatch, char_tokenizer):
    """The observation turn's markers follow the end-of-turn token (observation_turn); an action that stopped
    on <|endoftext|> gets <|im_end|> after it, as context (mask 0), so the episode stays the template's form."""
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["EOS:half"], ["stop"]], max_turns=5)
    assert (ep.end, ep.reward) == ("done", 1.0)
    text = char_tokenizer.decode(ep.tokens)
    assert text.startswith("half<|endoftext|><|im_end|>\n<|im_start|>user\nseen half<|im_end|>"), text
    untrained = char_tokenizer.decode([t for t, m in zip(ep.tokens, ep.mask) if not m])
    assert untrained.startswith("<|im_end|>\n<|im_start|>user"), untrained


def test_repeats_end_an_episode_only_in_a_row(monkeypatch, char_tokenizer):
    """SPEC §1: the same action 3 times *in a row* ends the episode; 3 times with other actions between them
    does not: go, a, go, a, go, stop runs its 6 turns and the environment ends it (reward 1)."""
    ep, _ = echo_rollout(monkeypatch, char_tokenizer, [["go"], ["a"], ["go"], ["a"], ["go"], ["stop"]], max_turns=9)
    assert (ep.end, ep.reward, ep.actions) == ("done", 1.0, ["go", "a", "go", "a", "go", "stop"])


def test_the_critic_context_leaves_room_for_the_critique(char_tokenizer):
    """C(x, tau) (SPEC §1) of a long episode within the context budget: the earliest turns of the summary are
    left out, with a line that says how many, until the context and the critique's token limit fit; the reward
    and the last turns stay. An episode whose summary fits is summarised whole."""
    ep = icrl.Episode([], "Say words.", "Go.", actions=[f"word{i}<|im_end|>" for i in range(5)],
                      observations=[f"seen word{i} " + "x" * 40 for i in range(5)], reward=0.5)
    cfg = icrl.SamplingConfig(group_size=1, max_new_tokens=8, critic_max_new_tokens=8)
    whole = icrl.critic_context(char_tokenizer, "Say words.", "Go.", icrl.episode_summary(0.5, ep.actions,
                                ep.observations, cfg.obs_chars), False)
    assert icrl.critic_context_within(char_tokenizer, ep, cfg, len(whole) + 8) == whole
    limit = len(whole) + 8 - 100   # about two turns too long
    fitted = icrl.critic_context_within(char_tokenizer, ep, cfg, limit)
    text = char_tokenizer.decode(fitted)
    assert len(fitted) + 8 <= limit
    assert "Reward of the attempt: 0.5" in text and "word4" in text and "word0" not in text
    left_out = int(text.split(" earlier turns left out")[0].rsplit("(", 1)[1])
    assert 1 <= left_out <= 4 and f"word{left_out - 1}" not in text and f"word{left_out}" in text
    # one turn more would not have fitted: as few turns as possible are left out
    more = icrl.critic_context(char_tokenizer, "Say words.", "Go.", icrl.episode_summary(
        0.5, ep.actions[left_out - 1:], ep.observations[left_out - 1:], cfg.obs_chars, left_out - 1), False)
    assert len(more) + 8 > limit


def test_collectives_wait_longer_than_nccls_default(monkeypatch):
    """Under torchrun the process group's timeout is COLLECTIVE_TIMEOUT (hours), not NCCL's 10 minutes: a rank
    waits in a collective while another samples a whole eval batch or writes a checkpoint alone."""
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(icrl.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(icrl.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(icrl.dist, "get_world_size", lambda: 1)
    icrl.init_distributed()
    assert seen["timeout"] == icrl.COLLECTIVE_TIMEOUT >= icrl.datetime.timedelta(hours=1)


def test_a_rollout_of_no_examples_is_empty(char_tokenizer):
    """A rank's share of held-out examples can be empty (fewer than ranks); its rollout must still run (every
    rank enters full_weights, a collective under FSDP) and give nothing, with or without --rollout_batch."""
    for rollout_batch in (0, 4):
        cfg = icrl.SamplingConfig(group_size=2, max_new_tokens=4, max_batch=rollout_batch)
        rollouts, _ = icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, EchoTask(), [], cfg, seed=0)
        assert rollouts == []


def test_a_prompt_at_the_limit_leaves_room_for_every_role(char_tokenizer):
    """prompt_limit's S(x) of the longest kept length leaves room, within the positions, for the action, and for
    C(x, tau) with its critique even when the summary must leave every turn out (its line counts too)."""
    positions = 400
    args = icrl.parse_args(["--task", "arithmetic", "--max_new_tokens", "8", "--critic_max_new_tokens", "8"])
    limit = icrl.prompt_limit(args, char_tokenizer, positions)
    n = limit - len(icrl.solver_context(char_tokenizer, "Say words.", ""))
    first = "x" * n
    while len(icrl.solver_context(char_tokenizer, "Say words.", first)) > limit:   # a phrase token may merge chars
        first = first[:-1]
    assert len(icrl.solver_context(char_tokenizer, "Say words.", first)) + args.max_new_tokens <= positions
    ep = icrl.Episode([], "Say words.", first, actions=["a long action" * 3] * 12, observations=["o" * 60] * 12)
    cfg = icrl.sampling_config(args)
    fitted = icrl.critic_context_within(char_tokenizer, ep, cfg, positions)
    assert "12 earlier turns left out" in char_tokenizer.decode(fitted)
    assert len(fitted) + args.critic_max_new_tokens <= positions


def test_a_cut_off_answer_scores_zero(monkeypatch, char_tokenizer):
    """SPEC §1: a single-turn response cut off by max_new_tokens (no stop token) scores 0, even when its text
    holds the right answer. 2+3 answered \\boxed{5} twice: with <|im_end|> (reward 1, done), and cut off
    before it (reward 0, cutoff, never sent to the environment: no observation)."""
    from data import Example, load_task
    from model import Generation
    im_end = char_tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = char_tokenizer.encode("\\boxed{5}", add_special_tokens=False)

    def generate(model, prompts, max_new_tokens, **kwargs):
        return [Generation(answer + [im_end], [-0.1] * (len(answer) + 1), True),
                Generation(answer, [-0.1] * len(answer), False)]

    monkeypatch.setattr(icrl, "generate", generate)
    cfg = icrl.SamplingConfig(group_size=2, max_new_tokens=len(answer), rounds=1)
    rollouts, _ = icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, load_task("arithmetic", n=1),
                               [Example("arithmetic:2+3", "2+3", "5")], cfg, seed=0, critique=False)
    done, cut = (c.episodes[0] for c in rollouts[0].chains)
    assert done.actions == cut.actions == ["\\boxed{5}"]
    assert (done.reward, done.end, cut.reward, cut.end, cut.observations) == (1.0, "done", 0.0, "cutoff", [""])


def test_multi_turn_masks_cover_model_output_only(monkeypatch, char_tokenizer):
    ep, script = echo_rollout(monkeypatch, char_tokenizer, [["half"], ["Big"], ["stop"]], max_turns=5)
    (sample,) = icrl.build_samples([icrl.QueryRollout("x", [icrl.Chain([ep], [], [ep.context])])])[0]
    spans, current = [], []
    for token, m in zip(sample.response, sample.loss_mask):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [char_tokenizer.decode(s) for s in spans] == ["half<|im_end|>", "Big<|im_end|>", "stop<|im_end|>"]
    untrained = char_tokenizer.decode([t for t, m in zip(sample.response, sample.loss_mask) if not m])
    assert "seen half" in untrained and "invalid" in untrained and "<|im_start|>user" in untrained
    # the prompt of turn 2 is turn 1's prompt + action + the template's user turn + generation prompt
    assert script.calls[1][0] == (script.calls[0][0] + "half<|im_end|>\n<|im_start|>user\nseen half<|im_end|>\n"
                                  "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert sample.trained_tokens == ep.action_tokens == 5 + 4 + 5  # each word, one token per character, and its stop


@pytest.mark.parametrize("max_batch", [0, 3], ids=["one-call", "rollout_batch-3"])
def test_trainer_logprobs_equal_the_samplers_on_a_three_turn_episode(monkeypatch, char_tokenizer, max_batch):
    """The real sampler on a random model (most tokens made stop tokens, so turns end early), each episode's
    KV cache kept from turn to turn: the trainer's log-probs of every action token, observations in
    context, equal the sampler's. With --rollout_batch 3, the 6 episodes go in 2 groups, each with its own
    cache, through all their turns one group after the other (so one group's cache is alive at a time)."""
    monkeypatch.setattr(icrl, "stop_token_ids", lambda tok: list(range(8, 100)))
    calls, real_generate = [], icrl.generate
    monkeypatch.setattr(icrl, "generate", lambda m, prompts, *a, session=None, **kw: calls.append(
        (id(session), len(prompts))) or real_generate(m, prompts, *a, session=session, **kw))
    model = tiny_model(len(char_tokenizer), seed=3)
    cfg = icrl.SamplingConfig(group_size=3, max_new_tokens=6, max_turns=3, temperature=0.9, max_batch=max_batch)
    rollouts, _ = icrl.rollout(model, char_tokenizer, EchoTask(), ["x", "x"], cfg, seed=5, critique=False)
    episodes = [c.episodes[0] for r in rollouts for c in r.chains]
    assert max(len(ep.actions) for ep in episodes) == 3
    groups = [key for i, (key, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != key]
    assert len(groups) == len(set(groups)) == (2 if max_batch else 1)        # each group's turns in one run
    assert max(n for _, n in calls) == (3 if max_batch else 6) and len(calls) > len(groups)
    samples = [s for per_query in icrl.build_samples(rollouts) for s in per_query]
    icrl.old_logprobs(model, samples, icrl.parse_args(["--temperature", "0.9"]), icrl.Dist())
    for s in samples:
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(s.old_logp[mask], torch.tensor(s.sampler_logprobs)[mask], rtol=0, atol=2e-5)
        assert (s.old_logp[~mask] == 0).all()


def test_bad_environment_replies_stop_with_a_message(monkeypatch, char_tokenizer):
    class Bad(EchoEnv):
        def __init__(self, reply):
            super().__init__()
            self.reply = reply

        def step(self, action):
            return self.reply

    for reply, message in [((5, 0.0, False), "observation, not a string"), (("o", 1.5, True), "reward 1.5"),
                           (("o", float("nan"), True), "reward nan"), ("o", "must return")]:
        task = EchoTask()
        task.env = lambda example, reply=reply: Bad(reply)
        monkeypatch.setattr(icrl, "generate", ScriptedActions(char_tokenizer, [["a"]]))
        with pytest.raises(RuntimeError, match=message):
            icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, task, ["x"],
                         icrl.SamplingConfig(group_size=1), seed=0, critique=False)


def test_warm_start_pairs_expert_episode_and_own_failure(char_tokenizer):
    """The warm start's solver target is the expert's whole episode (actions trained, observations
    context); a failed attempt of the model's own gets the task's critique, and the retry the expert
    episode under S(x, c), one that uses the tip where the task has one (guess: searching its range). A
    success adds no pair under the failure gate."""
    from data import load_task, observation_turn
    task = load_task("guess", split="test", n=3)
    example = task.examples[0]
    markers = observation_turn(char_tokenizer, False)
    failed = icrl.Episode([], actions=["1", "2"], observations=["1 is too low. It is from 2 to 9.",
                                                              "2 is too low. It is from 3 to 9."], reward=0.0)
    (s_ctx, tokens, mask), (c_ctx, critique, c_mask), (r_ctx, r_tokens, r_mask) = icrl.warm_start_pairs(
        task, char_tokenizer, example, False, markers, failed)
    actions = task.expert_actions(example)
    trained = char_tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    assert trained == "".join(a + "<|im_end|>" for a in actions)
    assert len(actions) == 3   # 12, 13, 14: the observations between them are context
    assert char_tokenizer.decode([t for t, m in zip(tokens, mask) if not m]).count("It is from") == 2
    assert char_tokenizer.decode(critique) == "It is from 3 to 9.<|im_end|>" and all(c_mask)
    assert "Reward of the attempt: 0\nAction: 1\nObservation: 1 is too low" in char_tokenizer.decode(c_ctx)
    assert "Tips from the previous critique: It is from 3 to 9." in char_tokenizer.decode(r_ctx)
    assert (r_tokens, r_mask) == (tokens, mask) and "Tips" not in char_tokenizer.decode(s_ctx)
    c_ctx = icrl.warm_start_pairs(task, char_tokenizer, example, False, markers, failed, obs_chars=4)[1][0]
    assert "Observation: 1 is\n" in char_tokenizer.decode(c_ctx)  # --obs_chars, as the critic sees it in RL
    # a tip that holds the secret (14 of [10, 14]): the retry's target searches within it, 13 then 14
    near = icrl.Episode([], actions=["12", "16"], observations=["12 is too low. It is from 13 to 14.",
                                                               "16 is outside 10 to 14. It is from 13 to 14."], reward=0.0)
    retry_tokens, retry_mask = icrl.warm_start_pairs(task, char_tokenizer, example, False, markers, near)[2][1:]
    assert example.id == "guess:10-14:14"
    assert char_tokenizer.decode([t for t, m in zip(retry_tokens, retry_mask) if m]) == "13<|im_end|>14<|im_end|>"
    won = icrl.Episode([], actions=actions, observations=[""], reward=1.0)
    assert len(icrl.warm_start_pairs(task, char_tokenizer, example, False, markers, won)) == 1
    # a one-turn task names the failed answer
    arithmetic = load_task("arithmetic", n=1)
    wrong = icrl.Episode([], actions=["\\boxed{12}"], observations=[""], reward=0.0)
    pairs = icrl.warm_start_pairs(arithmetic, char_tokenizer, arithmetic.examples[0], False, markers, wrong)
    assert char_tokenizer.decode(pairs[1][1]) == "Wrong, it is not 12.<|im_end|>"
    # with thinking on, the generation prompt leaves the think block to the model: every target writes an empty
    # one (Qwen3's own form of no reasoning), so the warm start never teaches a thinking model to skip the block
    thinking = observation_turn(char_tokenizer, True)
    pairs = icrl.warm_start_pairs(task, char_tokenizer, example, True, thinking, failed)
    empty = "<think>\n\n</think>\n\n"
    trained = char_tokenizer.decode([t for t, m in zip(pairs[0][1], pairs[0][2]) if m])
    assert trained == "".join(empty + a + "<|im_end|>" for a in actions)
    assert char_tokenizer.decode(pairs[1][1]) == empty + "It is from 3 to 9.<|im_end|>"
    assert char_tokenizer.decode([t for t, m in zip(*pairs[2][1:]) if m]) == trained


def test_warm_start_pairs_boxes_teach_the_critic_the_format_and_the_retry_the_note(char_tokenizer):
    """boxes: the retry's tip is the note the failed episode read and its target opens the key's box at once;
    the critic's target is a note naming a listed box drawn from the warm start's rng, the key's no more
    often than another (which box to name is left to RL), reproducible from the rng."""
    import random
    from data import Example, load_task, observation_turn
    task = load_task("boxes", split="test", n=1)
    example = Example("boxes:1,4,3,5:3:4,5", "", "3", {"boxes": [1, 4, 3, 5], "key": 3, "notes": [4, 5]})
    markers = observation_turn(char_tokenizer, False)
    failed = icrl.Episode([], actions=["1", "4"], reward=0.0,
                          observations=["Box 1 is empty.", "Box 4 has no key. A note says the key is in box 3. No tries left."])
    prefix = "A note says the key is in box "
    rng, named = random.Random(0), []
    for _ in range(400):
        _, (c_ctx, critique, _), (r_ctx, r_tokens, r_mask) = icrl.warm_start_pairs(
            task, char_tokenizer, example, False, markers, failed, rng=rng)
        text = char_tokenizer.decode(critique)
        assert text.startswith(prefix) and text.endswith(".<|im_end|>") and len(text) == len(prefix) + 12
        named.append(int(text[len(prefix)]))
        assert "Observation: Box 4 has no key. A note says the key is in box 3." in char_tokenizer.decode(c_ctx)
        assert "Tips from the previous critique: A note says the key is in box 3." in char_tokenizer.decode(r_ctx)
        assert char_tokenizer.decode([t for t, m in zip(r_tokens, r_mask) if m]) == "3<|im_end|>"
    assert set(named) == {1, 4, 3, 5}
    assert all(abs(named.count(box) / len(named) - 1 / 4) < 0.08 for box in (1, 4, 3, 5))
    again = random.Random(0)
    assert [char_tokenizer.decode(icrl.warm_start_pairs(task, char_tokenizer, example, False, markers, failed,
                                                        rng=again)[1][1])[len(prefix)] for _ in range(5)] == \
        [str(box) for box in named[:5]]


def test_gate_critiques_a_partial_reward(monkeypatch, char_tokenizer):
    """SPEC §2.2: only r = 1 ends a chain; an episode that ends on 0.5 is a failure and is critiqued."""
    script = ScriptedActions(char_tokenizer, [["half"], ["Tip."], ["stop"]])
    monkeypatch.setattr(icrl, "generate", script)
    cfg = icrl.SamplingConfig(group_size=1, max_new_tokens=8, max_turns=1, rounds=2, obs_chars=4)
    ro, _ = icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, EchoTask(), ["x"], cfg, seed=0)
    chain = ro[0].chains[0]
    assert [ep.reward for ep in chain.episodes] == [0.5, 1.0] and len(chain.critiques) == 1
    critic_prompt = script.calls[1][0]
    assert "Observation: seen\n" in critic_prompt and "seen half" not in critic_prompt   # --obs_chars 4 reached C(x, tau)


def test_enable_thinking_reaches_every_rollout_context(monkeypatch, char_tokenizer):
    """--enable_thinking reaches S(x), C(x, tau) and S(x, c): every prompt leaves the think block to the model."""
    script = ScriptedActions(char_tokenizer, [["a"], ["Tip."], ["stop"]])
    monkeypatch.setattr(icrl, "generate", script)
    cfg = icrl.SamplingConfig(group_size=1, max_new_tokens=8, max_turns=1, rounds=2, enable_thinking=True)
    icrl.rollout(tiny_model(len(char_tokenizer)), char_tokenizer, EchoTask(), ["x"], cfg, seed=0)
    assert all(p.endswith("<|im_start|>assistant\n") for call in script.calls for p in call), script.calls


def test_calib_seq_reaches_the_update():
    """--calib seq through update: a 2-token retry with l_free - l_cond = (ln 4, 0): token weights (2, 1),
    seq weight min(exp(ln 4 / 2), 2) = 2 on both. rho = 1, A = -1: per-token loss = w; solver mean over 2 tokens."""
    model = tiny_model(40)
    retry = icrl.TrainSample([1, 2], [6, 7], False, -1.0, None, [1, 9, 2])
    with torch.no_grad():
        logp, _ = icrl.response_logprobs(model, [retry.context], [retry.response], 1.0, "cpu")
    retry.old_logp = logp[0]
    retry.cond_logp = retry.old_logp - torch.tensor([math.log(4), 0.0])
    for mode, expected in (("token", (2 + 1) / 2), ("seq", (2 + 2) / 2)):
        args = icrl.parse_args(["--batch_prompts", "1", "--lr", "1e-9", "--calib", mode])
        stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=1e-9), [[retry]], args, icrl.Dist(), 0)
        assert abs(stats["loss_solver"] - expected) < 1e-5, (mode, stats["loss_solver"])


def test_grad_clip_bounds_the_step():
    """SPEC §2.9: with SGD the weight change is lr * clipped gradient, its norm at most lr * --grad_clip."""
    for clip in (1e-3, 1e9):
        model = tiny_model(40)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        args = icrl.parse_args(["--batch_prompts", "1", "--lr", "1.0", "--lr_warmup", "1", "--grad_clip", str(clip)])
        stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=1.0), [rho_batch(model, (1, 1, 1))], args, icrl.Dist(), 0)
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()
        assert stats["grad_norm"] > 1e-2
        assert float(moved) == pytest.approx(min(clip, stats["grad_norm"]), rel=1e-3), (clip, moved)
    # --lr_warmup: the rate of step s is lr * min(1, (s + 1) / warmup), here 1/4 of it at step 0 and 3/4 at step 2
    for step, share in ((0, 0.25), (2, 0.75)):
        model = tiny_model(40)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        args = icrl.parse_args(["--batch_prompts", "1", "--lr", "1.0", "--lr_warmup", "4", "--grad_clip", "1e-3"])
        icrl.update(model, torch.optim.SGD(model.parameters(), lr=1.0), [rho_batch(model, (1, 1, 1))], args,
                    icrl.Dist(), step)
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()
        assert float(moved) == pytest.approx(share * 1e-3, rel=1e-3), (step, moved)
