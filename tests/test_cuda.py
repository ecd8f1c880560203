"""Checks that need one CUDA GPU (`make gpu-check` runs them, then the GPU sampler benchmark).

Skipped, saying why, where torch sees no CUDA device: the rest of tests/ runs on the CPU. Every test here
takes only `tmp_path`, so tests/gpu_check.py can also run them without pytest on a GPU image that lacks it.

    bf16 logits parity with transformers on CUDA; greedy generate equal to transformers (float32, ragged
    prompts); chunked log-probs on CUDA; a few ICRL steps with NCCL at world size 1 under DDP and under
    --fsdp (bfloat16, --grad_ckpt), and an --fsdp resume against the run straight through; a checkpoint round
    trip through transformers; host syncs of update() independent of the number of micro-batches.

GPU_CHECK_DEVICE=cpu runs the same code on the CPU (gloo instead of NCCL, no sync counting): a dry run of
the checks themselves, for a machine without a GPU; it proves nothing about CUDA.
"""
import atexit
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")

try:
    import pytest
    pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                    reason=f"no CUDA GPU visible to torch {torch.__version__} "
                                           f"(torch.version.cuda = {torch.version.cuda}): GPU checks skipped")
except ImportError:  # gpu_check.py's own runner
    pytest = None

CONFIG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
              rms_norm_eps=1e-6)


def hf_checkpoint(folder, seed=0, **overrides):
    """A random transformers Qwen3ForCausalLM of CONFIG's shape (conftest.make_hf_qwen3: norms randomised
    too) saved to `folder`; returns the folder."""
    from conftest import make_hf_qwen3
    return make_hf_qwen3(folder, seed=seed, **{**CONFIG, "rope_theta": 1e6, **overrides})[0]


def load_hf(folder, dtype):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder).to(DEVICE, dtype).eval()


def test_bf16_logits_parity_with_transformers(tmp_path):
    """bfloat16 on CUDA: our logits and transformers' are both within bfloat16 noise of the float32 logits,
    ours no further than transformers' own (x1.5 + 0.02), and close to each other."""
    from model import Qwen3
    folder = hf_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 96), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        exact = load_hf(folder, torch.float32)(ids).logits.float()
        theirs = load_hf(folder, torch.bfloat16)(ids).logits.float()
        ours = Qwen3.from_pretrained(folder, dtype=torch.bfloat16, device=DEVICE)(ids).float()
    err_ours, err_theirs = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    print(f"bf16 max |logit error| vs float32: ours {err_ours:.4f}, transformers {err_theirs:.4f}, "
          f"ours vs transformers {(ours - theirs).abs().max().item():.4f} (logits up to {exact.abs().max().item():.1f})")
    assert err_ours <= 1.5 * err_theirs + 0.02
    assert (ours - theirs).abs().max().item() <= 2 * err_theirs + 0.02


