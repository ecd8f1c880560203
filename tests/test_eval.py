"""eval.py (SPEC §4): the pass@k estimator and the figures by hand (K = 3), the gates and --rollout_batch
with a scripted sampler, end to end on a tiny checkpoint, the critic swap with a critic whose critiques are
recognisable, clear errors, and 2 ranks == 1 process."""
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import eval as ev
import icrl
from data import CRITIC_INSTRUCTION, Environment, Example, Task, build_char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(autouse=True)
def away_from_runs(tmp_path, monkeypatch):
    """--model's default, runs/icrl/final, is relative: a checkout's own run (its task and episode settings,
    defaults_from_checkpoint) must not change what these tests parse."""
    monkeypatch.chdir(tmp_path)


FAST = ["--task", "arithmetic", "--max_examples", "3", "--n", "2", "--max_new_tokens", "6",
        "--critic_max_new_tokens", "5"]


# -------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0), (5, 0, 3, 0.0),          # no correct sample: never passes
    (5, 5, 1, 1.0), (5, 5, 5, 1.0),          # all correct: always passes
    (5, 2, 1, 0.4), (7, 3, 1, 3 / 7),        # k = 1: c / n
    (5, 2, 2, 0.7),                          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 3, 0.75),                         # 1 - C(3,3)/C(4,3) = 1 - 1/4
    (4, 2, 3, 1.0),                          # n - c = 2 < k: every 3-subset holds a correct one
    (10, 1, 10, 1.0), (10, 3, 4, 1 - 35 / 210),   # 1 - C(7,4)/C(10,4)
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not.
    assert ev.pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert 0.0 < ev.pass_at_k(2000, 3, 100) < 1.0


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@"):
        ev.pass_at_k(n, c, k)


def test_k_above_n_is_a_clear_cli_error():
    with pytest.raises(SystemExit, match="--k 3: pass@k needs 1 <= k <= n, and --n is 2"):
        ev.parse_args(["--n", "2", "--k", "1", "--k", "3"])
    assert ev.parse_args(["--n", "3"]).k == [1, 3]  # default: pass@1 and pass@n
    assert ev.parse_args(["--n", "8", "--k", "4", "--k", "1"]).k == [1, 4]
    assert ev.parse_args(["--samples", "8", "--k", "8"]).k == [1, 8]  # pass@1 always; --samples is --n


def test_round_and_episode_flags():
    a = ev.parse_args([])
    assert (a.rounds, a.critic_gate, a.max_turns, a.max_context, a.obs_chars, a.rollout_batch) == \
        (2, "failure", 0, 0, 800, 0)   # max_turns 0: the task's own (1 for a one-turn task)
    cfg = ev.eval_config(ev.parse_args(["--n", "3", "--rounds", "4", "--critic_gate", "always", "--max_turns", "5",
                                        "--max_context", "900", "--obs_chars", "50", "--rollout_batch", "12"]))
    assert (cfg.group_size, cfg.rounds, cfg.critic_gate, cfg.max_turns, cfg.max_context, cfg.obs_chars,
            cfg.max_batch) == (3, 4, "always", 5, 900, 50, 12)
    for bad in (["--rounds", "0"], ["--max_turns", "-1"], ["--rollout_batch", "-1"], ["--critic_gate", "never"]):
        with pytest.raises(SystemExit):
            ev.parse_args(bad)


# -------------------------------------------------------------------------------------------- figures
def ep(reward, critique_tokens=None, end="done", turns=1):
    """One round of a samples.jsonl row, with what `figures` reads."""
    return dict(reward=reward, end=end, actions=["a"] * turns, critique_tokens=critique_tokens)


def row(example, chain, *rounds, second=None):
    return dict(example=example, chain=chain, rounds=list(rounds), second_attempt_reward=second)


