"""Issue 14 on the CPU: what Qwen3-4B/8B need at scale, tested on tiny models.

Item 2, FSDP2 gradient memory during accumulation (2 gloo ranks); item 3, the optimizer saved sharded with
torch.distributed.checkpoint and a bit-exact resume on 2 gloo ranks (DDP and FSDP2); item 5, log-probs in
chunks of positions with the head in float32 (equal to the whole-vocabulary ones, values and gradients, in one
process and on 2 ranks under DDP and FSDP2); item 4, bfloat16 rollouts from one bfloat16 copy; item 6,
--top_p < 1 semantics; item 8, host reads in the update loop. tests/test_cuda.py has the GPU checks
(make gpu-check)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import icrl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- item 2
def test_fsdp_gradient_memory_per_rank_is_a_shard(tmp_path):
    """2 gloo ranks, FSDP2, 10 micro-batches per optimizer step: after every micro-batch's backward a rank
    holds float32 gradients of its shard only, 4 / world_size bytes per global parameter (with
    set_requires_gradient_sync(False) it was 4.0 bytes per global parameter until the last micro-batch),
    in float32 and in bfloat16 compute. test_icrl.py's 2-process == 1-process test covers the gradients."""
    out = str(tmp_path / "grad_memory.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_grad_memory.py"), out]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    with open(out) as f:
        figures = json.load(f)
    n, world = figures["params"], figures["world"]
    for rank, by_dtype in enumerate(figures["bytes_per_rank"]):
        for dtype, after_each_backward in by_dtype.items():
            # 10 samples on rank 0, 13 on rank 1: both run 13 backward passes (icrl.even_passes pads rank 0)
            assert len(after_each_backward) == 13, (rank, dtype)
            per_param = [b / n for b in after_each_backward]
            # shards are padded to a multiple of world_size rows: a few bytes over 4 / world at most
            assert all(4 / world <= x < 4 / world * 1.02 for x in per_param), (rank, dtype, per_param)


# ------------------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sharded_optimizer_resume_is_bit_exact_on_two_ranks(tmp_path, fsdp):
    """2 gloo ranks (tests/dist_resume.py): 4 AdamW steps straight, against 2 steps, icrl.save_checkpoint,
    a resume as icrl.py does it (weights from the checkpoint, optimizer through DCP) and 2 more: every rank's
    weights and AdamW state are bit for bit the same. Each tensor is written once (DDP's replicated state
    deduplicated); under FSDP2 each rank's file holds about half the AdamW moments, its own shard. The same
    checkpoint loads under the other wrapping (2 ranks) and in one process without a process group: the
    optimizer state is the one saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_resume.py"), str(tmp_path)] + (["--fsdp"] if fsdp else [])
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["resumed_at"] == 2 and result["moved"]
    assert result["differ"] == [] and result["other_wrapping_differ"] == []
    files = {name: size for name, size in result["files"].items() if name != ".metadata"}
    assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"]
    moments = 2 * 4 * result["params"]  # exp_avg and exp_avg_sq in float32; `step` and framing are small
    assert moments < sum(files.values()) < 1.1 * moments
    if fsdp:
        assert all(0.45 * moments < size < 0.55 * moments for size in files.values()), (files, moments)

    checkpoint = str(tmp_path / "run" / "step_2")
    model = icrl.load_model(icrl.parse_args(["--resume", checkpoint]), icrl.Dist(), tokenizer=None)
    optimizer = torch.optim.AdamW(model.parameters())
    icrl.load_optimizer(model, optimizer, checkpoint)
    ours = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))["state"]
    saved = torch.load(tmp_path / "full_optimizer.pt")["state"]
    assert sorted(ours) == sorted(saved)
    for name in saved:
        assert all(torch.equal(ours[name][k], saved[name][k]) for k in ("step", "exp_avg", "exp_avg_sq")), name


# ------------------------------------------------------------------------------------------- item 5
def small_model(vocab_size=1000, seed=0, tie=False):
    from model import Qwen3, Qwen3Config
    torch.manual_seed(seed)
    return Qwen3(Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie))


class LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any tensor an aten op returns while active (forward and backward) that has a
    vocabulary-sized dimension and no hidden-sized one: logits and their kin, not the head's weight."""

    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.vocab_size, self.hidden_size, self.numel = vocab_size, hidden_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.vocab_size in t.shape and self.hidden_size not in t.shape:
                self.numel = max(self.numel, t.numel())
        return out