def test_float32_logits_and_greedy_generate_equal_transformers(tmp_path):
    """float32 on CUDA (TF32 off): logits within 1e-4 of transformers', and greedy generate over ragged
    prompts in one batch gives transformers' tokens one prompt at a time, token for token."""
    from model import Qwen3, generate
    folder = hf_checkpoint(tmp_path / "ckpt", tie_word_embeddings=True)
    hf = load_hf(folder, torch.float32)
    hf.generation_config.eos_token_id = None
    ours = Qwen3.from_pretrained(folder, dtype=torch.float32, device=DEVICE).eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
        with torch.no_grad():
            ids = torch.tensor([prompts[3]], device=DEVICE)
            assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
            outs = generate(ours, prompts, 32, temperature=0)
            for prompt, out in zip(prompts, outs):
                ids = torch.tensor([prompt], device=DEVICE)
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                  min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
                assert out.tokens == ref
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_cuda_graph_decode_equals_eager_decode(tmp_path):
    """generate's decode steps replayed as CUDA graphs (the default on CUDA) give the eager steps' tokens,
    float32 with TF32 off: greedy and seeded sampling (the latter also with each layer through torch.compile),
    ragged prompts, stop ids that compact the batch in place, and slots read in several 64-slot buckets (24 new
    tokens after prompts of up to 60)."""
    from model import Qwen3, generate
    ours = Qwen3.from_pretrained(hf_checkpoint(tmp_path / "ckpt"), dtype=torch.float32, device=DEVICE).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in range(30, 62)]
    stop_ids = tuple(range(0, CONFIG["vocab_size"], 7))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for temperature, compile in ((0.0, False), (1.0, False), (1.0, True)):  # compiled once: the same code
            graphs, eager = (generate(ours, prompts, 24, temperature=temperature, stop_ids=stop_ids, seed=4,
                                      check_every=4, graphs=g, compile=compile and g is None) for g in (None, False))
            assert any(x.finished for x in eager) and any(not x.finished for x in eager)
            assert [x.tokens for x in graphs] == [x.tokens for x in eager], f"compile={compile}"
            for x, y in zip(graphs, eager):
                assert max((abs(a - b) for a, b in zip(x.logprobs, y.logprobs)), default=0.0) < 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_chunked_logprobs_on_cuda():
    """model.token_logprobs in chunks equals log_softmax over the whole (N, V) on CUDA, values and gradients;
    under bf16 autocast the head stays float32."""
    import model as model_module
    from model import token_logprobs
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(300, 256, device=DEVICE, generator=gen, requires_grad=True)
    w = (torch.randn(5000, 256, device=DEVICE, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, 5000, (300,), device=DEVICE, generator=gen)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = torch.log_softmax(h @ w.t() / 0.7, -1).gather(1, targets[:, None])[:, 0]
        ref_grads = torch.autograd.grad(ref.sum(), (h, w))
        ours = token_logprobs(h, w, targets, 0.7, chunk_rows=64)
        grads = torch.autograd.grad(ours.sum(), (h, w))
        assert (ours - ref).abs().max().item() < 1e-5
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max().item() < 1e-5 * max(1.0, r.abs().max().item())
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert token_logprobs(h.bfloat16(), w.bfloat16(), targets).dtype == torch.float32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert model_module.LOGPROB_CHUNK_ELEMENTS // 151936 > 0


# guess with 3 tries at numbers up to 6, after 4 warm-start steps: RL moves the weights (grad_norm ~0.5 on an
# H100). Arithmetic after so short a warm start never earns a reward: zero advantages, no gradient to check.
TINY_RUN = ["--task", "guess", "--task_knob", "max_number=6", "--task_knob", "max_guesses=3",
            "--warm_start_steps", "4", "--warm_start_role_steps", "1", "--batch_prompts", "4", "--group_size", "4",
            "--max_new_tokens", "8", "--critic_max_new_tokens", "8", "--eval_examples", "8", "--eval_every", "0",
            "--micro_batch", "4", "--steps", "2", "--dtype", "bfloat16", "--grad_ckpt"]


def torchrun_icrl(*argv):
    """`torchrun --nproc_per_node 1 icrl.py ARGV` on the GPU (NCCL, world size 1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "icrl.py"), *map(str, argv)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@functools.cache
def icrl_run(fsdp: bool) -> Path:
    """TINY_RUN's 2 steps: DDP, or FSDP2 with --fsdp."""
    root = tempfile.mkdtemp(prefix="gpu-check-")
    atexit.register(shutil.rmtree, root, True)   # removed when the test session ends
    out = Path(root) / ("fsdp" if fsdp else "ddp")
    torchrun_icrl("--out", out, *TINY_RUN, *(["--fsdp"] if fsdp else []))
    return out


def check_run(out: Path):
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        print(f"{out.name}: step {m['step']}: logprob_gap {m['logprob_gap']:.4f}, grad_norm {m['grad_norm']:.4f}, "
              f"t_sample {m['t_sample']:.2f}s, t_train {m['t_train']:.2f}s")
        # bfloat16 sampler (bf16 logits) against the trainer's float32 head on bf16 layers: bf16 noise only
        assert m["logprob_gap"] < 0.5 and m["skipped_updates"] == 0
    assert any(m["grad_norm"] > 0 for m in lines)   # an update that moved the weights, not an all-zero batch
    assert (out / "final" / "model.safetensors").is_file()


def test_icrl_steps_nccl_ddp():
    check_run(icrl_run(fsdp=False))


def test_icrl_steps_nccl_fsdp():
    check_run(icrl_run(fsdp=True))


# metrics.jsonl keys that are wall times, so differ between any two runs
TIMINGS = {"step", "tok_per_s", "t_sample", "t_env", "t_train"}
RESUME_RUN = [*TINY_RUN, "--fsdp"]


def weight_differences(a_folder, b_folder):
    """(max |a - b| over every weight, tensors that differ in any bit, tensors) of two checkpoints."""
    from safetensors.torch import load_file
    a, b = (load_file(str(Path(f) / "model.safetensors")) for f in (a_folder, b_folder))
    assert a.keys() == b.keys()
    return (max((a[k].double() - b[k].double()).abs().max().item() for k in a),
            sum(not torch.equal(a[k], b[k]) for k in a), len(a))


def test_resume_continues_the_run_on_cuda(tmp_path):
    """RESUME_RUN (--fsdp, bf16, --grad_ckpt) with NCCL: 3 steps straight (--save_every 1) against 2 steps resumed
    to step 3 (`--resume RUN --steps 3`). Step 3's metrics (wall times aside) and the final weights agree; the
    straight run's step_2 against the checkpoint the resume read says whether a difference arose before the
    resume or in it. The maxima are printed.

    Not asserted bit for bit on CUDA. icrl.py seeds every random draw from (seed, step, rank) with generators of
    its own, so on the CPU the resume is exact (asserted here under GPU_CHECK_DEVICE=cpu); but it sets no
    determinism flag (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG), and some CUDA backward
    kernels add with atomics in no fixed order (gather's backward, FlashAttention's dq over several key
    blocks). That is float noise: AdamW divides a gradient by its own root mean square, which does not amplify
    a relative error, so the weights would differ by about a float32 rounding. On the CPU, one step moves the
    weights by up to 1.5e-4 and a resume that lost the AdamW moments ends 2.7e-4 away; one that lost the data
    order or the seeds changes the metrics outright. The tolerances (1e-6 on weights, 1e-3 relative on metrics)
    sit between. A sampled token that flips on a bf16 near tie would exceed them too: the printed step_2 line
    then shows whether the runs had drifted before the resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun_icrl("--out", straight, *RESUME_RUN, "--steps", "3", "--save_every", "1")
    torchrun_icrl("--out", resumed, *RESUME_RUN, "--steps", "2")
    torchrun_icrl("--resume", resumed, "--steps", "3")
    runs = [[json.loads(line) for line in open(out / "metrics.jsonl")] for out in (straight, resumed)]
    assert [[m["step"] for m in lines] for lines in runs] == [[1, 2, 3]] * 2
    a, b = runs[0][2], runs[1][2]
    assert set(a) == set(b)
    metric_diff = {k: abs(a[k] - b[k]) if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))
                   else (0.0 if a[k] == b[k] else float("inf")) for k in sorted(set(a) - TIMINGS)}
    worst = max(metric_diff, key=metric_diff.get)
    before = weight_differences(straight / "step_2", resumed / "step_2")
    after = weight_differences(straight / "final", resumed / "final")
    moved = weight_differences(straight / "step_2", straight / "final")
    print(f"resume ({DEVICE}): step 3 moved the weights by up to {moved[0]:.3g} (grad_norm {a['grad_norm']:.3f}); "
          f"step 3 metrics, {len(metric_diff)} keys: max |straight - resumed| {metric_diff[worst]:.3g} ({worst}), "
          f"{sum(d > 0 for d in metric_diff.values())} keys differ; weights at step 2 (straight's step_2 vs the "
          f"checkpoint resumed from): max |diff| {before[0]:.3g}, {before[1]} of {before[2]} tensors differ; final "
          f"weights at step 3: max |diff| {after[0]:.3g}, {after[1]} of {after[2]} tensors differ")
    assert a["grad_norm"] > 0 and moved[0] > 1e-5   # else the comparison below proves nothing
    if DEVICE == "cpu":
        assert max(metric_diff.values()) == 0 and before[1] == after[1] == 0
    for k, d in metric_diff.items():
        assert d <= 1e-3 * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert after[0] <= 1e-6 and before[0] <= 1e-6


def test_checkpoint_round_trip_through_transformers(tmp_path):
    """The DDP run's final checkpoint loads in transformers on CUDA with our logits; our save of a
    transformers checkpoint loads back in transformers with the same logits."""
    from model import Qwen3
    final = icrl_run(fsdp=False) / "final"
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        ours = Qwen3.from_pretrained(final, dtype=torch.float32, device=DEVICE)
        assert (load_hf(final, torch.float32)(ids).logits - ours(ids)).abs().max().item() < 1e-4
        folder = hf_checkpoint(tmp_path / "hf")
        Qwen3.from_pretrained(folder, dtype=torch.float32, device=DEVICE).save_pretrained(tmp_path / "ours")
        assert torch.equal(load_hf(folder, torch.float32)(ids).logits, load_hf(tmp_path / "ours", torch.float32)(ids).logits)


def test_update_host_syncs_do_not_grow_with_micro_batches():
    """torch.cuda's sync debug mode counts the host syncs of old_logprobs + update() on CUDA: the same with
    1 sequence per micro-batch as with all of them in one (item 8 of issue 14)."""
    import icrl
    from dist_update import CONFIG as SMALL, global_batch
    from model import Qwen3, Qwen3Config
    if DEVICE != "cuda":
        return  # sync counting needs CUDA
    counts = {}
    for micro_batch in (1, 64):
        per_query = global_batch()
        samples = [s for qs in per_query for s in qs]
        torch.manual_seed(0)
        model = Qwen3(Qwen3Config(**SMALL)).to(DEVICE)
        args = icrl.parse_args(["--task", "arithmetic", "--batch_prompts", "4", "--minibatch", "2", "--ppo_epochs", "2",
                                "--micro_batch", str(micro_batch)])
        ctx = icrl.Dist(device=torch.device(DEVICE))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(2):  # warm-up: kernels, allocators (the pinned-memory one too)
            icrl.old_logprobs(model, samples, args, ctx)
            icrl.update(model, optimizer, per_query, args, ctx, step=0)
        torch.cuda.synchronize()
        where = []   # the Python stack of each sync: the innermost frames, outside torch, say what made it

        def record(message, category, filename, lineno, file=None, line=None):
            # Only syncs made by icrl.py's code count: one once showed up in this test's own call of
            # set_sync_debug_mode (torch 2.11, micro_batch 1 only), outside the code under test.
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename == icrl.__file__]
            if "synchroniz" in str(message) and frames:
                where.append(f"icrl.py:{frames[-1].lineno} {frames[-1].name}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                icrl.old_logprobs(model, samples, args, ctx)
                icrl.update(model, optimizer, per_query, args, ctx, step=0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[micro_batch] = collections.Counter(where)
    print(f"host syncs of old_logprobs + update (4 optimizer steps), by where they were made: {counts}")
    assert counts[1] == counts[64]


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", __file__]))