def test_figures_by_hand():
    """K = 3, failure gate, 2 examples x 3 chains; rewards in [0, 1] (0.5: a partial multi-turn reward)."""
    rows = [row(0, 0, ep(1.)),                                                     # solved at once: no critique
            row(0, 1, ep(0., 4), ep(1.), second=0.),                               # fixed in round 2
            row(0, 2, ep(0., 6, "cutoff"), ep(0., 2), ep(1., turns=3), second=0.),  # fixed in round 3
            row(1, 0, ep(0., 3), ep(0., 5, "context", 2), ep(0.), second=0.),      # never fixed
            row(1, 1, ep(0., 7), ep(1.), second=1.),                               # fixed; a fresh draw also wins
            row(1, 2, ep(.5, 1, "max_turns", 2), ep(.5, 2), ep(.25, end="repeat", turns=3), second=0.)]  # partial
    f = ev.figures(rows, [1, 2, 3], 3)
    # pass@k over first attempts: example 0 has c = 1 of n = 3, example 1 none (0.5 is no success).
    assert f["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert f["pass@2"] == pytest.approx((1 - 1 / 3 + 0) / 2)                 # 1 - C(2,2)/C(3,2)
    assert f["pass@3"] == pytest.approx((1 + 0) / 2)
    # Accuracy after round k: the reward of each chain's last episode among its first k.
    assert f["acc_round_1"] == pytest.approx((1 + 0 + 0 + 0 + 0 + .5) / 6)
    assert f["acc_round_2"] == pytest.approx((1 + 1 + 0 + 0 + 1 + .5) / 6)
    assert f["acc_round_3"] == pytest.approx((1 + 1 + 1 + 0 + 1 + .25) / 6)
    assert f["internalisation_gap"] == pytest.approx(4.25 / 6 - 1.5 / 6)
    # Retries: round 2 (5 of them, 2 wins), round 3 (3, 1 win).
    assert f["retry_acc_r2"] == pytest.approx(2 / 5) and f["retry_acc_r3"] == pytest.approx(1 / 3)
    assert f["retry_acc"] == pytest.approx(3 / 8)
    # Critique value on the 5 chains whose first attempt failed: round-2 retry wins 2, second attempts 1.
    assert f["failed_chains"] == 5
    assert f["failed_retry_acc"] == pytest.approx(2 / 5) and f["second_attempt_acc"] == pytest.approx(1 / 5)
    assert f["critique_value"] == pytest.approx(1 / 5)
    # Its standard error, clustered by example: retry minus second attempt per failed chain is (1, 0) for example
    # 0 and (0, 0, 0) for example 1, mean 1/5; cluster sums of deviations 0.6 and -0.6; G = 2 clusters:
    # sqrt(2 / 1 * (0.36 + 0.36)) / 5 = 1.2 / 5.
    assert f["critique_value_se"] == pytest.approx(0.24)   # the i.i.d. formula would give 0.2
    assert ev.clustered_standard_error([1, 0, -1], [7, 7, 7]) is None   # one example: no spread between examples
    assert f["critique_tokens"] == pytest.approx((4 + 6 + 2 + 3 + 5 + 7 + 1 + 2) / 8)
    assert f["critiqued_frac"] == pytest.approx(5 / 6)
    assert f["turns"] == pytest.approx((10 * 1 + 2 * 2 + 2 * 3) / 14)       # 14 episodes
    assert f["trunc_frac"] == pytest.approx(3 / 14)                         # cutoff, context, max_turns (not repeat)
    assert (f["examples"], f["chains"]) == (2, 6)
    json.dumps(f, allow_nan=False)


def test_figures_nulls():
    # Every first attempt succeeds: nothing is critiqued, so every retry and critique figure is undefined.
    solved = [row(0, 0, ep(1.)), row(0, 1, ep(1.))]
    f = ev.figures(solved, [1], 3)
    for key in ("retry_acc", "retry_acc_r2", "retry_acc_r3", "critique_value", "critique_value_se",
                "failed_retry_acc", "second_attempt_acc", "critique_tokens"):
        assert f[key] is None, key
    assert f["failed_chains"] == 0 and f["critiqued_frac"] == 0.0
    assert f["acc_round_1"] == f["acc_round_3"] == 1.0 and f["internalisation_gap"] == 0.0
    # K = 2: one round of retries, no per-round keys; K = 1: no retries at all.
    assert "retry_acc_r2" not in ev.figures(solved, [1], 2)
    one = ev.figures([row(0, 0, ep(0.))], [1], 1)
    assert one["retry_acc"] is None and one["critique_value"] is None and one["internalisation_gap"] == 0.0
    # No chain at all: nothing is defined (null, never NaN or 0).
    empty = ev.figures([], [1], 2)
    assert all(empty[k] is None for k in ("pass@1", "acc_round_1", "acc_round_2", "retry_acc", "critique_value",
                                          "internalisation_gap", "critique_tokens", "turns", "trunc_frac"))
    assert json.loads(json.dumps(empty, allow_nan=False)) == empty


# -------------------------------------------------------------------------------- the gates, with a scripted sampler
class ScriptedEnv(Environment):
    """One turn; the reward of each action is the example's script ("F": a first attempt, "R": a retry)."""

    def __init__(self, example):
        self.example = example

    def reset(self):
        return self.example.question, ""

    def step(self, action):
        return "", self.example.meta[action], True


class ScriptedTask(Task):
    def env(self, example):
        return ScriptedEnv(example)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = str(tmp_path_factory.mktemp("tok"))
    build_char_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def scripted_run(monkeypatch, tokenizer, *flags, seeds=None):
    """eval.evaluate with icrl.generate replaced by a script: critics write <critic>ok</critic>, a solver
    reading the tips answers R, any other solver F. Example a is fixed by a critique (F 0, R 1), b is solved
    at once and broken by one (F 1, R 0), c is never solved. Returns (rows, args, sizes of the sampling calls);
    `seeds`, a list, receives each call's seed."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sizes = []

    def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), seed=None):
        sizes.append(len(prompts))
        if seeds is not None:
            seeds.append(seed)
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            reply = ("<critic>ok</critic>" if CRITIC_INSTRUCTION in text else
                     "R" if "Tips from the previous critique: ok" in text else "F")
            ids = tokenizer.encode(reply, add_special_tokens=False) + [stop]
            out.append(SimpleNamespace(tokens=ids, logprobs=[0.0] * len(ids), finished=True))
        return out

    monkeypatch.setattr(icrl, "generate", generate)
    examples = [Example(name, f"task {name}", "-", {"F": f, "R": r})
                for name, f, r in (("a", 0.0, 1.0), ("b", 1.0, 0.0), ("c", 0.0, 0.0))]
    args = ev.parse_args(["--n", "2", "--rounds", "3", "--max_turns", "1", *flags])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))  # only its positions are read
    rows = ev.evaluate(model, tokenizer, None, ScriptedTask(examples), list(enumerate(examples)), args, icrl.Dist())
    return rows, args, sizes


def test_failure_gate_rounds_and_critique_value(monkeypatch, char_tokenizer):
    rows, args, sizes = scripted_run(monkeypatch, char_tokenizer)
    assert [(r["id"], r["chain"], len(r["rounds"])) for r in rows] == [
        ("a", 0, 2), ("a", 1, 2), ("b", 0, 1), ("b", 1, 1), ("c", 0, 3), ("c", 1, 3)]  # stop at success or K
    # One sampling call per phase: solve 6, critique 4, retry 4, critique 2, retry 2; then the 4 second attempts.
    assert sizes == [6, 4, 4, 2, 2, 4]
    for r in rows:
        for k, rd in enumerate(r["rounds"]):
            assert rd["actions"] == ["R" if k else "F"] and rd["end"] == "done"
            assert ("Tips from the previous critique: ok" in rd["context"]) == (k > 0)
            assert (rd["critique"] is None) == (k == len(r["rounds"]) - 1)
        assert r["second_attempt_reward"] == (None if r["id"] == "b" else 0.0)
    f = ev.figures(rows, args.k, args.rounds)
    critique_tokens = len(char_tokenizer.encode("<critic>ok</critic>", add_special_tokens=False)) + 1
    assert f["acc_round_1"] == pytest.approx(2 / 6) and f["pass@1"] == f["acc_round_1"]
    assert f["acc_round_2"] == pytest.approx(4 / 6) and f["acc_round_3"] == pytest.approx(4 / 6)
    assert f["retry_acc"] == pytest.approx(2 / 6)
    assert f["retry_acc_r2"] == pytest.approx(2 / 4) and f["retry_acc_r3"] == 0.0
    assert (f["failed_chains"], f["failed_retry_acc"], f["second_attempt_acc"]) == (4, 0.5, 0.0)
    assert f["critique_value"] == pytest.approx(0.5)
    assert f["internalisation_gap"] == pytest.approx(2 / 6)
    assert f["critique_tokens"] == critique_tokens and f["critiqued_frac"] == pytest.approx(4 / 6)
    assert (f["turns"], f["trunc_frac"]) == (1.0, 0.0)


def test_second_attempts_are_new_draws(monkeypatch, char_tokenizer):
    """SPEC §4: the critique value measures the critique beyond a *second* critique-free draw. Sampling is
    seeded per call, so a second-attempt call seeded like the first attempts' would repeat their draws (token
    for token where a batch holds one chain: --n 1 --batch_examples 1) and fail wherever the first attempt
    failed, inflating the critique value. Every sampling call of an evaluation has a seed of its own: the six
    calls of scripted_run (solve, critique, retry, critique, retry, second attempts) six seeds."""
    seeds = []
    _, _, sizes = scripted_run(monkeypatch, char_tokenizer, seeds=seeds)
    assert sizes == [6, 4, 4, 2, 2, 4] and None not in seeds and len(set(seeds)) == 6


def test_always_gate_critiques_successes(monkeypatch, char_tokenizer):
    rows, args, _ = scripted_run(monkeypatch, char_tokenizer, "--critic_gate", "always")
    assert all(len(r["rounds"]) == 3 for r in rows)
    f = ev.figures(rows, args.k, args.rounds)
    assert f["acc_round_1"] == pytest.approx(2 / 6)
    assert f["acc_round_2"] == f["acc_round_3"] == pytest.approx(2 / 6)  # a fixed, b broken
    assert f["internalisation_gap"] == pytest.approx(0.0)
    # The critique value is still measured on the chains whose first attempt failed (a and c).
    assert (f["failed_chains"], f["critique_value"]) == (4, 0.5)


def test_rollout_batch_bounds_every_sampling_call(monkeypatch, char_tokenizer):
    # Calls hold at most --rollout_batch sequences, a multiple of n = 2 (the second attempts: chains of one).
    rows, _, sizes = scripted_run(monkeypatch, char_tokenizer, "--rollout_batch", "4")
    assert sizes == [4, 2, 4, 4, 2, 2, 4]
    assert [len(r["rounds"]) for r in rows] == [2, 2, 1, 1, 3, 3]
    _, _, sizes = scripted_run(monkeypatch, char_tokenizer, "--rollout_batch", "3")
    assert max(sizes) == 3 and sum(sizes) == 6 + 4 + 4 + 2 + 2 + 4


# -------------------------------------------------------------------------------------------- end to end
def save_checkpoint(model, folder):
    build_char_tokenizer(str(folder))
    model.save_pretrained(folder)
    return str(folder)


def char_vocab_size(tmp_path):
    from transformers import AutoTokenizer
    build_char_tokenizer(str(tmp_path / "tok"))
    return len(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random solver and a critic that always writes 'Z', both with the character tokenizer."""
    tmp = tmp_path_factory.mktemp("ckpt")
    V = char_vocab_size(tmp)
    torch.manual_seed(0)
    solver = save_checkpoint(icrl.Qwen3(icrl.Qwen3Config(vocab_size=V, **icrl.TINY_CONFIG)), tmp / "solver")
    critic = icrl.Qwen3(icrl.Qwen3Config(vocab_size=V, **{**icrl.TINY_CONFIG, "tie_word_embeddings": False}))
    with torch.no_grad():
        # No attention or MLP output: the residual stream is the token embedding, the same vector e for
        # every token, so the last hidden state is the constant u = norm(e) and the logits lm_head @ u.
        for layer in critic.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = torch.randn(critic.config.hidden_size)
        critic.model.embed_tokens.weight.copy_(e.expand_as(critic.model.embed_tokens.weight))
        u = critic.model.norm(e)
        critic.lm_head.weight.zero_()
        from transformers import AutoTokenizer
        z = AutoTokenizer.from_pretrained(solver).convert_tokens_to_ids("Z")
        critic.lm_head.weight[z] = 100 * u
    return solver, save_checkpoint(critic, tmp / "critic")


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