def batch(vocab_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab_size, (n,), generator=gen).tolist()
    contexts = [ids(n) for n in (5, 9, 3, 7)]
    responses = [ids(n) for n in (6, 2, 11, 4)]
    masks = [[1] * 6, [1, 0], [1] * 5 + [0] * 3 + [1] * 3, None]
    return contexts, responses, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_chunked_logprobs_equal_unchunked(monkeypatch, tie, dtype):
    """response_logprobs in chunks of 3 positions (8 chunks of a 23-position batch) equals the (B, T, V)
    log_softmax of model(ids, logits_at=...): to 1e-6 in float32, and so do the gradients of every parameter
    relative to their scale (float32 sums in another order); to 1e-12 both in float64. No op returns a tensor
    with a vocabulary-sized dimension larger than a chunk's (3, V) logits (the (B, T, V) path: 4 x 11 x V)."""
    import model as model_module
    vocab, temperature = 1000, 0.7
    model = small_model(vocab, tie=tie).to(dtype)
    contexts, responses, masks = batch(vocab)
    ids, targets, mask, positions = icrl.pad_batch(contexts, responses, "cpu", masks)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    tol, grad_tol = (1e-6, 2e-6) if dtype == torch.float32 else (1e-12, 1e-12)

    with LargestLogits(vocab, 32) as unchunked:
        reference = torch.log_softmax(model(ids, logits_at=positions) / temperature, -1)
        reference = reference.gather(-1, targets[..., None])[..., 0] * mask
        (reference * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(model_module, "LOGPROB_CHUNK_ELEMENTS", 3 * vocab)
    with LargestLogits(vocab, 32) as largest:
        logp, logp_mask = icrl.response_logprobs(model, contexts, responses, temperature, "cpu", masks)
        (logp * weights).sum().backward()
    assert torch.equal(logp_mask, mask.to(logp_mask.dtype)) and logp.dtype == dtype
    assert (logp - reference).abs().max() <= tol
    for n, p in model.named_parameters():
        scale = max(1.0, float(ref_grads[n].abs().max()))
        assert (p.grad - ref_grads[n]).abs().max() <= grad_tol * scale, n
    assert largest.numel == 3 * vocab and unchunked.numel == ids.shape[0] * mask.shape[1] * vocab

    with torch.no_grad():  # the no-grad pass (old_logprobs) takes the same chunks, without checkpointing
        logp, _ = icrl.response_logprobs(model, contexts, responses, temperature, "cpu", masks)
        assert (logp - reference).abs().max() <= tol


def test_logprob_head_is_float32_under_bf16_autocast():
    """Under --dtype bfloat16 (DDP's autocast) the layers compute in bfloat16, the head and log-softmax in
    float32: the log-probs equal a float32 head applied to the same hidden states, not bfloat16 logits."""
    from model import token_logprobs
    model = small_model(1000)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=gen).bfloat16() * 4   # logits of a few units, as a trained model's
    targets = torch.randint(0, 1000, (40,), generator=gen)
    head = model.lm_head.weight * 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_logprobs(h, head, targets, chunk_rows=7)
        coarse = torch.log_softmax((h @ head.t()).float(), -1).gather(1, targets[:, None])[:, 0]  # bf16 logits
    exact = torch.log_softmax(h.double() @ head.double().t(), -1).gather(1, targets[:, None])[:, 0]
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < 1e-5 < (coarse.double() - exact).abs().max()


