"""model.py against transformers' Qwen3 (the reference): logits, cached decoding, the sampler, checkpoints.

All offline on CPU, on tiny random models built by conftest.make_hf_qwen3.
Run: .venv/bin/python -m pytest -q tests/test_model.py
"""

import functools
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import TINY_QWEN3, make_hf_qwen3
from model import Decoder, Qwen3, Qwen3Config, generate, keep_top_k_top_p, sample_next

VOCAB = TINY_QWEN3["vocab_size"]


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def forward_logprobs(model, prompt, completion, temperature=1.0):
    """log_softmax(logits / temperature) of each completion token, from one full forward (no cache)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float()                   # (len(completion), V)
    logits = logits / temperature if temperature > 0 else logits
    return logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our model, transformers model) on the default tiny checkpoint, shared by the sampler tests."""
    folder, hf = make_hf_qwen3(tmp_path_factory.mktemp("tiny"))
    return Qwen3.from_pretrained(folder).eval(), hf


# ----------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("overrides", [
    {},                                                            # GQA 2:1, head_dim 16 != 48 / 4, untied
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 4},                                    # GQA ratio 1 (plain multi-head)
    {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8, "attention_bias": True,
     "rope_theta": 1_000_000.0},
], ids=["gqa2-untied", "tied", "mha", "gqa3-bias-theta1e6"])
def test_logits_match_transformers_fp32(tmp_path, overrides):
    folder, hf = make_hf_qwen3(tmp_path, **overrides)
    model = Qwen3.from_pretrained(folder)
    ids = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (3, 37, VOCAB)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_logits_match_transformers_bf16(tmp_path):
    folder, hf = make_hf_qwen3(tmp_path)
    model = Qwen3.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ours = model(ids).float()
        ref_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
    # bfloat16 has ~3 significant digits; the logits here are O(1). Measured max diff: ~4e-3.
    assert (ours - ref_bf16).abs().max().item() < 2e-2


def test_random_init_and_tying():
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = Qwen3(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert isinstance(model.model.layers, torch.nn.ModuleList) and len(model.model.layers) == 2
    assert model.grad_checkpointing is False


def test_grad_checkpointing_gives_same_gradients(tiny):
    model, _ = tiny
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    model.train()
    try:
        for flag in (False, True):
            model.grad_checkpointing = flag
            model.zero_grad()
            model(ids).float().logsumexp(-1).sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        model.grad_checkpointing = False
        model.zero_grad()
        model.eval()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4, "attention_bias": True}],
                         ids=["gqa", "mha-bias"])
@pytest.mark.parametrize("rows", [3, 70], ids=["3rows", "70rows"])
def test_cached_decode_equals_full_forward_ragged(tmp_path, overrides, rows):
    """Prefill ragged prompts right-padded, then decode one token at a time at each row's own position.
    70 rows for 24 steps: a CPU prefill in two chunks, and column-major weights."""
    folder, _ = make_hf_qwen3(tmp_path, **overrides)
    model = Qwen3.from_pretrained(folder)
    lengths, extra = ([5, 9, 2] * 24)[:rows], 6 if rows < 8 else 24
    L = max(lengths)
    seqs = random_prompts([n + extra for n in lengths], seed=1)
    decoder = Decoder(model, rows, L + extra)
    assert rows < 8 or (rows * L > Decoder.prefill_tokens and decoder.layers[0].qkv.is_contiguous())
    padded = torch.tensor([s[:n] + [0] * (L - n) for s, n in zip(seqs, lengths)])
    with torch.no_grad():
        last = decoder.prefill(padded, torch.tensor(lengths) - 1)                      # (rows, V)
        decoded = []
        for step in range(extra):
            position = torch.tensor(lengths) + step
            token = torch.tensor([s[n + step] for s, n in zip(seqs, lengths)])
            decoded.append(decoder.step(token, position, L + step + 1))
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            full = model(torch.tensor([seq]))[0]                              # (n + extra, V)
            assert (last[row] - full[n - 1]).abs().max() < 1e-5
            steps = torch.stack([d[row] for d in decoded])
            assert (steps - full[n:]).abs().max() < 1e-5


