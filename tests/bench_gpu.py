"""GPU sampler benchmark: model.generate against transformers' generate, and against the memory-bandwidth floor.

Random Qwen3-0.6B- (and with --configs 0.6B,4B, Qwen3-4B-) shaped weights, bfloat16, on one CUDA GPU; the same
weights and prompts for every peer; greedy; every row decodes exactly `--new` tokens (no stop id; transformers
with min_new_tokens = max_new_tokens). Batch 1, 16, 64 and 256 by default. Peers (`--peers`): ours (decode
steps replayed as CUDA graphs, generate's default on CUDA; graph captures are inside the timed call), compiled
(the same with each layer of a step through torch.compile, generate(compile=True); its warm-up is a whole call,
so compilation is outside the timed calls), eager (ours with graphs=False: every kernel launched; not run by
default), and transformers (hf).

same 1st: rows whose first new token equals transformers' (from the prefill's logits). Whole sequences differ:
random weights give near-uniform logits over 151,936 tokens, so bfloat16 rounding flips near-ties; greedy
equality is checked in float32 by tests/test_cuda.py.

floor: the time the decode steps cannot go below, the bytes each step must read from GPU memory (every
weight once, the lm_head included, plus the KV cache up to that step) over the GPU's memory bandwidth,
measured here with a device-to-device copy; prefill is not in it (it is compute-bound), so floor tok/s is an
upper bound on decode speed. tok/s = batch x new tokens / seconds of the whole generate call, prefill included.
Issue 14's target: >= 3x transformers at batch 64 and within 1.5x of the floor.

Run: python tests/bench_gpu.py [--configs 0.6B,4B] [--batches 1,16,64,256]   (writes bench_results/gpu.json)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import Qwen3, Qwen3Config, generate  # noqa: E402

CONFIGS = {  # Qwen3-0.6B, 4B and 8B's shapes (config.json of the released checkpoints); tests/memory_gpu.py too
    "0.6B": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "4B": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,   # dry runs
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
DEVICE = "cuda"
PEERS = ("ours", "compiled", "eager", "hf")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bandwidth() -> float:
    """GPU memory bandwidth in bytes/s: a 1 GiB device-to-device copy reads and writes 1 GiB each."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        y.copy_(x)
    sync()
    seconds = time.perf_counter() - start
    del x, y
    return 2 * n * (1 << 30) / seconds


def floor_seconds(config, n_params, batch, prompt_len, new, bytes_per_s) -> float:
    """Decode steps only: each reads every weight once (2 bytes each; a tied embedding is the lm_head, read
    once) and the KV cache of every row up to its current length."""
    kv_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 2
    total = 0.0
    for step in range(new - 1):  # the first token comes from the prefill's logits
        total += 2 * n_params + batch * (prompt_len + step + 1) * kv_per_token
    return total / bytes_per_s


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="0.6B", help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per peer after a warm-up; the best counts")
    parser.add_argument("--peers", default="ours,compiled,hf", help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "gpu.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (--configs tiny), no figures")
    args = parser.parse_args()
    peers = [p for p in PEERS if p in args.peers.split(",")]
    if unknown := set(args.peers.split(",")) - set(PEERS):
        parser.error(f"--peers {args.peers}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PEERS)})")
    if "hf" not in peers:
        parser.error("--peers must include hf: the speed-ups are against it")
    if unknown := set(args.configs.split(",")) - set(CONFIGS):
        parser.error(f"--configs {args.configs}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(CONFIGS)})")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU visible to torch {torch.__version__}: nothing measured")
        return 2
    import transformers
    transformers.logging.set_verbosity_error()
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    bytes_per_s = bandwidth()
    print(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"measured copy bandwidth {bytes_per_s / 1e9:.0f} GB/s; bfloat16, greedy, prompt {args.prompt} + "
          f"{args.new} new tokens; best of {args.repeats} after a warm-up")
    ratios = [p for p in peers if p != "hf"]
    header = (f"{'config':<6} {'batch':>5} " + " ".join(f"{p + ' tok/s':>14}" for p in peers) + " "
              + " ".join(f"{p + ' vs hf':>14}" for p in ratios) + f" {'floor tok/s':>11} "
              + " ".join(f"{p + '/floor':>14}" for p in ratios) + f" {'same 1st':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.configs.split(","):
        config = CONFIGS[name]
        torch.manual_seed(0)
        with torch.device(DEVICE):
            hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config, rope_theta=1e6))
        hf = hf.to(torch.bfloat16).eval()
        hf.generation_config.eos_token_id = None
        with torch.device("meta"):
            ours = Qwen3(Qwen3Config(**config, rope_theta=1e6))
        ours = ours.to(torch.bfloat16).to_empty(device=DEVICE)
        ours.tie_weights()
        ours.load_state_dict(hf.state_dict())
        ours.eval()
        n_params = sum(p.numel() for p in ours.parameters())
        for batch in map(int, args.batches.split(",")):
            ids = torch.randint(0, config["vocab_size"], (batch, args.prompt),
                                generator=torch.Generator().manual_seed(1)).to(DEVICE)
            prompts = ids.tolist()
            runs = {
                "ours": lambda n: generate(ours, prompts, n, temperature=0),
                "compiled": lambda n: generate(ours, prompts, n, temperature=0, compile=True),
                "eager": lambda n: generate(ours, prompts, n, temperature=0, graphs=False),
                "hf": lambda n: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
            }
            seconds, outputs = {}, {}
            with torch.inference_mode():
                for peer in peers:
                    try:  # warm-up: kernels, allocator; compiled: every shape it compiles for, so a whole call
                        runs[peer](args.new if peer == "compiled" else 4)
                        seconds[peer], outputs[peer] = timed(lambda: runs[peer](args.new), args.repeats)
                    except Exception as e:  # a peer that fails says why, and the others still run
                        print(f"{name} batch {batch}: {peer} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if "hf" not in seconds:
                continue
            ref = outputs["hf"][:, args.prompt:].tolist()
            same = {p: sum(g.tokens[0] == r[0] for g, r in zip(outputs[p], ref)) / batch
                    for p in ratios if p in outputs}
            tokens = batch * args.new
            floor = floor_seconds(config, n_params, batch, args.prompt, args.new, bytes_per_s)
            row = dict(config=name, params=n_params, batch=batch, prompt=args.prompt, new=args.new,
                       floor_tok_s=tokens / floor, seconds=seconds, same_first_token=same,
                       **{f"{p}_tok_s": tokens / t for p, t in seconds.items()},
                       **{f"{p}_vs_hf": seconds["hf"] / seconds[p] for p in ratios if p in seconds},
                       **{f"{p}_over_floor": seconds[p] / floor for p in ratios if p in seconds})
            rows.append(row)
            cell = lambda key, fmt: f"{format(row[key], fmt) if key in row else '-':>14}"  # noqa: E731
            print(f"{name:<6} {batch:>5} " + " ".join(cell(f"{p}_tok_s", ".0f") for p in peers) + " "
                  + " ".join(cell(f"{p}_vs_hf", ".2f") for p in ratios) + f" {row['floor_tok_s']:>11.0f} "
                  + " ".join(cell(f"{p}_over_floor", ".2f") for p in ratios) + " "
                  + "/".join(f"{100 * v:.0f}%" for v in same.values()), flush=True)
        del hf, ours
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                                   bandwidth_bytes_per_s=bytes_per_s, results=rows), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