FIELDS = {"example", "id", "question", "answer", "chain", "rounds", "second_attempt_reward", "second_attempt"}
EPISODE_FIELDS = {"context", "text", "actions", "observations", "reward", "end", "action_tokens"}
ROUND_FIELDS = {"context", "text", "actions", "observations", "reward", "end", "action_tokens", "critic_context",
                "critique", "critique_tokens", "critique_finished"}


def test_prompts_with_no_room_for_the_rounds_are_dropped_with_a_count(checkpoints, tmp_path, capsys):
    """icrl.py's rule: an S(x) with no room, within --max_context (or the positions), for what K rounds generate
    after it (the action, and the critique with its instructions) is dropped before sampling, with a warning and
    a count in summary.json, not sampled past the budget."""
    solver, _ = checkpoints
    problems = ["What is " + "very " * 60 + "long?", "1+1", "2+2"]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": "2"}) + "\n" for p in problems))
    summary = ev.main(["--model", solver, "--task", "math", "--eval_file", str(data), "--out", str(tmp_path / "e"),
                       "--max_context", "200", "--n", "1", "--max_new_tokens", "6", "--critic_max_new_tokens", "5"])
    assert (summary["examples"], summary["dropped_long_prompts"]) == (2, 1)
    err = capsys.readouterr().err
    assert "dropped 1 of 3 examples" in err
    assert "--max_prompt_tokens" not in err and "--max_new_tokens" in err   # eval.py's flags, not icrl.py's
    # `example` is the task's own index of the example, whatever was dropped before it
    assert [(r["example"], r["question"]) for r in read_samples(tmp_path / "e")] == [(1, "1+1"), (2, "2+2")]