# ------------------------------------------------------------------------------------------- item 4
@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    from data import build_char_tokenizer
    path = str(tmp_path_factory.mktemp("tok"))
    build_char_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


class WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dtype casts of weight-shaped matrices (either orientation) and matmuls, while active."""

    def __init__(self, model):
        super().__init__()
        self.shapes = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape[::-1]))}
        self.casts = self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(("aten.to.", "aten._to_copy.")) and tuple(args[0].shape) in self.shapes \
                and out.dtype != args[0].dtype:
            self.casts += 1
        if name.startswith(("aten.mm.", "aten.addmm.")):
            self.matmuls += 1
        return out


def test_bf16_rollout_samples_from_one_bfloat16_copy(monkeypatch, char_tokenizer):
    """--dtype bfloat16 without FSDP: a rollout (solve, critique, retry: 3 sampling calls) samples from one
    bfloat16 copy of the weights made when full_weights is entered, with a bfloat16 KV cache, and casts no
    weight while decoding (under autocast every decode step re-cast them all); the sampler's log-probs stay
    within bfloat16 noise of the trainer's (autocast) log-probs of the same tokens."""
    import model as model_module
    from data import load_task
    model = small_model(len(char_tokenizer), tie=True)
    args = icrl.parse_args(["--dtype", "bfloat16", "--max_new_tokens", "4", "--critic_max_new_tokens", "4", "--max_turns", "1"])
    task = load_task("arithmetic", n=4)
    copies, sampled_with, caches = [], [], []
    cast_copy, generate, Decoder = model_module.Qwen3.cast_copy, icrl.generate, model_module.Decoder

    def counted_copy(self, dtype):
        copies.append(dtype)
        return cast_copy(self, dtype)

    class RecordingDecoder(Decoder):
        def _new_cache(self, batch):
            cache = super()._new_cache(batch)
            caches.append(cache.v.dtype)
            return cache

    def recorded_generate(m, *a, **k):
        sampled_with.append(m)
        return generate(m, *a, **k)

    monkeypatch.setattr(model_module.Qwen3, "cast_copy", counted_copy)
    monkeypatch.setattr(model_module, "Decoder", RecordingDecoder)
    monkeypatch.setattr(icrl, "generate", recorded_generate)
    cfg = icrl.sampling_config(args, group_size=2)
    with icrl.full_weights(model, args) as m, WeightCasts(model) as counter:
        rollouts, _ = icrl.rollout(m, char_tokenizer, task, task.examples[:1], cfg, seed=0)
    assert copies == [torch.bfloat16] and m is not model
    assert len(sampled_with) == 3 and all(x is m for x in sampled_with)   # solve, critique, retry
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    assert caches and set(caches) == {torch.bfloat16}
    assert counter.casts == 0 and counter.matmuls > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())      # the trained weights are untouched

    # What it replaces: autocast over the float32 weights casts weights on every decode step.
    with torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts(model) as old:
        generate(model, [[1, 2, 3]] * 3, 16, seed=0)
    assert old.casts >= 16 * len(model.model.layers)

    # Sane: the trainer (float32 weights under autocast, float32 head) scores the sampled tokens alike.
    samples = [s for qs in icrl.build_samples(rollouts) for s in qs]
    assert len(samples) >= 4 and any(s.calib_context is not None for s in samples)
    with icrl.autocast_for(model, args):
        icrl.old_logprobs(model, samples, args, icrl.Dist())
    gap = max(float((torch.tensor(s.sampler_logprobs) - (s.cond_logp if s.calib_context else s.old_logp)).abs().max())
              for s in samples)
    assert gap < 0.1, gap