@pytest.mark.parametrize("rows", [9, 40])
def test_cached_decode_at_one_position_equals_full_forward(tiny, rows):
    """Equal-length rows step with one int position: no mask, slice writes. 40 rows x 2 kv heads: matmul
    attention over the transposed key cache."""
    model, _ = tiny
    L, extra = 6, 5
    seqs = random_prompts([L + extra] * rows, seed=11)
    decoder = Decoder(model, rows, L + extra)
    assert decoder.matmul_attention == (rows == 40)
    with torch.no_grad():
        last = decoder.prefill(torch.tensor([s[:L] for s in seqs]), torch.full((rows,), L - 1))
        steps = [decoder.step(torch.tensor([s[L + i] for s in seqs]), L + i, L + i + 1) for i in range(extra)]
        full = model(torch.tensor(seqs))                                          # (rows, L + extra, V)
    assert (torch.stack([last] + steps, 1) - full[:, L - 1:]).abs().max() < 1e-5


@pytest.mark.parametrize("rows", [1, 40], ids=["sdpa", "matmul-attention"])
def test_decoder_bf16_close_to_forward(tiny, rows):
    model, _ = tiny
    bf16 = Qwen3(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    seqs = torch.tensor(random_prompts([12] * rows, seed=12))
    decoder = Decoder(bf16, rows, 12)
    with torch.no_grad():
        full = bf16(seqs).float()
        prefill = decoder.prefill(seqs[:, :8], torch.full((rows,), 7)).float()
        steps = [decoder.step(seqs[:, 8 + i], torch.full((rows,), 8 + i), 9 + i).float() for i in range(4)]
    assert decoder.cache[0].k.dtype == decoder.cache[0].v.dtype == torch.bfloat16
    assert (torch.stack([prefill] + steps, 1) - full[:, 7:]).abs().max() < 2e-2


# ----------------------------------------------------------------------------- generate: greedy
def test_greedy_matches_transformers(tiny):
    model, hf = tiny
    prompts = random_prompts([7, 7, 7], seed=2)
    ours = generate(model, prompts, max_new_tokens=20, temperature=0)
    ids = torch.tensor(prompts)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                      min_new_tokens=20, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref_logprobs = torch.stack(ref.scores, 1).log_softmax(-1)                # (B, 20, V)
    for row, gen in enumerate(ours):
        assert gen.tokens == ref.sequences[row, 7:].tolist()
        assert not gen.finished and len(gen.logprobs) == 20
        expected = ref_logprobs[row].gather(1, torch.tensor(gen.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-5)


def test_ragged_batch_equals_one_by_one(tiny):
    model, _ = tiny
    prompts = random_prompts([3, 11, 1, 6], seed=3)
    batch = generate(model, prompts, max_new_tokens=12, temperature=0)
    for prompt, gen in zip(prompts, batch):
        alone = generate(model, [prompt], max_new_tokens=12, temperature=0)[0]
        assert gen.tokens == alone.tokens
        assert torch.allclose(torch.tensor(gen.logprobs), torch.tensor(alone.logprobs), atol=1e-5)


def test_duplicate_prompts_prefilled_once_equal_distinct_calls(tiny):
    model, _ = tiny
    p, q = random_prompts([5, 8], seed=4)
    grouped = generate(model, [p, q, p, p, q], max_new_tokens=10, temperature=0)
    alone_p = generate(model, [p], max_new_tokens=10, temperature=0)[0]
    alone_q = generate(model, [q], max_new_tokens=10, temperature=0)[0]
    for gen, ref in zip(grouped, [alone_p, alone_q, alone_p, alone_p, alone_q]):
        assert gen.tokens == ref.tokens
        assert torch.allclose(torch.tensor(gen.logprobs), torch.tensor(ref.logprobs), atol=1e-5)


# ----------------------------------------------------------------------------- generate: sampling
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0])
def test_logprobs_equal_forward_at_temperature(tiny, temperature):
    model, _ = tiny
    prompts = random_prompts([4, 9], seed=5) * 3                            # duplicates and ragged rows
    gens = generate(model, prompts, max_new_tokens=15, temperature=temperature, seed=0)
    for prompt, gen in zip(prompts, gens):
        expected = forward_logprobs(model, prompt, gen.tokens, temperature)
        assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-5)