def test_the_tiny_models_limits_on_a_real_task_are_warned_about(checkpoints, tmp_path, capsys):
    """eval.py's --max_new_tokens 16 and --critic_max_new_tokens 24 are sized for the built-in tasks' tiny model:
    on gsm8k, math or an AgentGym task, limits that nobody chose (not given, not the training run's) are named in
    a warning, or a real model's every answer would be cut off without a word."""
    solver, _ = checkpoints
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    argv = ["--model", solver, "--task", "math", "--eval_file", str(data), "--n", "1"]
    ev.main(argv + ["--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "--max_new_tokens 16" in err and "--critic_max_new_tokens 24" in err, err
    ev.main(argv + ["--out", str(tmp_path / "b"), "--max_new_tokens", "6"])
    err = capsys.readouterr().err
    assert "--critic_max_new_tokens 24" in err and "--max_new_tokens 16" not in err, err
    ev.main(["--model", solver, "--out", str(tmp_path / "c"), "--task", "arithmetic", "--max_examples", "2", "--n", "1"])
    assert "sized for" not in capsys.readouterr().err   # a built-in task: the limits are its own


def test_no_room_for_a_prompt_is_one_line_before_any_weight_loads(checkpoints, tmp_path, capsys, no_weights_load):
    solver, _ = checkpoints
    argv = ["--model", solver, "--out", str(tmp_path / "e")] + FAST
    assert "no room is left" in refusal(argv + ["--max_context", "30"], capsys)
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "What is " + "very " * 60 + "long?", "answer": "2"}) + "\n")
    err = refusal(argv + ["--task", "math", "--eval_file", str(data), "--max_context", "200"], capsys)
    assert "every example's prompt S(x) is longer than" in err and "--max_prompt_tokens" not in err


