"""Benchmark: the turns of multi-turn episodes with each episode's KV cache kept (model.Session) against
prefilling every episode's whole history again on each turn, as run_episodes would without it.

The tiny default model (random weights), greedy, no stop id: every row generates exactly `new` tokens per
turn, then gets `obs` random observation tokens, for `turns` turns; both peers see the same tokens (checked).
Shapes: a guess-like episode (short prompt, short turns) and a longer, agentic-like one. Timings are the best
of interleaved rounds, in this process, on the same inputs.

Run: .venv/bin/python tests/bench_turns.py      (writes bench_results/turns.json)
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import Qwen3, Qwen3Config, Session, generate  # noqa: E402

CONFIG = dict(vocab_size=116, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)
SHAPES = {  # name -> (rows, prompt tokens, turns, new tokens per turn, observation tokens per turn)
    "guess-like": (128, 30, 6, 8, 10),
    "agentic-like": (32, 200, 8, 32, 60),
}


def episodes(model, prompts, turns, new, observations, keep_cache):
    """Every row through `turns` turns; returns each row's final sequence."""
    session = Session() if keep_cache else None
    histories, continues = [list(p) for p in prompts], None
    for turn in range(turns):
        gens = generate(model, histories, new, temperature=0, session=session, continues=continues)
        histories = [h + g.tokens + obs[turn] for h, g, obs in zip(histories, gens, observations)]
        continues = list(range(len(histories)))
    return histories


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(**CONFIG)).eval()
    rows_out = []
    print(f"tiny default model, {torch.get_num_threads()} thread(s), greedy; best of interleaved rounds (>= 3, >= 10 s)")
    print(f"{'shape':<13} {'rows':>4} {'prompt':>6} {'turns':>5} {'new+obs':>7} {'kept s':>7} {'re-prefill s':>12} {'speedup':>7}")
    for name, (rows, prompt, turns, new, obs) in SHAPES.items():
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, CONFIG["vocab_size"], (rows, prompt), generator=gen).tolist()
        observations = [[torch.randint(0, CONFIG["vocab_size"], (obs,), generator=gen).tolist() for _ in range(turns)]
                        for _ in range(rows)]
        peers = {"kept": True, "re-prefill": False}
        best, outputs, rounds, start = dict.fromkeys(peers, float("inf")), {}, 0, time.perf_counter()
        for keep in peers.values():  # warm-up
            episodes(model, prompts[:4], 2, 4, observations, keep)
        while rounds < 3 or time.perf_counter() - start < 10:
            for peer in (list(peers) if rounds % 2 == 0 else list(peers)[::-1]):
                t = time.perf_counter()
                outputs[peer] = episodes(model, prompts, turns, new, observations, peers[peer])
                best[peer] = min(best[peer], time.perf_counter() - t)
            rounds += 1
        assert outputs["kept"] == outputs["re-prefill"], "the two peers sampled different tokens"
        speedup = best["re-prefill"] / best["kept"]
        rows_out.append(dict(shape=name, rows=rows, prompt=prompt, turns=turns, new=new, obs=obs, rounds=rounds,
                             seconds=best, speedup=speedup))
        print(f"{name:<13} {rows:>4} {prompt:>6} {turns:>5} {f'{new}+{obs}':>7} {best['kept']:>7.3f} "
              f"{best['re-prefill']:>12.3f} {speedup:>6.2f}x", flush=True)
    out = ROOT / "bench_results" / "turns.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(threads=torch.get_num_threads(), torch=torch.__version__, results=rows_out),
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