# ------------------------------------------------------------------------------------------- item 6
def forward_logprobs(model, prompt, tokens, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_sampler_reports_truncated_and_full_logprobs():
    """generate with top_p < 1: `logprobs` are under the truncated, renormalised distribution sampled from
    (SPEC §5), `full_logprobs` under the full softmax(logits / T) (what the trainer computes); the two differ
    by the nucleus' log-mass, which is <= 0. With top_p = 1 they are one list."""
    from model import generate
    model = small_model(200).eval()
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]] * 2
    gens = generate(model, prompts, 12, temperature=0.8, top_p=0.5, seed=1)
    shifts = []
    for prompt, g in zip(prompts, gens):
        full = forward_logprobs(model, prompt, g.tokens, 0.8)
        assert (torch.tensor(g.full_logprobs) - full).abs().max() < 1e-5
        shifts += (torch.tensor(g.full_logprobs) - torch.tensor(g.logprobs)).tolist()   # log Z <= 0
    assert max(shifts) <= 1e-6 and min(shifts) < -0.1
    gens = generate(model, prompts, 12, temperature=0.8, top_p=1.0, seed=1)
    assert all(g.full_logprobs is g.logprobs for g in gens)
    for prompt, g in zip(prompts, gens):
        assert (torch.tensor(g.logprobs) - forward_logprobs(model, prompt, g.tokens, 0.8)).abs().max() < 1e-5


def test_top_p_training_logprobs_are_of_the_full_softmax(monkeypatch, char_tokenizer):
    """SPEC §2.7-2.8 with --top_p 0.7 (the comment above icrl.old_logprobs): l_old, l_free and l_cond are
    the full softmax at the temperature, equal to the sampler's full_logprobs that episodes and critiques
    keep (logprob_gap at float noise), and rho = 1 on the first pass; the truncated log-probs the sampler
    drew with differ from them."""
    from data import load_task
    model = small_model(len(char_tokenizer), seed=3, tie=True)
    args = icrl.parse_args(["--top_p", "0.7", "--temperature", "0.9", "--max_new_tokens", "6",
                            "--critic_max_new_tokens", "6", "--max_turns", "1"])
    task = load_task("arithmetic", n=4)
    truncated = {}
    generate = icrl.generate

    def recorded(m, prompts, *a, **k):
        gens = generate(m, prompts, *a, **k)
        for p, g in zip(prompts, gens):
            truncated[(tuple(p), tuple(g.tokens))] = g.logprobs
        return gens

    monkeypatch.setattr(icrl, "generate", recorded)
    rollouts, _ = icrl.rollout(model, char_tokenizer, task, task.examples[:2], icrl.sampling_config(args, 2), seed=0)
    samples = [s for qs in icrl.build_samples(rollouts) for s in qs]
    assert {s.is_critic for s in samples} == {False, True} and any(s.calib_context for s in samples)
    icrl.old_logprobs(model, samples, args, icrl.Dist())
    gap = 0.0
    for s in samples:
        reference = s.cond_logp if s.calib_context is not None else s.old_logp
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        gap = max(gap, float((torch.tensor(s.sampler_logprobs)[mask] - reference[mask]).abs().max()))
    assert gap < 2e-5
    # the distribution sampled from is another one: its log-probs sit above the full ones (log Z < 0)
    firsts = [s for s in samples if not s.is_critic and s.calib_context is None]
    drawn = [torch.tensor(truncated[(tuple(s.context), tuple(s.response))]) - torch.tensor(s.sampler_logprobs)
             for s in firsts]
    assert min(float(d.min()) for d in drawn) >= -1e-6 and max(float(d.max()) for d in drawn) > 0.05
    # rho = exp(log pi_theta - l_old) = 1 on the first pass: the trainer's own full-softmax log-probs
    logp, mask = icrl.response_logprobs(model, [s.context for s in samples], [s.response for s in samples],
                                        args.temperature, "cpu", [s.mask for s in samples])
    old = icrl.pad_rows([s.old_logp for s in samples], mask.shape[1])
    assert ((logp - old).exp() * mask - mask).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- item 8