def test_end_to_end(checkpoints, tmp_path, capsys, monkeypatch):
    solver, _ = checkpoints
    sizes, real_generate = [], icrl.generate
    monkeypatch.setattr(icrl, "generate", lambda model, prompts, *a, **kw: sizes.append(len(prompts)) or
                        real_generate(model, prompts, *a, **kw))
    out = str(tmp_path / "eval")
    summary = ev.main(["--model", solver, "--out", out, "--k", "1", "--k", "2", "--batch_examples", "2",
                       "--rounds", "3", "--rollout_batch", "2"] + FAST)
    assert sizes and max(sizes) == 2  # batches of 2 examples x 2 chains, sampled 2 sequences at a time
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary)) and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for key in ev.figure_keys([1, 2], 3):
        assert key in on_disk, key
        v = on_disk[key]
        if key not in ("failed_chains", "critique_tokens", "turns", "critique_value_se"):
            assert v is None or (-1.0 if key in ("critique_value", "internalisation_gap") else 0.0) <= v <= 1.0, key
    assert 1 <= on_disk["critique_tokens"] <= 5 and on_disk["turns"] == 1.0
    assert (on_disk["n"], on_disk["rounds"], on_disk["critic_gate"], on_disk["rollout_batch"]) == (2, 3, "failure", 2)
    assert (on_disk["examples"], on_disk["chains"], on_disk["critic_model"]) == (3, 6, None)
    assert on_disk["pass@1"] <= on_disk["pass@2"] and on_disk["acc_round_1"] == pytest.approx(on_disk["pass@1"])
    rows = read_samples(out)
    assert len(rows) == 3 * 2 and all(set(r) == FIELDS for r in rows)
    assert [(r["example"], r["chain"]) for r in rows] == [(e, c) for e in range(3) for c in range(2)]
    assert any(len(r["rounds"]) > 1 for r in rows)  # the random solver fails: there are retries to check
    for r in rows:
        rounds = r["rounds"]
        assert all(set(rd) == ROUND_FIELDS for rd in rounds)
        # The failure gate: a chain goes on after a failure only, up to K = 3 episodes.
        assert len(rounds) == 3 or rounds[-1]["reward"] == 1.0
        assert all(rd["reward"] < 1.0 for rd in rounds[:-1])
        assert (r["second_attempt_reward"] is None) == (len(rounds) == 1) == (r["second_attempt"] is None)
        if r["second_attempt"] is not None:   # the critique value's baseline: a critique-free episode from S(x)
            second = r["second_attempt"]
            assert set(second) == EPISODE_FIELDS and second["reward"] == r["second_attempt_reward"]
            assert second["context"] == rounds[0]["context"] and "Tips" not in second["context"]
        for k, rd in enumerate(rounds):
            assert r["question"] in rd["context"] and "<|im_start|>user" in rd["context"]  # decoded, markup kept
            assert rd["reward"] in (0.0, 1.0) and rd["end"] in ("done", "cutoff")
            assert rd["end"] != "cutoff" or (rd["reward"] == 0.0 and "<|im_end|>" not in rd["text"])
            assert len(rd["actions"]) == 1 and 1 <= rd["action_tokens"] <= 6 and rd["observations"] == [""]
            if k:  # a retry reads S(x) plus the tips of the critique before it; never the failed episode
                assert f"Tips from the previous critique: {rounds[k - 1]['critique']}" in rd["context"]
            if k < len(rounds) - 1:
                assert r["question"] in rd["critic_context"] and "Reward of the attempt: 0" in rd["critic_context"]
                assert 1 <= rd["critique_tokens"] <= 5
            else:
                assert rd["critique"] is rd["critic_context"] is rd["critique_tokens"] is None
    assert any(rd["critique"] and rd["critique"] != "Z" * len(rd["critique"])
               for r in rows for rd in r["rounds"])  # a self-critique is no 'ZZZ...'
    printed = capsys.readouterr().out
    for key in ev.figure_keys([1, 2], 3):
        assert key in printed, key


def test_greedy_leaves_the_critique_value_unmeasured(checkpoints, tmp_path, capsys):
    """At --temperature 0 the second critique-free attempt replays the failed first one (the environments are
    deterministic), so critique_value would be failed_retry_acc: it, its standard error and second_attempt_acc
    are null, with a note under the table."""
    solver, _ = checkpoints
    summary = ev.main(["--model", solver, "--out", str(tmp_path / "eval"), "--temperature", "0"] + FAST)
    failed = [r for r in read_samples(tmp_path / "eval") if r["second_attempt_reward"] is not None]
    assert failed and all(r["second_attempt_reward"] == r["rounds"][0]["reward"] for r in failed)   # a replay
    assert summary["failed_chains"] == len(failed) and summary["failed_retry_acc"] is not None
    assert summary["critique_value"] is summary["critique_value_se"] is summary["second_attempt_acc"] is None
    assert "note: at --temperature 0 the second attempt replays the first" in capsys.readouterr().out
    rows = [row(0, 0, ep(0., 3), ep(1.), second=0.), row(1, 0, ep(0., 3), ep(0.), second=0.)]
    assert ev.figures(rows, [1], 2)["critique_value"] == 0.5   # sampled: measured


def test_critic_swap_uses_the_other_checkpoints_critiques(checkpoints, tmp_path):
    solver, critic = checkpoints
    own, swapped = str(tmp_path / "own"), str(tmp_path / "swapped")
    ev.main(["--model", solver, "--out", own] + FAST)
    summary = ev.main(["--model", solver, "--critic_model", critic, "--out", swapped] + FAST)
    assert summary["critic_model"] == critic and summary["critique_tokens"] == 5
    rows, own_rows = read_samples(swapped), read_samples(own)
    retries = [rd for r in rows for rd in r["rounds"][1:]]
    assert retries and all("Tips from the previous critique: ZZZZZ" in rd["context"] for rd in retries)
    critiques = [rd for r in rows for rd in r["rounds"] if rd["critique"] is not None]
    assert critiques and all(rd["critique"] == "ZZZZZ" and not rd["critique_finished"] for rd in critiques)
    # The solver is still --model: the same seeds give the same first attempts, and the same second
    # attempts, as without the swap.
    first = lambda rs: [(r["rounds"][0]["text"], r["second_attempt_reward"]) for r in rs]
    assert first(rows) == first(own_rows)


def test_a_critic_with_fewer_positions_bounds_the_context(checkpoints, tmp_path, capsys):
    """Critic swap: C(x, tau) and its critique must fit the critic's positions, not only the solver's: the
    smaller of the two bounds the context (--max_context), and a critic with no room is refused before any
    weight loads."""
    solver, _ = checkpoints
    V = char_vocab_size(tmp_path)
    short = lambda n: save_checkpoint(icrl.Qwen3(icrl.Qwen3Config(
        vocab_size=V, **{**icrl.TINY_CONFIG, "max_position_embeddings": n})), tmp_path / f"critic{n}")
    summary = ev.main(["--model", solver, "--critic_model", short(200), "--out", str(tmp_path / "e")] + FAST)
    assert summary["max_context"] == 200
    assert "--critic_model" in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ev.Qwen3, "from_pretrained", lambda *a, **kw: pytest.fail("weights loaded"))
        assert "no room is left" in refusal(["--model", solver, "--critic_model", short(40), "--out",
                                             str(tmp_path / "e2")] + FAST, capsys)


