"""eval.py (SPEC §4): the pass@k estimator and the figures by hand, end to end on a tiny checkpoint, the
critic swap with a critic whose critiques are recognisable, clear errors, and 2 ranks == 1 process."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
import icrl
from data import build_char_tokenizer, visible_response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_k_above_n_is_a_clear_cli_error(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--n", "2", "--k", "1", "--k", "3"])
    assert "--k 3: pass@k needs 1 <= k <= n, and --n is 2" in capsys.readouterr().err
    assert ev.parse_args(["--n", "3"]).k == [1, 3]  # default: pass@1 and pass@n
    assert ev.parse_args(["--n", "8", "--k", "4", "--k", "1"]).k == [1, 4]
    assert ev.parse_args(["--samples", "8", "--k", "8"]).k == [1, 8]  # pass@1 always; --samples is --n


# -------------------------------------------------------------------------------------------- figures
def attempt(r, r2, critique_tokens):
    return dict(reward=r, refined_reward=r2, critique_tokens=critique_tokens, response_tokens=3,
                refinement_tokens=5)


def test_figures_by_hand():
    # example 0: attempts (r, r') = (0,1) (0,0) (1,1) (1,0); example 1: (0,0) (0,1) (0,1) (0,0)
    records = [{"attempts": [attempt(0., 1., 4), attempt(0., 0., 6), attempt(1., 1., 2), attempt(1., 0., 8)]},
               {"attempts": [attempt(0., 0., 1), attempt(0., 1., 3), attempt(0., 1., 5), attempt(0., 0., 7)]}]
    f = ev.figures(records, [1, 2, 4])
    assert f["pass@1"] == pytest.approx((2 / 4 + 0) / 2)                     # 0.25
    assert f["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)                 # 1 - C(2,2)/C(4,2) = 5/6
    assert f["pass@4"] == pytest.approx((1 + 0) / 2)
    assert f["self_critique_acc"] == pytest.approx(4 / 8)
    assert f["fix_rate"] == pytest.approx(3 / 6)                             # 6 wrong attempts, 3 fixed
    assert f["break_rate"] == pytest.approx(1 / 2)                           # 2 right attempts, 1 broken
    assert f["critique_tokens"] == pytest.approx(36 / 8)
    assert f["internalisation_gap"] == pytest.approx(0.5 - 0.25)
    assert (f["examples"], f["attempts"]) == (2, 8)
    # No right attempt at all: the break rate is undefined (null), not 0.
    assert ev.figures(records[1:], [1])["break_rate"] is None


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


FIELDS = {"example", "id", "question", "answer", "attempt", "prompt", "response", "reward", "response_tokens",
          "response_finished", "critic_prompt", "critique", "critique_tokens", "critique_finished",
          "refiner_prompt", "refinement", "refined_reward", "refinement_tokens", "refinement_finished"}


def test_end_to_end(checkpoints, tmp_path, capsys):
    solver, _ = checkpoints
    out = str(tmp_path / "eval")
    summary = ev.main(["--model", solver, "--out", out, "--k", "1", "--k", "2", "--batch_examples", "2"] + FAST)
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary)) and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for key in ("pass@1", "pass@2", "self_critique_acc", "fix_rate", "break_rate", "internalisation_gap"):
        assert key in on_disk
        v = on_disk[key]
        assert v is None or (-1.0 if key == "internalisation_gap" else 0.0) <= v <= 1.0, key
    assert 1 <= on_disk["critique_tokens"] <= 5
    assert (on_disk["n"], on_disk["examples"], on_disk["attempts"], on_disk["critic_model"]) == (2, 3, 6, None)
    assert on_disk["pass@1"] <= on_disk["pass@2"]
    rows = read_samples(out)
    assert len(rows) == 3 * 2 and all(set(r) == FIELDS for r in rows)
    assert [(r["example"], r["attempt"]) for r in rows] == [(e, a) for e in range(3) for a in range(2)]
    for r in rows:
        assert r["question"] in r["prompt"] and "<|im_start|>user" in r["prompt"]  # decoded, chat markup kept
        assert r["question"] in r["critic_prompt"] and r["answer"] not in r["critic_prompt"].split("Attempt:")[0]
        assert visible_response(r["critique"]) in r["refiner_prompt"]  # reasoning removed (SPEC §1)
        assert r["reward"] in (0.0, 1.0) and r["refined_reward"] in (0.0, 1.0)
        assert r["reward"] == 0.0 or r["response_finished"]  # SPEC §1: cut off scores 0
    assert any(r["critique"] != "Z" * len(r["critique"]) for r in rows)  # a self-critique is no 'ZZZ...'
    printed = capsys.readouterr().out
    assert "self_critique_acc" in printed and "internalisation_gap" in printed


def test_critic_swap_uses_the_other_checkpoints_critiques(checkpoints, tmp_path):
    solver, critic = checkpoints
    own, swapped = str(tmp_path / "own"), str(tmp_path / "swapped")
    ev.main(["--model", solver, "--out", own] + FAST)
    summary = ev.main(["--model", solver, "--critic_model", critic, "--out", swapped] + FAST)
    assert summary["critic_model"] == critic and summary["critique_tokens"] == 5
    rows, own_rows = read_samples(swapped), read_samples(own)
    assert all(r["critique"] == "ZZZZZ" and not r["critique_finished"] for r in rows)
    assert all("Feedback: ZZZZZ" in r["refiner_prompt"] for r in rows)
    # The solver is still --model: the same seeds give the same attempts as without the swap.
    assert [r["response"] for r in rows] == [r["response"] for r in own_rows]


def test_critic_swap_errors(checkpoints, tmp_path):
    solver, critic = checkpoints
    args = ["--model", solver, "--out", str(tmp_path / "out")] + FAST
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match=f"--critic_model {missing}: no such checkpoint folder"):
        ev.main(args + ["--critic_model", missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no config.json there"):
        ev.main(args + ["--critic_model", str(empty)])
    # A different vocabulary size.
    V = char_vocab_size(tmp_path)
    bigger = save_checkpoint(icrl.Qwen3(icrl.Qwen3Config(vocab_size=V + 5, **icrl.TINY_CONFIG)), tmp_path / "big")
    with pytest.raises(SystemExit, match=rf"--critic_model {bigger} does not match --model {solver}: "
                                         rf"vocab_size {V + 5} vs {V}"):
        ev.main(args + ["--critic_model", bigger])
    # Same size, but two tokens swap ids.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(critic, shuffled)
    spec = json.load(open(shuffled / "tokenizer.json"))
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    json.dump(spec, open(shuffled / "tokenizer.json", "w"))
    with pytest.raises(SystemExit, match=r"tokenizer vocabularies differ: token 'a' has id"):
        ev.main(args + ["--critic_model", str(shuffled)])
    assert not os.path.exists(tmp_path / "out")  # stopped before anything was sampled or written


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=f"--model {tmp_path / 'nope'}: no such checkpoint folder"):
        ev.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")] + FAST)


def test_two_ranks_equal_one_process(checkpoints, tmp_path):
    """Batches are dealt round-robin and seeded by their index: the ranks' gathered records are exactly
    the single process's (5 examples in 3 batches of 2: rank 0 samples batches 0 and 2, rank 1 batch 1)."""
    solver, _ = checkpoints
    script = os.path.join(ROOT, "eval.py")
    # torchrun's own parser rejects a later `--n` (an abbreviation of its --nnodes...): use --samples.
    flags = ["--model", solver, "--task", "arithmetic", "--max_examples", "5", "--batch_examples", "2",
             "--samples", "2", "--max_new_tokens", "6", "--critic_max_new_tokens", "5"]
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