class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host (on a GPU each waits for the device)."""
    READS = {"__float__", "__bool__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def synthetic_batch(queries=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, 64, (n,), generator=gen).tolist()
    per_query = []
    for q in range(queries):
        context = ids(4 + q)
        samples = [icrl.TrainSample(context, ids(2 + (q + i) % 5), False, float(torch.randn((), generator=gen)))
                   for i in range(3)]
        samples.append(icrl.TrainSample(context, ids(4), False, 0.5, calib_context=ids(7)))
        samples.append(icrl.TrainSample(ids(5), ids(3), True, -0.3 + 0.2 * q))
        per_query.append(samples)
    return per_query


@pytest.mark.parametrize("micro_batch", [1, 3, 64])
def test_host_reads_once_per_optimizer_step(micro_batch):
    """update(): one host read for all trained-token counts, one per optimizer step (skip or not), one for the
    statistics at the end, however many micro-batches (4 optimizer steps: 2 epochs x 2 minibatches; 20, 7 or
    2 micro-batches each). old_logprobs: one copy to the host for the whole pass. Statistics as before."""
    per_query = synthetic_batch()
    samples = [s for qs in per_query for s in qs]
    model = small_model(64)
    args = icrl.parse_args(["--task", "arithmetic", "--batch_prompts", "4", "--minibatch", "2", "--ppo_epochs", "2",
                            "--micro_batch", str(micro_batch), "--lr", "1e-3"])
    with HostReads() as logprob_pass:
        icrl.old_logprobs(model, samples, args, icrl.Dist())
    assert logprob_pass.reads == ["cpu"]
    for s in samples:
        s.old_logp = s.old_logp - 0.05 * torch.arange(len(s.old_logp))  # rho != 1: clipping happens
    with HostReads() as update_pass:
        stats = icrl.update(model, torch.optim.SGD(model.parameters(), lr=1e-3), per_query, args, icrl.Dist(), step=0)
    # each epoch's query order is a torch.randperm on the host's generator (host data, no device read);
    # then the counts, one flag per optimizer step, the statistics
    assert update_pass.reads == ["tolist"] * 2 + ["tolist"] + ["item"] * 4 + ["tolist"]
    assert stats["updates"] == 4 and stats["skipped"] == 0 and stats["clipped"] > 0
    assert stats["tokens"] == 2 * sum(s.trained_tokens for s in samples)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_chunked_logprobs_distributed_give_the_unchunked_gradients(tmp_path, fsdp):
    """2 gloo ranks, DDP or FSDP2, log-probs in chunks of 3 positions, each checkpointed and recomputed in
    backward inside the (root) module's forward: the update (plain SGD at lr 1, so the weight change is the
    gradient) equals the 1-process unchunked one (test_icrl.py's distributed test, with chunks)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist_update.py"), one], check=True, cwd=ROOT,
                   env=env, timeout=240)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(ROOT, "tests", "dist_update_chunked.py"), two, *(["--fsdp"] if fsdp else [])],
                   check=True, cwd=ROOT,
                   env=env, timeout=240)
    single, double = torch.load(one), torch.load(two)
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=2e-6, msg=name)


def test_one_chunk_is_bit_for_bit_the_whole_vocabulary_log_softmax():
    """In float32, where the positions fit one chunk (the tiny default always), the log-probs and every
    gradient are bit for bit those of log_softmax over (B, T, V): the measured runs in README stay exact."""
    vocab, temperature = 300, 0.8
    model = small_model(vocab, seed=4, tie=True)
    contexts, responses, masks = batch(vocab, seed=2)
    ids, targets, mask, positions = icrl.pad_batch(contexts, responses, "cpu", masks)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    reference = torch.log_softmax(model(ids, logits_at=positions).float() / temperature, dim=-1)
    reference = reference.gather(-1, targets[..., None]).squeeze(-1) * mask
    (reference * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logp, _ = icrl.response_logprobs(model, contexts, responses, temperature, "cpu", masks)
    (logp * weights).sum().backward()
    assert torch.equal(logp, reference)
    assert all(torch.equal(p.grad, ref_grads[n]) for n, p in model.named_parameters())
