"""A sharded-optimizer resume on 2 gloo ranks (issue 14, item 3).

    torchrun --nproc_per_node 2 tests/dist_resume.py OUT [--fsdp]

Straight: STEPS optimizer steps of update() (AdamW, as icrl.train builds it) on dist_update.py's global
batch, its advantages changed every step, with icrl.save_checkpoint at step SAVE_AT into OUT/run (weights by
rank 0, optimizer files by every rank through DCP). Resumed: a fresh model and optimizer loaded from that
checkpoint as icrl.train loads them (read_trainer_state, load_model, load_optimizer), trained from its step
to STEPS. Every rank compares its own part of the weights and of the AdamW state, straight against resumed,
bit for bit. The checkpoint is also loaded under the other wrapping (DDP <-> FSDP2; --fsdp may change on
resume): its full optimizer state equals the one saved. Rank 0 writes OUT/result.json (the mismatches, the
optimizer files' sizes) and OUT/full_optimizer.pt (the full state at SAVE_AT, for test_scale.py's
one-process load of the same checkpoint)."""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import icrl  # noqa: E402
from dist_update import CONFIG, QUERIES, global_batch  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402

STEPS, SAVE_AT = 4, 2
# dist_update.py's model with a wider vocabulary: 0.6M parameters, so that the tensors, not DCP's few KB per
# tensor of framing, make the optimizer files' sizes (test_scale.py compares them with the AdamW moments)
CONFIG = dict(CONFIG, vocab_size=4096, hidden_size=64, intermediate_size=128, head_dim=16)


def train(model, optimizer, args, ctx, start, stop, save=None):
    per_rank = QUERIES // ctx.world
    for step in range(start, stop):
        mine = global_batch()[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
        for q, samples in enumerate(mine):
            for i, s in enumerate(samples):
                s.adv = s.adv * (1 + 0.5 * step) - 0.1 * ((q + i + step) % 3)
        icrl.old_logprobs(icrl.unwrap(model), [s for qs in mine for s in qs], args, ctx)
        stats = icrl.update(model, optimizer, mine, args, ctx, step)
        assert stats["updates"] == 1, stats
        if save and step + 1 == SAVE_AT:
            save(step + 1)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def differences(a_model, a_opt, b_model, b_opt):
    """Names of this rank's weights and AdamW tensors that differ in any bit (plus the learning rates)."""
    differ = []
    for (name, p), q in zip(icrl.unwrap(a_model).named_parameters(), icrl.unwrap(b_model).parameters()):
        if not torch.equal(local(p.detach()), local(q.detach())):
            differ.append(name)
        sa, sb = a_opt.state[p], b_opt.state[q]
        if sorted(sa) != sorted(sb):
            differ.append(f"{name}: state keys {sorted(sa)} {sorted(sb)}")
            continue
        differ += [f"{name}.{k}" for k in sa if not torch.equal(local(sa[k]), local(sb[k]))]
    if [g["lr"] for g in a_opt.param_groups] != [g["lr"] for g in b_opt.param_groups]:
        differ.append("lr")
    return differ


def full_optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resumed(args, ctx, checkpoint, tokenizer):
    """A model and an optimizer loaded the way icrl.train loads them on --resume."""
    args = copy.copy(args)
    args.resume = checkpoint
    model = icrl.wrap_model(icrl.load_model(args, ctx, tokenizer), args, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    icrl.load_optimizer(model, optimizer, checkpoint)
    return model, optimizer


def main():
    from transformers import AutoTokenizer
    from data import build_char_tokenizer
    out, fsdp = sys.argv[1], "--fsdp" in sys.argv
    ctx = icrl.init_distributed()
    folder = os.path.join(out, f"tokenizer-rank{ctx.rank}")   # in the test's own folder, removed with it
    build_char_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    run = os.path.join(out, "run")
    args = icrl.parse_args(["--batch_prompts", str(QUERIES), "--micro_batch", "2", "--lr", "1e-2", "--lr_warmup", "3",
                            "--weight_decay", "0.1", "--temperature", "0.9", "--out", run]
                           + (["--fsdp"] if fsdp else []))
    os.makedirs(run, exist_ok=True)

    torch.manual_seed(0)
    model = icrl.wrap_model(Qwen3(Qwen3Config(**CONFIG)), args, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    saved = {}

    def save(step):
        icrl.save_checkpoint(model, optimizer, tokenizer, args, ctx, step, f"step_{step}")
        saved["full"] = copy.deepcopy(full_optimizer_state(model, optimizer))  # on CPU it aliases the live state

    train(model, optimizer, args, ctx, 0, STEPS, save)

    checkpoint = icrl.resolve_checkpoint(run)
    start = icrl.read_trainer_state(checkpoint)["step"]
    again, again_opt = resumed(args, ctx, checkpoint, tokenizer)
    train(again, again_opt, args, ctx, start, STEPS)
    differ = differences(model, optimizer, again, again_opt)
    # the state is not trivial: every moment is non-zero (but the embedding's: the batch uses 63 of its rows)
    moved = all(float(local(optimizer.state[p]["exp_avg"]).abs().max()) > 0
                for name, p in icrl.unwrap(model).named_parameters() if "embed_tokens" not in name)

    other = copy.copy(args)
    other.fsdp = not fsdp
    other_model, other_opt = resumed(other, ctx, checkpoint, tokenizer)
    other_full = full_optimizer_state(other_model, other_opt)
    other_differ = []
    if ctx.main:
        want, got = saved["full"]["state"], other_full["state"]
        other_differ = [f"{n}.{k}" for n in want for k in want[n] if not torch.equal(want[n][k], got[n][k])]
        other_differ += [] if sorted(want) == sorted(got) else ["names"]

    found = [None] * ctx.world
    dist.all_gather_object(found, {"differ": differ, "moved": moved})
    if ctx.main:
        files = os.path.join(checkpoint, icrl.OPTIMIZER)
        result = {"resumed_at": start, "differ": [d for f in found for d in f["differ"]],
                  "moved": all(f["moved"] for f in found), "other_wrapping_differ": other_differ,
                  "params": sum(p.numel() for p in Qwen3(Qwen3Config(**CONFIG)).parameters()),
                  "files": {name: os.path.getsize(os.path.join(files, name)) for name in os.listdir(files)}}
        torch.save(saved["full"], os.path.join(out, "full_optimizer.pt"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    icrl.shutdown(ctx, fsdp=True)  # FSDP2 was used either way (the other wrapping)


if __name__ == "__main__":
    main()
