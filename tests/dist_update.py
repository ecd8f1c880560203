"""One update() on a fixed synthetic global batch; rank 0 saves the resulting weights.

    python tests/dist_update.py OUT.pt                                  # 1 process
    torchrun --nproc_per_node 2 tests/dist_update.py OUT.pt [--fsdp]    # 2 processes, gloo
    ... [--zero_advantage]   # with samples of A = 0: one in every query, and every one of queries 2-3 (rank 1);
                             # l_old as train_step takes it with one update per step (the update's own forward)

With plain SGD at lr 1 and no gradient clipping the weight change is the gradient itself, so equal
weights mean equal gradients (test_icrl.py compares them)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import icrl  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=10000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
QUERIES = 4


def global_batch(zero_advantage=False):
    """4 queries; rank slices differ in length so a per-rank token mean would differ from the global one, and
    in size, as the gate makes them (SPEC §2.2: a success gets no critique, no retry): queries 0-1 (rank 0 of 2)
    hold 10 samples and 2 retries, queries 2-3 (rank 1) 13 samples and 4 retries. `zero_advantage`: each query
    also holds a first attempt of A = 0, and every sample of queries 2-3 has A = 0, so that rank 1 of 2 has no
    sample with a gradient (icrl.update runs a padding micro-batch there)."""
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 64, (n,), generator=gen).tolist()
    per_query = []
    for q in range(QUERIES):
        context = ids(5 + q)
        samples = []
        for i in range(3):
            n = 2 + (q * 7 + i * 3) % 9
            adv = float(torch.randn((), generator=gen))
            samples.append(icrl.TrainSample(context, ids(n), False, adv))
        samples.append(icrl.TrainSample(context, ids(4), False, 0.7, calib_context=ids(9)))   # a retry
        samples.append(icrl.TrainSample(ids(6), ids(1 + q), True, -0.4 + 0.3 * q))             # a critique
        if q == QUERIES - 1:  # more chains critiqued on this query than on the others
            samples.append(icrl.TrainSample(context, ids(3), False, -0.2, calib_context=ids(7)))
            samples.append(icrl.TrainSample(context, ids(5), False, 0.9, calib_context=ids(11)))
            samples.append(icrl.TrainSample(ids(8), ids(2), True, 0.5))
        if zero_advantage:
            samples.append(icrl.TrainSample(context, ids(3 + q), False, 0.0))
            for s in samples if q >= 2 else []:
                s.adv = 0.0
        per_query.append(samples)
    return per_query


def main():
    out, fsdp = sys.argv[1], "--fsdp" in sys.argv
    ctx = icrl.init_distributed()
    args = icrl.parse_args(["--batch_prompts", str(QUERIES), "--lr_warmup", "1", "--micro_batch", "2", "--grad_clip", "1e9",
                            "--critic_coef", "0.5", "--temperature", "0.9"] + (["--fsdp"] if fsdp else []))
    torch.manual_seed(0)
    model = icrl.wrap_model(Qwen3(Qwen3Config(**CONFIG)), args, ctx)
    per_rank = QUERIES // ctx.world
    zero_advantage = "--zero_advantage" in sys.argv
    mine = global_batch(zero_advantage)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    samples = [s for qs in mine for s in qs]
    if zero_advantage:  # as train_step does with one update per step: l_old of the samples left out only
        icrl.old_logprobs(icrl.unwrap(model), samples, args, ctx, [s for s in samples if not s.has_gradient])
    else:
        icrl.old_logprobs(icrl.unwrap(model), samples, args, ctx)
        for s in samples:  # move off rho = 1 so the clip and the ratio both matter
            s.old_logp = s.old_logp + 0.1 * torch.arange(len(s.old_logp)) % 0.3
    icrl.update(model, torch.optim.SGD(model.parameters(), lr=1.0), mine, args, ctx, step=0)
    state = icrl.full_model_state(model, ctx)
    if ctx.main:
        torch.save(state, out)
    icrl.shutdown(ctx, fsdp)


if __name__ == "__main__":
    main()
