"""GPU memory of Qwen3-4B and Qwen3-8B shapes, measured, beside README's "Memory per GPU, worked out" table.

Random weights built on the GPU with model.py (no download); torch.cuda.max_memory_allocated after
reset_peak_memory_stats; GB = 1e9 bytes, as in the README. One GPU cannot hold the 8-way sharded training
state, so the parts are measured:

rollout: the full-size model in bfloat16 (what --fsdp gathers for a rollout) and one model.generate call as
    icrl.Sampler makes it: --rollout_batch 32 sequences, G = 8 copies of each prompt (prefilled once), every
    row given CONTEXT cache slots (prompt CONTEXT - NEW, NEW sampled tokens; the cache is allocated for prompt
    + max_new_tokens up front, so a short decode reaches the table's size). Reported: the weights; the KV cache
    and what else model.Decoder allocates (its fused qkv weights), from a Decoder built as generate builds it;
    and generate's peak minus the weights (cache, prefill activations, sampling, CUDA graphs).
training: icrl.update itself (its micro-batch loop, icrl.response_logprobs -> Qwen3.forward ->
    model.token_logprobs, the loss, backward), on a model wrapped by icrl.wrap_model with --fsdp --grad_ckpt
    --dtype bfloat16 (FSDP2 at world size 1: float32 master weights, bf16 compute through its param_dtype, as
    icrl.py does under --fsdp), at the real layer shapes but 2 and 4 layers, the embedding and head in full.
    Two micro-batches of MICRO sequences of CONTEXT_T + RESPONSE tokens; the peak is taken over the second,
    when the float32 gradients already exist; peak - (weights + grads) is what a micro-batch adds: kept
    layer inputs, the recomputed layer, gathered bf16 weights, log-prob chunks, gradient reductions. It is also
    given as at 8 GPUs, where a unit's reduce-scatter output is an eighth of its float32 gradient, not all of
    it (ReductionPeaks); the all-gather's input, likewise a whole unit in bf16 here, is left as it is (for a
    layer, 0.2-0.4 GB). Its growth per layer is the kept input; what stays at 0 layers is the fixed part;
    both extrapolate to 36 layers. SGD instead of AdamW: the optimizer state is in the worked 16 B/param, not
    measured here.

    python3 tests/memory_gpu.py                  # on one CUDA GPU (~1-2 minutes on an H100, estimated)
    python3 tests/memory_gpu.py --device cpu --tiny   # a dry run of the code at tiny shapes, no figures
"""
import argparse
import gc
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import icrl  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
from bench_gpu import CONFIGS  # noqa: E402  (the Qwen3 shapes, and a tiny one for dry runs)
from model import Decoder, Qwen3, Qwen3Config, generate  # noqa: E402

# README's worked figures (GB, 8 GPUs, --fsdp), to print beside the measured ones
WORKED = {
    "4B": dict(state=8.0, weights=8.0, cache=26, rollout_peak=42, kept=1.7, layer=2.0, gathered=2.2, logprobs=4.1,
               train_peak=18),
    "8B": dict(state=16.4, weights=16.4, cache=26, rollout_peak=59, kept=2.7, layer=2.6, gathered=6.1, logprobs=6.0,
               train_peak=34),
}
DEVICE = "cuda"
GB = 1e9


def allocated():
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else None


def start_peak():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return allocated()


def peak():
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def gb(x, digits=2):
    return "-" if x is None else f"{x / GB:.{digits}f}"


def free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def build(config, layers, dtype):
    """Qwen3 of `config`'s shapes with `layers` layers, random init (model.py's own), made on DEVICE directly."""
    cfg = Qwen3Config(**{**config, "num_hidden_layers": layers}, rope_theta=1e6, max_position_embeddings=40960)
    with torch.device("meta"):
        model = Qwen3(cfg)
    model = model.to(dtype).to_empty(device=DEVICE)
    model.tie_weights()
    model.reset_parameters()
    return model