def test_duplicates_are_independent_samples(tiny):
    model, _ = tiny
    (p,) = random_prompts([6], seed=6)
    gens = generate(model, [p] * 8, max_new_tokens=10, temperature=1.0, seed=1)
    assert len({tuple(g.tokens) for g in gens}) > 1


def test_top_k_top_p_logprobs_renormalised_over_kept_set(tiny):
    model, _ = tiny
    temperature, top_k, top_p = 3.0, 5, 0.6
    prompts = random_prompts([5, 8], seed=7)
    gens = generate(model, prompts, max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    top_k_warp = transformers.TopKLogitsWarper(top_k)
    top_p_warp = transformers.TopPLogitsWarper(top_p)
    for prompt, gen in zip(prompts, gens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.tokens]))[0, len(prompt) - 1:-1] / temperature
        kept = top_p_warp(None, top_k_warp(None, logits))                   # transformers' own masks
        token = torch.tensor(gen.tokens)[:, None]
        assert torch.isfinite(kept.gather(1, token)).all(), "sampled a token outside the top-k/top-p set"
        expected = kept.log_softmax(-1).gather(1, token)[:, 0]
        assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-5)


def test_sample_next_kept_sets_and_frequencies():
    """Hand-built distribution p = (0.5, 0.3, 0.15, 0.05): top_p 0.8 keeps {0, 1}; top_k 3 keeps {0, 1, 2}."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    token, logp = sample_next(logits.clone(), 1.0, 0, 0.8, g)                # it overwrites its input
    assert set(token.tolist()) == {0, 1}
    assert abs((token == 0).float().mean().item() - 0.5 / 0.8) < 0.02
    assert torch.allclose(logp, (p / 0.8).log()[token], atol=1e-6)
    token, logp = sample_next(logits.clone(), 1.0, 3, 1.0, g)
    assert set(token.tolist()) == {0, 1, 2}
    assert torch.allclose(logp, (p / 0.95).log()[token], atol=1e-6)
    token, logp = sample_next(logits.clone(), 1.0, 0, 1.0, g)             # no filter: all four, p itself
    freq = torch.bincount(token, minlength=4).float() / len(token)
    assert (freq - p).abs().max() < 0.02
    assert torch.allclose(logp, p.log()[token], atol=1e-6)
    token, logp = sample_next(logits.clone(), 0, 0, 1.0, g)               # greedy
    assert torch.all(token == 0) and torch.allclose(logp, p.log()[0].expand(20000), atol=1e-6)
    # The nucleus always holds the top token, however small top_p: the draw is token 0 with log-prob 0, not a
    # NaN from an empty set (1 - 1e-9 is 1.0 in float32, where the cumulative sum can reach 1.0 itself).
    for top_p in (1e-9, 1e-3):
        token, logp = sample_next(logits.clone(), 1.0, 0, top_p, g)
        assert torch.all(token == 0) and torch.allclose(logp, torch.zeros(20000), atol=1e-6), top_p


@pytest.mark.parametrize("top_k, top_p", [(0, 0.1), (0, 0.5), (0, 0.9), (0, 0.99), (7, 1.0), (1, 1.0), (10, 0.8)])
def test_kept_set_matches_transformers_warpers(top_k, top_p):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3   # the same input in any test order
    logits[0, :4] = logits[0].max() + 1                                      # a tie at the top
    ref = logits.clone()
    if top_k:
        ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    ours = keep_top_k_top_p(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])
    token, _ = sample_next(logits.clone(), 1.0, top_k, top_p, torch.Generator().manual_seed(1))
    assert torch.isfinite(ref[torch.arange(64), token]).all()


def test_same_seed_same_output_different_seed_differs(tiny):
    model, _ = tiny
    prompts = random_prompts([5, 3, 5], seed=8)
    a = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    b = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    c = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=124)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


# ----------------------------------------------------------------------------- generate: stopping
def test_stop_ids_end_rows_and_set_finished(tiny, monkeypatch):
    """Greedy with stop ids is greedy without them, cut after the first stop id, across compaction."""
    model, _ = tiny
    compactions = []
    take_rows = Decoder.take_rows
    monkeypatch.setattr(Decoder, "take_rows", lambda self, rows, upto: compactions.append(len(rows))
                        or take_rows(self, rows, upto))
    prompts = random_prompts([3 + i % 5 for i in range(24)], seed=9)
    free = generate(model, prompts, max_new_tokens=30, temperature=0)
    # Stop on the tokens that half the rows emit early, so rows stop at different steps and the
    # batch is compacted several times.
    stop_ids = tuple({g.tokens[2 + i % 10] for i, g in enumerate(free[:12])})
    stopped = generate(model, prompts, max_new_tokens=30, temperature=0, stop_ids=stop_ids, check_every=4)
    assert len(compactions) >= 2 and compactions[-1] < len(prompts)        # the batch did shrink
    n_finished = 0
    for ref, gen in zip(free, stopped):
        cut = next((i + 1 for i, t in enumerate(ref.tokens) if t in stop_ids), None)
        if cut is None:
            assert not gen.finished and gen.tokens == ref.tokens
        else:
            n_finished += 1
            assert gen.finished and gen.tokens == ref.tokens[:cut] and gen.tokens[-1] in stop_ids
        assert torch.allclose(torch.tensor(gen.logprobs), torch.tensor(ref.logprobs[:len(gen.tokens)]), atol=1e-5)
    assert n_finished >= 12


def test_sampling_with_stops_keeps_logprobs_right(tiny):
    """Rows stop at random steps and are compacted away; the survivors' cache rows must stay theirs. Each
    prompt 10 times: prefilled once, its cache rows copied. 40 rows: matmul attention."""
    model, _ = tiny
    prompts = random_prompts([4, 7, 2, 9], seed=10) * 10
    stop_ids = tuple(range(0, VOCAB, 9))                                    # ~11% of the vocabulary
    gens = generate(model, prompts, max_new_tokens=40, temperature=1.0, stop_ids=stop_ids, seed=3,
                    check_every=2)
    assert any(g.finished for g in gens) and any(len(g.tokens) > 8 for g in gens)
    for prompt, gen in zip(prompts, gens):
        assert all(t not in stop_ids for t in gen.tokens[:-1])
        assert gen.finished == (gen.tokens[-1] in stop_ids)
        assert gen.finished or len(gen.tokens) == 40
        assert torch.allclose(torch.tensor(gen.logprobs), forward_logprobs(model, prompt, gen.tokens), atol=1e-5)


@pytest.mark.parametrize("rows", [6, 40], ids=["sdpa", "matmul-attention"])
def test_static_steps_equal_eager_steps_across_slot_buckets_and_compaction(tiny, monkeypatch, rows):
    """The fixed-shape steps a CUDA graph replays (Decoder `static`), run eagerly on CPU: positions always a
    tensor, slots read rounded up (to multiples of 4 here, so 10 steps cross three buckets), the batch
    compacted in place. Each step's logits equal those of a plain decoder fed the same rows."""
    model, _ = tiny
    monkeypatch.setattr(Decoder, "graph_kv_slots", 4)
    lengths = ([3, 5, 2, 4] * 10)[:rows]
    L, extra = max(lengths), 10
    seqs = random_prompts([n + extra for n in lengths], seed=21)
    padded = torch.tensor([s[:n] + [0] * (L - n) for s, n in zip(seqs, lengths)])
    static, plain = Decoder(model, rows, L + extra, static=True), Decoder(model, rows, L + extra)
    kept = torch.arange(rows)                       # row of the static decoder -> original row
    with torch.no_grad():
        for d in (static, plain):
            d.prefill(padded, torch.tensor(lengths) - 1)
        for step in range(extra):
            if step == 5:                           # drop every third row, as generate's compaction does
                keep = torch.tensor([i for i in range(rows) if i % 3])
                static.take_rows(keep, L + step)
                kept = kept[keep]
            assert static.cache[0].k.shape[0] == rows                         # compacted in place
            position = torch.tensor(lengths)[kept] + step
            token = torch.tensor([seqs[r][lengths[r] + step] for r in kept.tolist()])
            ours = static.step(token, position, L + step + 1)
            ref = plain.step(torch.tensor([seqs[r][lengths[r] + step] for r in range(rows)]),
                             torch.tensor(lengths) + step, L + step + 1)[kept]
            assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inductor's own call
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "torch.compile"])
def test_generate_with_static_steps_equals_plain_generate(tiny, monkeypatch, compile):
    """generate(graphs=True) on CPU (the shapes CUDA graphs replay, run eagerly) gives plain generate's tokens
    and log-probs: greedy and seeded sampling, ragged prompts, stop ids and compaction, 3 slot buckets; with
    `compile`, each layer of those steps goes through torch.compile (inductor's CPU code)."""
    model, _ = tiny
    monkeypatch.setattr(Decoder, "graph_kv_slots", 8)
    prompts = random_prompts([3 + i % 5 for i in range(24)], seed=9)
    stop_ids = tuple(range(0, VOCAB, 9))
    if compile:
        import torch._dynamo as dynamo
        dynamo.reset()
        calls = []
        monkeypatch.setattr(torch, "compile", functools.partial(counting_compile, torch.compile, calls))
    for temperature in (0.0, 1.0):
        a, b = (generate(model, prompts, max_new_tokens=20, temperature=temperature, stop_ids=stop_ids, seed=5,
                         check_every=4, graphs=graphs, compile=compile and graphs) for graphs in (True, False))
        assert any(g.finished for g in a) and any(not g.finished for g in a)
        assert [g.tokens for g in a] == [g.tokens for g in b]
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)
    if compile:  # the compiled layer really ran: every layer of every step after the first went through it
        assert calls and sum(calls) >= 2 * 19 * model.config.num_hidden_layers


