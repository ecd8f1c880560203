"""Where a GPU decode step's time goes: torch.profiler over one `generate` call, and the candidate pieces of a
decode layer timed alone, each replayed as a CUDA graph (so launch overhead is out, as in generate).

Random Qwen3-0.6B-shaped weights (tests/bench_gpu.py's CONFIGS), bfloat16, greedy, batch 64, 64 prompt + 128
new tokens by default. Prints the kernels by total GPU time and the per-op table; nothing is asserted.

Run: python tests/profile_gpu.py [--config 0.6B] [--batch 64] [--compile]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench_gpu import CONFIGS  # noqa: E402
from model import Qwen3, Qwen3Config, generate, rms_norm  # noqa: E402


def graph_time(fn, repeats=50) -> float:
    """Microseconds per call of fn, `repeats` calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        for _ in range(repeats):
            fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (n * repeats) * 1e6


def pieces(cfg: dict, B: int, S: int):
    """One decode layer's candidate ops at batch B over S cached slots, each timed alone."""
    C, I, H, H_kv, D = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))
    bf = dict(dtype=torch.bfloat16, device="cuda")
    x = torch.randn(B, C, **bf)
    w_norm = torch.randn(C, **bf)
    qkv_w = torch.randn(H * D + 2 * H_kv * D, C, **bf) * 0.02
    o_w = torch.randn(C, H * D, **bf) * 0.02
    gate_w, up_w, down_w = (torch.randn(I, C, **bf) * 0.02, torch.randn(I, C, **bf) * 0.02,
                            torch.randn(C, I, **bf) * 0.02)
    gate_up_w = torch.cat([gate_w, up_w])
    kv = torch.randn(B, S, 2 * H_kv, D, **bf)
    k, v = kv[:, :, :H_kv].transpose(1, 2), kv[:, :, H_kv:].transpose(1, 2)
    q = torch.randn(B, 1, H, D, **bf)
    mask = torch.zeros(B, 1, 1, S, **bf)
    mask[:, :, :, S // 2:] = -float("inf")
    qk = torch.randn(B, 1, H + H_kv, D, **bf)
    qk_w = torch.randn(H + H_kv, D, **bf)
    cos, sin = torch.randn(B, 1, 1, D, **bf), torch.randn(B, 1, 1, D, **bf)
    h = torch.randn(B, I, **bf)
    gu = torch.randn(B, 2 * I, **bf)
    out = torch.randn(B, H * D, **bf)
    kt = k.contiguous()
    kT = k.transpose(2, 3).contiguous()
    bool_mask = mask == 0
    vt = v.contiguous()
    eps = 1e-6
    ops = {
        "rms_norm (ours: fp32, cast, *w)": lambda: rms_norm(x, w_norm, eps),
        "F.rms_norm bf16 with weight": lambda: F.rms_norm(x, (C,), w_norm, eps),
        "qk rms_norm (ours)": lambda: rms_norm(qk, qk_w, eps),
        "qk F.rms_norm bf16, then * w": lambda: F.rms_norm(qk, (D,), None, eps) * qk_w,
        "rope (ours: 4 kernels)": lambda: torch.add(qk * cos, qk.roll(D // 2, -1) * sin),
        "rope (addcmul: 3 kernels)": lambda: torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin),
        "qkv mm": lambda: torch.mm(x, qkv_w.t()),
        "o mm": lambda: torch.mm(out, o_w.t()),
        "o addmm_ into x": lambda: x.addmm_(out, o_w.t()),
        "gate mm + up mm": lambda: (torch.mm(x, gate_w.t()), torch.mm(x, up_w.t())),
        "gate|up one mm": lambda: torch.mm(x, gate_up_w.t()),
        "silu(g) * u (2 kernels)": lambda: F.silu(gu[:, :I]) * gu[:, I:],
        "down mm": lambda: torch.mm(h, down_w.t()),
        "down addmm_ into x": lambda: x.addmm_(h, down_w.t()),
        "SDPA with mask (ours)": lambda: F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v,
                                                                       attn_mask=mask),
        "SDPA with mask, contiguous k v": lambda: F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), kt, vt,
                                                                                attn_mask=mask),
        "matmul attention (bmm, softmax, bmm)": lambda: torch.bmm(
            (torch.bmm(q.view(B * H_kv, H // H_kv, D), k.transpose(2, 3).flatten(0, 1)).view(B, H_kv, -1, S)
             + mask).softmax(-1, dtype=torch.float).to(q.dtype).flatten(0, 1), v.flatten(0, 1)),
        "matmul attention, k cached transposed": lambda: torch.bmm(
            torch.bmm(q.view(B * H_kv, H // H_kv, D), kT.flatten(0, 1)).view(B, H_kv, -1, S).add_(mask)
            .softmax(-1, dtype=torch.float).to(q.dtype).flatten(0, 1), vt.flatten(0, 1)),
        "SDPA with mask, q as (B, H, 1, D), gqa": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True),
        "SDPA with bool mask": lambda: F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v,
                                                                     attn_mask=bool_mask),
        "SDPA no mask (lower bound)": lambda: F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v),
        "cache write (index_put)": lambda: kv.__setitem__((torch.arange(B, device="cuda"), torch.full((B,), 3, device="cuda")),
                                                          qk[:, 0, :2 * H_kv]),
    }
    def layer(x, q, k, v, mask):  # a decode layer's work outside the matmuls' choice: norms, attention, MLP
        hn = rms_norm(x, w_norm, eps)
        a = torch.mm(hn, qkv_w.t())
        att = F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v, attn_mask=mask).reshape(B, H * D)
        x = x + torch.mm(att, o_w.t()) + a[:, :C]
        hn = rms_norm(x, w_norm, eps)
        g = torch.mm(hn, gate_up_w.t())
        return x + torch.mm(F.silu(g[:, :I]) * g[:, I:], down_w.t())
    ops["layer sketch, eager"] = lambda: layer(x, q, k, v, mask)
    if hasattr(torch, "compile"):
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        ops["layer sketch, torch.compile"] = lambda: compiled(x, q, k, v, mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        def forced(backend=getattr(SDPBackend, backend)):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v, attn_mask=mask)
        ops[f"SDPA with mask, {backend}"] = forced
    for name, fn in ops.items():
        try:
            print(f"  {name:<40} {graph_time(fn):8.1f} us", flush=True)
        except Exception as e:  # a candidate that cannot be captured says so and the rest go on
            print(f"  {name:<40} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.6B")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="profile generate(compile=True) (--compile_sampler)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_gpu: no CUDA GPU: nothing measured")
        return 2
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3(Qwen3Config(**cfg, rope_theta=1e6))
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    model.reset_parameters()
    model.eval()
    prompts = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt)).tolist()
    run = lambda: generate(model, prompts, args.new, temperature=0, compile=args.compile)  # noqa: E731
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    whole = time.perf_counter() - start
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.config} batch {args.batch}, "
          f"{args.prompt} + {args.new} tokens: generate {whole * 1e3:.1f} ms, {whole / args.new * 1e3:.2f} ms per token")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) if kernels and hasattr(kernels[0], "device_time") else None
    print(f"{len(kernels)} GPU kernels in the call ({len(kernels) / args.new:.0f} per token)"
          + (f", {total / 1e3:.1f} ms of GPU time" if total else ""))
    print(f"\nOne decode layer's ops alone, each replayed in a CUDA graph (batch {args.batch}, "
          f"{args.prompt + args.new} slots):")
    pieces(cfg, args.batch, args.prompt + args.new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
