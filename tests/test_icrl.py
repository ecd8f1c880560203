"""icrl.py beyond the equations: the built batch, masks, distributed gradients, NaN safety, resume."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import icrl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def response(tokens, reward, finished=True):
    return icrl.Response(tokens, [-0.5] * len(tokens), finished, "", reward)


def fake_rollout(q):
    """Query q: S(x) = [q]*3, two attempts, critic contexts C_i, refiner contexts F_i."""
    return icrl.QueryRollout(
        example=None, solver_context=[q] * 3,
        attempts=[response([10, 11], 0.0), response([12], 1.0)],
        critic_contexts=[[20, q], [21, q]], critiques=[response([30, 31, 32], 0.0), response([33], 0.0)],
        refiner_contexts=[[40, q, 41], [42, q, 43]], refinements=[response([50, 51], 1.0), response([52], 0.0)])


def test_built_batch_trains_refinements_under_the_solver_context():
    per_query = icrl.build_samples([fake_rollout(1), fake_rollout(2)])
    for q, samples in zip([1, 2], per_query):
        attempts, refinements, critiques = samples[:2], samples[2:4], samples[4:]
        # SPEC §2.7 table, token by token: the refinement y' is trained under S(x), its l_cond under F.
        assert [s.context for s in refinements] == [[q] * 3, [q] * 3]
        assert [s.response for s in refinements] == [[50, 51], [52]]
        assert [s.calib_context for s in refinements] == [[40, q, 41], [42, q, 43]]
        assert [s.context for s in attempts] == [[q] * 3, [q] * 3] and not any(s.is_critic for s in attempts)
        assert [s.context for s in critiques] == [[20, q], [21, q]] and all(s.is_critic for s in critiques)
        assert [s.response for s in critiques] == [[30, 31, 32], [33]]
        # solver group {r} + {r'} = {0, 1, 1, 0}: mean 1/2, std sqrt(1/3) -> A = -/+ 0.866
        a = 0.5 / (3 ** -0.5 + 1e-6)
        assert [s.adv for s in attempts + refinements] == pytest.approx([-a, a, a, -a], abs=1e-5)
        # critic group: gains {1 - 0, 0 - 1} = {1, -1}: std sqrt(2) -> A = +/- 0.7071
        assert [s.adv for s in critiques] == pytest.approx([2 ** -0.5, -(2 ** -0.5)], abs=1e-5)


def test_built_batch_ablations():
    grpo = icrl.build_samples([fake_rollout(1)], algo="grpo")[0]
    assert len(grpo) == 2 and [s.adv for s in grpo] == pytest.approx([-2 ** -0.5, 2 ** -0.5], abs=1e-5)
    frozen = icrl.build_samples([fake_rollout(1)], train_critic=False)[0]
    assert len(frozen) == 4 and not any(s.is_critic for s in frozen)
    # pooled: one group {0, 1, 1, 0, 1, -1}: mean 1/3, Bessel var = (4 * 1/9 * ... ) worked below
    pooled = icrl.build_samples([fake_rollout(1)], adv_mode="pooled")[0]
    values = [0, 1, 1, 0, 1, -1]
    mean = 1 / 3
    std = (sum((v - mean) ** 2 for v in values) / 5) ** 0.5  # = sqrt(10/3 / 5) = 0.8165
    assert std == pytest.approx(0.816497, abs=1e-6)
    assert [s.adv for s in pooled] == pytest.approx([(v - mean) / (std + 1e-6) for v in values], abs=1e-5)


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


def run_update(out, nproc=1, fsdp=False):
    script = os.path.join(ROOT, "tests", "dist_update.py")
    cmd = [sys.executable, script, out] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + (["--fsdp"] if fsdp else []), check=True, cwd=ROOT, env=env, timeout=240)
    return torch.load(out)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_gradient_equals_one_process(tmp_path, fsdp):
    from dist_update import CONFIG
    from model import Qwen3, Qwen3Config
    single = run_update(str(tmp_path / "one.pt"))
    double = run_update(str(tmp_path / "two.pt"), nproc=2, fsdp=fsdp)
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


TINY_RUN = ["--warm_start_steps", "2", "--warm_start_role_steps", "1", "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "6",
            "--critic_max_new_tokens", "6", "--eval_examples", "4", "--eval_every", "0", "--micro_batch", "8"]


def test_resume_ends_with_the_same_weights(tmp_path):
    straight, first = str(tmp_path / "straight"), str(tmp_path / "first")
    icrl.main(TINY_RUN + ["--steps", "3", "--out", straight])
    icrl.main(TINY_RUN + ["--steps", "1", "--out", first, "--save_every", "1"])
    icrl.main(TINY_RUN + ["--steps", "3", "--out", first, "--resume", first])
    a = load_file(os.path.join(straight, "final", "model.safetensors"))
    b = load_file(os.path.join(first, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in open(os.path.join(first, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    for key in ("acc", "refined_acc", "fix_rate", "break_rate", "gain", "calib_w_mean", "calib_w_p10",
                "calib_w_low_frac", "len_solver", "len_critic", "loss_solver", "loss_critic", "clip_frac",
                "grad_norm", "logprob_gap", "tok_per_s", "t_sample", "t_score", "t_train", "eval_acc", "eval_acc_greedy"):
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
    # RL's starting point is kept, so another algorithm can start from the same weights (--model).
    assert sorted(os.listdir(out)) == ["final", "latest", "metrics.jsonl", "warm_start"]
    rl_start = os.path.join(out, "warm_start")
    assert icrl.Qwen3.from_pretrained(rl_start).config.vocab_size == ours.config.vocab_size
    assert AutoTokenizer.from_pretrained(rl_start).vocab == tokenizer.vocab
    assert torch.load(os.path.join(rl_start, icrl.TRAINER_STATE), weights_only=False)["step"] == 0


def test_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    icrl.main(TINY_RUN + ["--steps", "2", "--save_every", "1", "--out", out])
    before = load_file(os.path.join(out, "step_1", "model.safetensors"))

    def killed(*args, **kwargs):  # the process dies after the weights, before the trainer state
        raise KeyboardInterrupt

    monkeypatch.setattr(icrl.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        icrl.main(TINY_RUN + ["--steps", "4", "--save_every", "1", "--out", out, "--resume", out])
    monkeypatch.undo()
    assert open(os.path.join(out, "latest")).read().strip() == "final"   # still the last whole one
    assert not os.path.exists(os.path.join(out, "step_3"))
    assert icrl.resolve_checkpoint(out) == os.path.join(out, "final")
    after = load_file(os.path.join(out, "step_1", "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        icrl.resolve_checkpoint(os.path.join(out, ".tmp-step_3"))


def test_fsdp_run_samples_with_the_trained_weights(tmp_path):
    """2 ranks, FSDP2 over gloo, a whole run: the rollout gathers the sharded weights (SPEC §3's
    logprob_gap: sampler vs trainer log-probs stays at float noise) and the checkpoint is whole."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "icrl.py"), "--fsdp", "--steps", "2", "--out", out] + TINY_RUN
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["logprob_gap"] < 1e-4 for m in lines)
    assert icrl.Qwen3.from_pretrained(os.path.join(out, "final")).config.num_hidden_layers == 4