def counting_compile(real_compile, calls, fn, **kwargs):
    """torch.compile, its result counting the calls made to it into `calls`."""
    compiled = real_compile(fn, **kwargs)
    calls.append(0)

    def counted(*args):
        calls[-1] += 1
        return compiled(*args)
    return counted


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inductor's own call
@pytest.mark.parametrize("graphs,compile", [(False, False), (True, False), (True, True)],
                         ids=["plain", "static-steps", "static-steps-compiled"])
def test_session_turns_equal_full_prefills(tiny, monkeypatch, graphs, compile):
    """Multi-turn episodes through a Session (each turn prefills only the observation appended after the
    cached history) give the tokens and log-probs of prefilling every history from scratch: 3 turns, rows
    ending between turns, ragged observations, a prompt repeated (prefilled once), stop ids that compact
    the batch mid-turn, and the cache grown past its first length; with static steps, their layers eager
    and through torch.compile."""
    from model import Session
    model, _ = tiny
    monkeypatch.setattr(Decoder, "graph_kv_slots", 8)
    first = random_prompts([5, 3, 7, 4, 6, 2], seed=31)
    first = first + [first[0], first[0]]                           # a group: one prompt three times
    stop_ids = tuple(range(0, VOCAB, 11))
    session, live, histories, prev = Session(), list(range(len(first))), [list(p) for p in first], None
    observations = random_prompts([3, 9, 1, 6, 4, 2, 5, 7] * 3, seed=32)
    finished = []
    for turn in range(3):
        prompts = [histories[i] for i in live]
        kw = dict(temperature=0.0, stop_ids=stop_ids, check_every=2, graphs=graphs)
        ours = generate(model, prompts, 12, session=session, continues=prev, compile=compile, **kw)
        reference = generate(model, prompts, 12, **kw)
        assert [g.tokens for g in ours] == [g.tokens for g in reference]
        for a, b in zip(ours, reference):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        finished += [g.finished for g in ours]
        still, prev = [], []
        for j, (i, g) in enumerate(zip(live, ours)):
            if i % 4 != turn:                                       # some episodes end after each turn
                histories[i] = histories[i] + g.tokens + observations[turn * 8 + i]
                still.append(i)
                prev.append(j)
        live = still
    assert any(finished) and not all(finished)
    assert session.decoder.max_len > 7 + 12                        # the cache grew across the turns
    with pytest.raises(ValueError, match="does not extend"):
        generate(model, [[1, 2, 3]], 4, session=session, continues=[0])