def refusal(argv, capsys):
    """eval.main's refusal of a mistake: exit status 2 and one line on stderr (no traceback), returned."""
    with pytest.raises(SystemExit) as stop:
        ev.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def no_weights_load(monkeypatch):
    """Every refusal below comes before a weight is read."""
    def load(*args, **kwargs):
        raise AssertionError("weights loaded before the mistake was caught")
    monkeypatch.setattr(ev.Qwen3, "from_pretrained", load)


def test_critic_swap_errors(checkpoints, tmp_path, capsys, no_weights_load):
    solver, critic = checkpoints
    args = ["--model", solver, "--out", str(tmp_path / "out")] + FAST
    missing = str(tmp_path / "missing")
    assert f"--critic_model {missing}: no such folder" in refusal(args + ["--critic_model", missing], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in refusal(args + ["--critic_model", str(empty)], capsys)
    # A different vocabulary size.
    V = char_vocab_size(tmp_path)
    bigger = save_checkpoint(icrl.Qwen3(icrl.Qwen3Config(vocab_size=V + 5, **icrl.TINY_CONFIG)), tmp_path / "big")
    assert f"--critic_model {bigger} does not match --model {solver}: vocab_size {V + 5} vs {V}" in \
        refusal(args + ["--critic_model", bigger], capsys)
    # Same size, but two tokens swap ids.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(critic, shuffled)
    spec = json.load(open(shuffled / "tokenizer.json"))
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    json.dump(spec, open(shuffled / "tokenizer.json", "w"))
    assert "tokenizer vocabularies differ: token 'a' has id" in \
        refusal(args + ["--critic_model", str(shuffled)], capsys)
    assert not os.path.exists(tmp_path / "out")  # stopped before anything was sampled or written


def test_missing_model_is_a_clear_error(tmp_path, capsys, no_weights_load):
    assert f"--model {tmp_path / 'nope'}: no such folder" in \
        refusal(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")] + FAST, capsys)


@pytest.mark.parametrize("flag", ["--model", "--critic_model"])
@pytest.mark.parametrize("remove, message", [
    (("tokenizer.json", "tokenizer_config.json"), "no tokenizer files there"),
    (("model.safetensors",), "neither model.safetensors nor model.safetensors.index.json found")])
def test_a_folder_without_tokenizer_or_weights_is_one_line(checkpoints, tmp_path, capsys, no_weights_load, flag,
                                                           remove, message):
    solver, _ = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(solver, broken)
    for name in remove:
        os.remove(broken / name)
    argv = ["--model", solver, "--out", str(tmp_path / "out")] + FAST + [flag, str(broken)]
    assert f"{flag} {broken}: " in (err := refusal(argv, capsys)) and message in err



# ----------------------------------------------------------------------- the task the checkpoint was trained on
@pytest.fixture
def arithmetic_run(checkpoints, tmp_path):
    """A checkpoint folder as icrl.py leaves it after training on products of 3-digit numbers (trainer_state.json)."""
    folder = tmp_path / "final"
    shutil.copytree(checkpoints[0], folder)
    trained = icrl.parse_args(["--task", "arithmetic", "--task_knob", "digits=3", "--task_knob", "ops=*"])
    icrl.write_trainer_state(str(folder), 3, trained)
    return str(folder)


def task_of(argv):
    args = ev.parse_args(argv)
    return args.task, args.task_knob, args.env_url


def test_the_task_defaults_to_the_checkpoints(arithmetic_run, checkpoints, tmp_path, capsys):
    """Without --task, the task and knobs icrl.py trained --model on, with one line saying so (not boxes, which
    an arithmetic checkpoint scores 0 on); a plain Hugging Face folder keeps boxes."""
    state = os.path.join(arithmetic_run, "trainer_state.json")
    summary = ev.main(["--model", arithmetic_run, "--out", str(tmp_path / "eval")] + FAST[2:])
    out, err = capsys.readouterr()
    assert (summary["task"], summary["task_knob"]) == ("arithmetic", ["digits=3", "ops=*"]) and "warning" not in err
    assert (f"--task arithmetic --task_knob digits=3 ops=* --no-enable_thinking --max_turns 0 --max_context 0 "
            f"--obs_chars 800: from {state} (the run that trained --model)") in out   # the others were given
    questions = [r["question"] for r in read_samples(tmp_path / "eval")]
    assert all(re.fullmatch(r"[0-9]{3}\*[0-9]{3}", q) for q in questions), questions
    # --task given as saved: its knobs still come from the checkpoint (`make eval TASK=...` passes --task).
    assert task_of(["--model", arithmetic_run, "--task", "arithmetic"]) == ("arithmetic", ["digits=3", "ops=*"], None)
    assert capsys.readouterr().out == (
        f"--task_knob digits=3 ops=* --no-enable_thinking --max_new_tokens 16 --critic_max_new_tokens 24 --max_turns 0 "
        f"--max_context 0 --obs_chars 800: from {state} (the run that trained --model)\n")
    assert task_of(["--model", checkpoints[0]]) == ("boxes", [], None)
    assert capsys.readouterr().out == ""


def test_a_task_or_knob_other_than_the_checkpoints_is_warned_about(arithmetic_run, capsys):
    state = os.path.join(arithmetic_run, "trainer_state.json")
    assert task_of(["--model", arithmetic_run, "--task", "boxes"]) == ("boxes", [], None)
    err = capsys.readouterr().err.strip()
    assert err == f"warning: --task boxes differs from arithmetic, the task --model was trained on ({state})"
    assert task_of(["--model", arithmetic_run, "--task", "arithmetic", "--task_knob", "digits=2"]) == \
        ("arithmetic", ["digits=2"], None)
    err = capsys.readouterr().err.strip()
    assert err == f"warning: --task_knob digits=2 differs from digits=3 ops=*, --model's training ({state})"
    assert task_of(["--model", arithmetic_run, "--task_knob", "ops=*", "--task_knob", "digits=3"]) == \
        ("arithmetic", ["ops=*", "digits=3"], None)
    assert capsys.readouterr().err == ""


def test_other_knobs_take_the_tasks_own_turn_limit(checkpoints, tmp_path, capsys):
    """icrl.py saves the turn limit it took from its task's knobs (boxes: as many turns as tries); eval.py with
    other knobs plays the task those knobs make, whole, not cut to the checkpoint's limit."""
    folder = tmp_path / "boxes_run"
    shutil.copytree(checkpoints[0], folder)
    trained = icrl.parse_args(["--task", "boxes"])
    trained.max_turns = 2   # as icrl.py saves it: the task's own (boxes: one turn per try, 2 by default), resolved
    icrl.write_trainer_state(str(folder), 3, trained)
    assert ev.parse_args(["--model", str(folder)]).max_turns == trained.max_turns
    assert f"--max_turns {trained.max_turns}" in capsys.readouterr().out
    tries = trained.max_turns + 3
    args = ev.parse_args(["--model", str(folder), "--task_knob", f"tries={tries}"])
    assert args.max_turns == 0 and f"--max_turns {trained.max_turns}" not in capsys.readouterr().out   # 0: the task's own
    summary = ev.main(["--model", str(folder), "--task_knob", f"tries={tries}", "--out", str(tmp_path / "eval"),
                       "--max_examples", "2", "--n", "1", "--rounds", "1"])
    assert summary["max_turns"] == tries
    assert ev.parse_args(["--model", str(folder), "--task_knob", f"tries={tries}", "--max_turns", "2"]).max_turns == 2
    # a limit given to icrl.py (not its knobs' own) stays, whatever the knobs
    trained.max_turns = 3
    icrl.write_trainer_state(str(folder), 3, trained)
    assert ev.parse_args(["--model", str(folder), "--task_knob", f"tries={tries}"]).max_turns == 3


@pytest.fixture
def thinking_run(checkpoints, tmp_path):
    """A checkpoint trained with other episode settings than eval.py's defaults, --enable_thinking among them."""
    folder = tmp_path / "thinking"
    shutil.copytree(checkpoints[0], folder)
    trained = icrl.parse_args(["--task", "arithmetic", "--enable_thinking", "--max_new_tokens", "7",
                               "--critic_max_new_tokens", "5", "--max_turns", "1", "--max_context", "900",
                               "--obs_chars", "50"])
    icrl.write_trainer_state(str(folder), 3, trained)
    return str(folder)


def test_episode_settings_default_to_the_checkpoints(thinking_run, tmp_path, capsys):
    """Not given, the episode settings are those the run that trained --model used (--enable_thinking changes
    S(x) itself), said in the same one line as the task; a flag given wins."""
    state = os.path.join(thinking_run, "trainer_state.json")
    args = ev.parse_args(["--model", thinking_run])
    assert (args.enable_thinking, args.max_new_tokens, args.critic_max_new_tokens, args.max_turns, args.max_context,
            args.obs_chars) == (True, 7, 5, 1, 900, 50)
    assert capsys.readouterr().out == (
        f"--task arithmetic --enable_thinking --max_new_tokens 7 --critic_max_new_tokens 5 --max_turns 1 "
        f"--max_context 900 --obs_chars 50: from {state} (the run that trained --model)\n")
    args = ev.parse_args(["--model", thinking_run, "--no-enable_thinking", "--max_new_tokens", "3", "--obs_chars", "60"])
    assert (args.enable_thinking, args.max_new_tokens, args.critic_max_new_tokens, args.obs_chars) == (False, 3, 5, 60)
    assert "--enable_thinking" not in capsys.readouterr().out
    summary = ev.main(["--model", thinking_run, "--out", str(tmp_path / "eval"), "--max_examples", "2", "--n", "1"])
    assert (summary["enable_thinking"], summary["max_new_tokens"], summary["max_context"]) == (True, 7, 900)
    first = read_samples(tmp_path / "eval")[0]["rounds"][0]
    assert "<think>" not in first["context"] and first["action_tokens"] <= 7   # no empty think block: thinking on
    # a checkpoint of another run's defaults (no trainer_state.json): eval.py's own
    assert task_of(["--model", str(tmp_path / "nowhere")])[0] == "boxes"
    args = ev.parse_args(["--model", str(tmp_path / "nowhere")])
    assert (args.enable_thinking, args.max_new_tokens, args.critic_max_new_tokens, args.max_turns, args.max_context,
            args.obs_chars) == (False, 16, 24, 0, 0, 800)


def test_a_damaged_trainer_state_is_one_line_unless_task_is_given(arithmetic_run, tmp_path, capsys, no_weights_load):
    state = os.path.join(arithmetic_run, "trainer_state.json")
    with open(state, "w") as f:
        f.write('{"step": 3, "ar')
    err = refusal(["--model", arithmetic_run, "--out", str(tmp_path / "out")], capsys)
    assert f"{state}: cannot be read, truncated or damaged" in err and "pass --task" in err
    assert task_of(["--model", arithmetic_run, "--task", "gsm8k"]) == ("gsm8k", [], None)   # not needed: ignored


GSM8K = os.path.join(ROOT, "tests", "data", "gsm8k_sample.jsonl")


@pytest.mark.parametrize("flags, message", [
    (["--task", "nosuch"], "unknown task 'nosuch'"),
    (["--task", "boxes", "--eval_file", GSM8K], "boxes is synthetic and reads no file (icrl.py: --train_file, --eval_file; eval.py: --eval_file)"),
    (["--task", "math"], "math reads a JSONL file: pass path= (icrl.py: --train_file, --eval_file; eval.py: --eval_file)"),
    (["--task", "gsm8k", "--eval_file", "/nonexistent.jsonl"], "data file not found: /nonexistent.jsonl"),
    (["--task", "boxes", "--task_knob", "boxs=3"], "--task_knob boxs=3: boxes has no knob 'boxs'"),
    (["--task", "boxes", "--task_knob", "boxes=abc"], "--task_knob boxes=abc: knob boxes of boxes takes an integer"),
    (["--task", "boxes", "--task_knob", "foo"], "--task_knob 'foo': expected KEY=VALUE"),
    (["--task", "boxes", "--env_url", "http://127.0.0.1:1"], "--env_url is for agentgym:* tasks"),
    (["--task", "gsm8k", "--eval_file", GSM8K, "--split", "train"], "--split train: --eval_file"),
    (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--critic_max_new_tokens", "-3"], "--critic_max_new_tokens -3: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--rounds", "zero"], "--rounds: invalid int value"),
])
def test_bad_flags_are_one_line_before_any_weight_loads(checkpoints, tmp_path, capsys, no_weights_load, flags,
                                                        message):
    solver, _ = checkpoints
    out = tmp_path / "out"
    assert message in refusal(["--model", solver, "--out", str(out)] + flags, capsys)
    assert not out.exists()


def test_out_is_a_writable_folder_before_any_weight_loads(checkpoints, tmp_path, capsys, monkeypatch):
    """A bad --out would otherwise be found after the whole evaluation, losing it."""
    solver, _ = checkpoints
    afile = tmp_path / "afile"
    afile.write_text("")
    with monkeypatch.context() as m:
        m.setattr(ev.Qwen3, "from_pretrained", lambda *a, **kw: pytest.fail("weights loaded"))
        for out in (afile, afile / "eval"):
            assert f"--out {out}: not a writable folder" in refusal(["--model", solver, "--out", str(out)] + FAST,
                                                                   capsys)
    out, seen = tmp_path / "new" / "eval", []

    def load(*args, **kwargs):
        seen.append(os.path.isdir(out))
        raise KeyboardInterrupt  # stop there
    monkeypatch.setattr(ev.Qwen3, "from_pretrained", load)
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--model", solver, "--out", str(out)] + FAST)
    assert seen == [True] and os.listdir(out) == []   # created, and nothing left in it


def test_two_ranks_equal_one_process(checkpoints, tmp_path):
    """Batches are dealt round-robin and seeded by their index: the ranks' gathered records are exactly
    the single process's (5 examples in 3 batches of 2: rank 0 samples batches 0 and 2, rank 1 batch 1)."""
    solver, _ = checkpoints
    script = os.path.join(ROOT, "eval.py")
    # torchrun's own parser rejects a later `--n` (an abbreviation of its --nnodes...): use --samples.
    flags = ["--model", solver, "--task", "arithmetic", "--max_examples", "5", "--batch_examples", "2",
             "--samples", "2", "--max_new_tokens", "6", "--critic_max_new_tokens", "5", "--rounds", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for nproc, out in ((1, "one"), (2, "two")):
        launch = [sys.executable, script] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
        subprocess.run(launch + flags + ["--out", str(tmp_path / out)], check=True, cwd=ROOT, env=env,
                       timeout=240, capture_output=True)
    assert read_samples(tmp_path / "one") == read_samples(tmp_path / "two")
    one, two = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert two["world_size"] == 2 and two["examples"] == 5
    drop = lambda s: {k: v for k, v in s.items() if k not in ("world_size", "seconds")}
    assert drop(one) == drop(two)


def test_a_failing_rank_stops_the_evaluation_with_its_error_instead_of_hanging(checkpoints, tmp_path):
    """Rank 1 raises (as when its AgentGym server stops answering) while rank 0 waits in the gather: the
    evaluation ends, nonzero, with rank 1's error in the output, instead of rank 1 waiting at its shutdown
    barrier until the collective times out (tests/dist_fail.py)."""
    solver, _ = checkpoints
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_fail.py"), "eval", str(tmp_path / "eval"), solver]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its ranks (each in a session of its own) on SIGTERM
        proc.communicate(timeout=60)
        pytest.fail("the evaluation hung after rank 1 failed")
    assert proc.returncode != 0 and "rank 1 fails here" in output