def rollout(name, config, args):
    """The rollout row of one shape: bf16 weights, model.Decoder's allocation, generate's peak."""
    B, G, slots, new = args.rows, args.group, args.context, args.new
    t = time.perf_counter()
    base = allocated()
    model = build(config, config["num_hidden_layers"], torch.bfloat16).eval()
    weights = None if base is None else allocated() - base
    n_params = sum(p.numel() for p in model.parameters())
    # What generate allocates up front: its Decoder of B rows and prompt + max_new_tokens slots (after the
    # group's prompts are fanned out to their rows, take_rows), built here alone to split it up.
    before = allocated()
    with torch.inference_mode():
        decoder = Decoder(model, B, slots, decode_rows=B, decode_steps=new, static=DEVICE == "cuda")
    cache = sum(t_.numel() * t_.element_size() for c in decoder.cache
                for t_ in ((c.kv,) if c.kv is not None else (c.k, c.v)))
    decoder_other = None if before is None else allocated() - before - cache
    del decoder
    free()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config["vocab_size"], (slots - new,), generator=gen).tolist() for _ in range(B // G)]
    prompts = [p for p in prompts for _ in range(G)]  # a group's copies are adjacent, as icrl.rollout lays them out
    base_gen = start_peak()
    out = generate(model, prompts, new, temperature=1.0, seed=0)   # no stop ids: every row decodes NEW tokens
    assert all(len(g.tokens) == new for g in out)
    top = peak()
    transient = None if top is None else top - base_gen
    seconds = time.perf_counter() - t
    del model, out
    free()
    return dict(shape=name, params=n_params, weights=weights, cache=cache, per_token=cache / (B * slots),
                decoder_other=decoder_other, transient=transient, seconds=seconds)


def init_group():
    """A process group of one (FSDP2 needs one): NCCL on CUDA, gloo on CPU, on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = {}
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
        kwargs["device_id"] = torch.device("cuda", 0)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, **kwargs)


class ReductionPeaks:
    """The measured micro-batch's peak, split at FSDP2's gradient reductions (foreach_reduce, once per unit in
    backward). At world size 1 a unit's reduce-scatter output is its whole float32 gradient; at 8 GPUs it is an
    eighth. So a peak inside a reduction is also given as 8 GPUs would have it: less 7/8 of 4 B per parameter
    of the unit. Without that hook (another torch's FSDP2 internals) the peak is given whole."""

    def __init__(self):
        self.on, self.outside, self.inside, self.calls = False, 0, [], 0   # inside: (peak, excess at 8 GPUs)
        try:
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
        except ImportError:
            group = None
        self.group = group if hasattr(group, "foreach_reduce") else None

    def mark(self):
        if DEVICE == "cuda":
            self.outside = max(self.outside, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def __enter__(self):
        if self.group is not None:
            self.real = real = self.group.foreach_reduce

            def reduce(*a, **k):
                if not self.on:
                    return real(*a, **k)
                grads = k["unsharded_grads"] if "unsharded_grads" in k else a[1]
                excess = 4 * sum(g.numel() for g in grads) * 7 / 8   # read now: foreach_reduce empties the list
                self.mark()
                out = real(*a, **k)
                self.calls += 1
                if DEVICE == "cuda":
                    self.inside.append((torch.cuda.max_memory_allocated(), excess))
                    torch.cuda.reset_peak_memory_stats()
                return out

            self.group.foreach_reduce = reduce
        return self

    def __exit__(self, *exc):
        if self.group is not None:
            self.group.foreach_reduce = self.real

    def peaks(self):
        """(the peak, the peak as at 8 GPUs, where the latter was), or Nones on the CPU."""
        if DEVICE != "cuda":
            return None, None, "-"
        self.mark()
        raw = max([self.outside] + [p for p, _ in self.inside])
        at8, where = self.outside, "outside reductions"
        for p, excess in self.inside:
            if p - excess > at8:
                at8, where = p - excess, f"reducing a unit of {excess / 3.5 / 1e9:.2f}B parameters"
        return raw, at8, where


def training(name, config, layers, args):
    """One icrl.update over two micro-batches; the peak over the second, above the weights and grads."""
    train_args = icrl.parse_args(["--task", "arithmetic", "--fsdp", "--grad_ckpt", "--dtype", "bfloat16", "--micro_batch", str(args.micro),
                                  "--batch_prompts", "1", "--temperature", "1.0"])
    ctx = icrl.Dist(rank=0, world=1, device=torch.device(DEVICE))
    t = time.perf_counter()
    model = build(config, layers, torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model = icrl.wrap_model(model, train_args, ctx)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=train_args.lr)   # stateless: see the docstring
    gen = torch.Generator().manual_seed(1)
    V = config["vocab_size"]
    samples = [icrl.TrainSample(context=torch.randint(0, V, (args.context_t,), generator=gen).tolist(),
                                response=torch.randint(0, V, (args.response,), generator=gen).tolist(),
                                is_critic=i % 4 == 3, adv=(-1.0) ** i)
               for i in range(2 * args.micro)]
    calls, seen = [0], {}
    real = icrl.response_logprobs
    split = ReductionPeaks()

    def measured(*a, **k):  # the second micro-batch's forward starts: grads exist, nothing else of the first
        calls[0] += 1
        if calls[0] == 2:
            seen["base"] = start_peak()
            split.on = True
        return real(*a, **k)

    icrl.response_logprobs = measured
    try:
        with split:
            stats = icrl.update(model, optimizer, [samples], train_args, ctx, step=0)
    finally:
        icrl.response_logprobs = real
    assert calls[0] == 2 and stats["updates"] == 1, (calls, stats)
    raw, at8, where = split.peaks()
    if split.group is not None and split.calls != layers + 1:   # a unit per layer and the root, else say so
        where += f" (hook saw {split.calls} reductions, not {layers + 1})"
    state = 8 * n_params   # float32 weights and grads, unsharded at world size 1
    base = seen["base"]
    seconds = time.perf_counter() - t
    del model, optimizer
    free()
    return dict(shape=name, layers=layers, params=n_params, state=state,
                resident_other=None if base is None else base - state,
                added=None if raw is None else raw - state, added8=None if at8 is None else at8 - state,
                where=where, seconds=seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="4B,8B", help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--rows", type=int, default=32, help="rollout: sequences per generate call (--rollout_batch)")
    parser.add_argument("--group", type=int, default=8, help="rollout: copies of each prompt (G)")
    parser.add_argument("--context", type=int, default=5600, help="rollout: cache slots per row, prompt + new")
    parser.add_argument("--new", type=int, default=8, help="rollout: tokens sampled per row")
    parser.add_argument("--layers", default="2,4", help="training: layer counts measured (two or more)")
    parser.add_argument("--micro", type=int, default=2, help="training: sequences per micro-batch (--micro_batch)")
    parser.add_argument("--context_t", type=int, default=2560, help="training: context tokens per sequence")
    parser.add_argument("--response", type=int, default=2048, help="training: response tokens per sequence")
    parser.add_argument("--skip", default="", help="rollout and/or training: parts not to run")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's code, no figures")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (with --device cpu)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"memory_gpu: no CUDA GPU visible to torch {torch.__version__}: nothing measured")
        return 2
    if args.tiny:
        args.configs, args.rows, args.group, args.context, args.new = "tiny", 8, 4, 64, 4
        args.layers, args.context_t, args.response = "1,2", 24, 16
    names = args.configs.split(",")
    layer_counts = sorted(map(int, args.layers.split(",")))
    device_name = (f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
                   if DEVICE == "cuda" else DEVICE)
    print(f"memory_gpu: {device_name}; torch {torch.__version__}; random weights built on the device; GB = 1e9 bytes; "
          f"(w) = README's worked figure")
    ok = True

    if "rollout" not in args.skip:
        print(f"\n## rollout: bf16 weights + one generate call, {args.rows} rows = {args.rows // args.group} prompts "
              f"x G {args.group}, {args.context} cache slots per row ({args.context - args.new} prompt + {args.new} "
              f"new), temperature 1\n")
        print("| shape | parameters | bf16 weights GB (w) | KV cache GB (w) | cache B/token (w) | Decoder's other "
              "buffers GB | generate peak - weights GB | rollout peak on 8 GPUs GB = state (w) + these two (w) "
              "| s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in names:
            w = WORKED.get(name, {})
            c = CONFIGS[name]
            worked_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
            try:
                r = rollout(name, c, args)
            except Exception as error:  # noqa: BLE001  (an OOM: say so, go on)
                if not is_oom(error):
                    raise
                r = f"OOM: {str(error).splitlines()[0][:200]}"
            if isinstance(r, str):   # out of the except block, so its traceback no longer holds the tensors
                free()
                print(f"| {name} | {r} |")
                ok = False
                continue
            per_gpu = (None if r["transient"] is None or "state" not in w
                       else w["state"] * GB + r["weights"] + r["transient"])
            print(f"| {name} | {count(r['params'])} | {gb(r['weights'])} ({w.get('weights', '-')}) | "
                  f"{gb(r['cache'])} ({w.get('cache', '-')}) | {r['per_token']:,.0f} ({worked_token:,}) | "
                  f"{gb(r['decoder_other'])} | {gb(r['transient'])} | {gb(per_gpu, 1)} "
                  f"({w.get('rollout_peak', '-')}) | {r['seconds']:.1f} |", flush=True)

    if "training" not in args.skip:
        init_group()
        tokens = args.micro * (args.context_t + args.response)
        print(f"\n## training micro-batch: icrl.update, --fsdp --grad_ckpt --dtype bfloat16 at world size 1, "
              f"{args.micro} x {args.context_t + args.response} tokens ({args.context_t} context + {args.response} "
              f"response), the peak of the 2nd micro-batch\n")
        print("| shape | layers | parameters | fp32 weights + grads GB | else resident before the 2nd GB | "
              "peak - weights - grads GB | the same as at 8 GPUs GB | where | s |")
        print("|---|---|---|---|---|---|---|---|---|")
        measured = {}
        for name in names:
            for layers in layer_counts:
                try:
                    r = training(name, CONFIGS[name], layers, args)
                except Exception as error:  # noqa: BLE001
                    if not is_oom(error):
                        raise
                    r = f"OOM: {str(error).splitlines()[0][:200]}"
                if isinstance(r, str):
                    free()
                    print(f"| {name} | {layers} | {r} |")
                    ok = False
                    continue
                measured.setdefault(name, {})[layers] = r["added8"]
                print(f"| {name} | {layers} | {count(r['params'])} | {gb(r['state'])} | {gb(r['resident_other'])} | "
                      f"{gb(r['added'])} | {gb(r['added8'])} | {r['where']} | {r['seconds']:.1f} |", flush=True)
        print(f"\nFrom the figures as at 8 GPUs. per layer: the growth of (peak - weights - grads) per layer "
              f"(least squares over {args.layers} layers); fixed: what is left at 0 layers (root: embedding, head, "
              f"log-probs; the recomputed and the gathered layers). Worked: kept = all layers' bf16 inputs; fixed = "
              f"recomputed layer + gathered bf16 weights + log-probs; per-GPU peak = state 16 B/param / 8 + this "
              f"micro-batch.\n")
        print("| shape | per layer MB | per layer per token KB (w: hidden x 2 B) | fixed GB (w) | at 36 layers GB "
              "(w: the four rows) | training peak on 8 GPUs GB (w) |")
        print("|---|---|---|---|---|---|")
        for name, by_layers in measured.items():
            c, w = CONFIGS[name], WORKED.get(name, {})
            xs = sorted(by_layers)
            if len(xs) < 2 or any(by_layers[x] is None for x in xs):
                print(f"| {name} | - | - | - | - | - |")
                continue
            mx, my = sum(xs) / len(xs), sum(by_layers[x] for x in xs) / len(xs)
            slope = sum((x - mx) * (by_layers[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
            fixed = my - slope * mx
            full = fixed + c["num_hidden_layers"] * slope
            worked_fixed = (w["layer"] + w["gathered"] + w["logprobs"]) if w else "-"
            worked_full = (w["kept"] + w["layer"] + w["gathered"] + w["logprobs"]) if w else "-"
            per_gpu = w["state"] * GB + full if w else None
            print(f"| {name} | {slope / 1e6:.0f} | {slope / tokens / 1e3:.1f} ({c['hidden_size'] * 2 / 1e3:.1f}) | "
                  f"{gb(fixed)} ({worked_fixed if isinstance(worked_fixed, str) else f'{worked_fixed:.1f}'}) | "
                  f"{gb(full)} ({worked_full if isinstance(worked_full, str) else f'{worked_full:.1f}'}) | "
                  f"{gb(per_gpu, 1)} ({w.get('train_peak', '-')}) |", flush=True)
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