def test_session_turn_where_a_long_history_meets_a_long_observation(tiny):
    """One row's cached history is long and its new tokens few, another's history short and its new tokens
    many: the padded new tokens of the first reach slots past every prompt's end, and the cache must
    have room for them (it once grew only to the longest prompt plus max_new_tokens)."""
    from model import Session
    model, _ = tiny
    long, short = random_prompts([245, 5], seed=41)
    session = Session()
    first = generate(model, [long, short], 4, temperature=0.0, session=session)
    grown = [long + first[0].tokens + [1], short + first[1].tokens + random_prompts([60], seed=42)[0]]
    ours = generate(model, grown, 4, temperature=0.0, session=session, continues=[0, 1])
    assert [g.tokens for g in ours] == [g.tokens for g in generate(model, grown, 4, temperature=0.0)]


@pytest.mark.parametrize("prefill_tokens", [512, 2], ids=["one-chunk", "chunks-of-2-rows"])
def test_session_turn_of_one_new_token_per_row_in_chunks(tiny, monkeypatch, prefill_tokens):
    """A Session turn whose rows each add one token (the last sampled one) prefills through the step's path;
    in chunks of rows (Decoder.prefill_tokens) every chunk must read its own rows' histories, not rows 0.."""
    from model import Session
    model, _ = tiny
    monkeypatch.setattr(Decoder, "prefill_tokens", prefill_tokens)
    prompts = random_prompts([3, 5, 4, 6], seed=2)
    session = Session()
    first = generate(model, prompts, 4, temperature=0.0, session=session)
    grown = [p + g.tokens for p, g in zip(prompts, first)]
    ours = generate(model, grown, 4, temperature=0.0, session=session, continues=[0, 1, 2, 3])
    reference = generate(model, grown, 4, temperature=0.0)
    assert [g.tokens for g in ours] == [g.tokens for g in reference]
    for a, b in zip(ours, reference):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_max_new_tokens_cut_is_not_finished(tiny):
    model, _ = tiny
    gens = generate(model, random_prompts([4, 6], seed=11), max_new_tokens=5, temperature=0, stop_ids=(VOCAB + 1,))
    assert all(len(g.tokens) == 5 and len(g.logprobs) == 5 and not g.finished for g in gens)
    assert generate(model, [[1, 2]], max_new_tokens=0)[0].tokens == []


def test_a_stop_on_the_last_allowed_token_is_finished(tiny):
    """Generation.finished is "a stop id was hit": a stop sampled as the max_new_tokens-th token ends the
    response, which is complete (SPEC §1 scores only a cut-off response 0), not cut off."""
    model, _ = tiny
    (prompt,) = random_prompts([5], seed=12)
    free = generate(model, [prompt], max_new_tokens=30, temperature=0)[0].tokens
    j = next(i for i in range(2, 30) if free[i] not in free[:i])            # a token first seen at step j
    gen = generate(model, [prompt], max_new_tokens=j + 1, temperature=0, stop_ids=(free[j],))[0]
    assert gen.tokens == free[:j + 1] and gen.finished
    gen = generate(model, [prompt], max_new_tokens=j, temperature=0, stop_ids=(free[j],))[0]
    assert gen.tokens == free[:j] and not gen.finished


def test_generate_rejects_bad_arguments(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 4, top_p=0.0)
    for temperature in (float("nan"), float("inf")):   # NaN fails `< 0` and would decode greedily
        with pytest.raises(ValueError, match="temperature"):
            generate(model, [[1]], 4, temperature=temperature)


# ----------------------------------------------------------------------------- checkpoints
def test_sharded_checkpoint_loads(tmp_path):
    folder, hf = make_hf_qwen3(tmp_path / "single")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = Qwen3.from_pretrained(sharded)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Qwen3.from_pretrained(sharded)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, tied):
    folder, _ = make_hf_qwen3(tmp_path / "src", tie_word_embeddings=tied)
    model = Qwen3.from_pretrained(folder)
    model.save_pretrained(tmp_path / "ours")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert ref.config.tie_word_embeddings == tied and ref.config.head_dim == TINY_QWEN3["head_dim"]
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-5
    assert ("lm_head.weight" in load_file(tmp_path / "ours" / "model.safetensors")) == (not tied)
    again = Qwen3.from_pretrained(tmp_path / "ours")
    assert again.config == model.config


def test_save_pretrained_given_state_dict_and_bf16(tmp_path):
    folder, _ = make_hf_qwen3(tmp_path / "src")
    model = Qwen3.from_pretrained(folder, dtype=torch.bfloat16)
    state = {k: v.clone() + (1.0 if k == "model.norm.weight" else 0.0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "out", state_dict=state)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "qwen3"
    loaded = Qwen3.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight + 1)
    with pytest.raises(ValueError, match="model.norm.weight"):
        state.pop("model.norm.weight")
        model.save_pretrained(tmp_path / "bad", state_dict=state)


def test_tied_checkpoint_with_lm_head(tmp_path):
    """A tied checkpoint may also store lm_head.weight: equal to the embedding it is accepted, else refused."""
    folder, _ = make_hf_qwen3(tmp_path, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    Qwen3.from_pretrained(folder)
    tensors["lm_head.weight"] += 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        Qwen3.from_pretrained(folder)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, error, message", [
    (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
     ValueError, r"missing tensor.*model\.layers\.1\.self_attn\.k_norm\.weight"),
    (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(96)})),
     ValueError, r"unexpected tensor.*model\.layers\.0\.mlp\.gate_proj\.bias"),
    (lambda f: _edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(47)})),
     ValueError, r"model\.norm\.weight has shape \(47,\).*\(48,\)"),
    (lambda f: _edit_config(f, num_experts=8, num_experts_per_tok=2), ValueError, "num_experts=8"),
    (lambda f: _edit_config(f, use_sliding_window=True, sliding_window=64), ValueError, "sliding-window"),
    (lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     ValueError, "rope_parameters has rope_type 'yarn'"),
    (lambda f: _edit_config(f, rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}),
     ValueError, "rope_scaling has rope_type 'linear'"),
    # Qwen's long-context recipe adds rope_scaling beside the default rope_parameters transformers 5 saves:
    # transformers merges the two and runs YaRN, so reading the first key alone would run plain RoPE silently
    (lambda f: _edit_config(f, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     ValueError, "rope_scaling has rope_type 'yarn'"),
    (lambda f: _edit_config(f, head_dim=None), ValueError, "head_dim is None"),
    (lambda f: _edit_config(f, model_type="qwen2"), ValueError, "model_type is 'qwen2'"),
    (lambda f: (f / "config.json").unlink(), FileNotFoundError, "config.json"),
    (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
], ids=["missing", "unexpected", "shape", "moe", "sliding", "yarn", "legacy-rope-scaling", "yarn-beside-default",
        "head-dim-null", "model-type", "no-config", "no-weights"])
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, breakage, error, message):
    folder, _ = make_hf_qwen3(tmp_path)
    breakage(folder)
    with pytest.raises(error, match=message) as info:
        Qwen3.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_config_reads_both_rope_layouts():
    base = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    legacy = Qwen3Config.from_dict({**base, "rope_theta": 1e6, "rope_scaling": None})
    v5 = Qwen3Config.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert legacy.rope_theta == v5.rope_theta == 1e6
    assert Qwen3Config.from_dict(v5.to_dict()) == v5
    with pytest.raises(ValueError, match=r"missing \['hidden_size'\]"):
        Qwen3Config.from_dict({k: v for k, v in base.items() if k != "hidden_size"})


# ----------------------------------------------------------------------------- how the trainer calls it
@pytest.mark.parametrize("rows", [2, 40], ids=["sdpa", "matmul-attention"])
def test_generate_under_bf16_autocast(tiny, rows):
    """icrl.py samples under torch.autocast for --dtype bfloat16 (DDP): log-probs match the forward there."""
    model, _ = tiny
    prompts = random_prompts([3, 6] * (rows // 2), seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gens = generate(model, prompts, 10, temperature=1.0, seed=0)
        for prompt, gen in zip(prompts, gens):
            assert (torch.tensor(gen.logprobs) - forward_logprobs(model, prompt, gen.tokens)).abs().max() < 5e-2


def test_generate_with_fsdp2_needs_unshard(tmp_path):
    """Under FSDP2 the parameters are DTensor shards: generate refuses them, and after unshard() (what
    icrl.full_weights does) it gives the unsharded model's output."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    folder, _ = make_hf_qwen3(tmp_path / "ckpt", tie_word_embeddings=True)
    model = Qwen3.from_pretrained(folder)
    prompts = random_prompts([3, 5], seed=14)
    reference = generate(model, prompts, 8, temperature=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(ValueError, match="unshard"):
            generate(model, prompts, 8)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        assert [g.tokens for g in generate(model, prompts, 8, temperature=0)] == [g.tokens for g in reference]
        for unit in units:
            unit.reshard()
    finally:
        dist.destroy_process_group()
