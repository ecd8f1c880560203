"""ICRL training: one Qwen3 learns to solve, to critique its own attempts, and to internalise the
critique-guided improvements into its critique-free solver (../shared/SPEC.md is the method).

Run (the embedded default: tiny random Qwen3 + character tokenizer on `arithmetic`, CPU):
    python icrl.py                                             # one process
    torchrun --standalone --nproc_per_node 2 icrl.py           # what `make train` runs
Real checkpoints on GPUs (README has the full commands for Qwen3-4B/8B):
    torchrun --nproc_per_node 8 icrl.py --model /path/Qwen3-8B --task math --train_file train.jsonl \
        --eval_file test.jsonl --dtype bfloat16 --fsdp --grad_ckpt --out runs/qwen3-8b
"""
import torch

# ==================================================================================================
# SPEC §2 equations: one function each, on plain tensors. Per-sample tensors are (N,), per-token
# tensors (N, T) with a 0/1 mask.
# ==================================================================================================


def critic_gain(r_init, r_refined):
    """SPEC §2.4: the critic's reward is the solver's gain after the critique, g = r' - r in [-1, 1]."""
    return r_refined - r_init


def group_advantages(values, group_ids, eps=1e-6):
    """SPEC §2.5: A = (v - mean(group)) / (std(group) + eps), std with Bessel's correction.

    A constant group gives A = 0; so does a group of one (its Bessel std is undefined, and one sample
    carries no relative signal)."""
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    values = values.double()  # sums of many rewards: accumulate in float64
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, group, values)
    mean = (total / count)[group]
    sq_dev = torch.zeros_like(count).index_add_(0, group, (values - mean) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()[group]
    adv = (values - mean) / (std + eps)
    return torch.where(count[group] > 1, adv, torch.zeros_like(adv)).to(out_dtype)


def calibration_weights(logp_free, logp_cond, mask, mode="token", clip=1.0):
    """SPEC §2.6: distribution-calibration weight of each refinement token, stop-gradient.

    token: w_t = min(exp(l_free_t - l_cond_t), clip). seq: one weight per refinement,
    min(exp(mean_t(l_free_t - l_cond_t)), clip): a geometric mean, never the raw product, which
    explodes with length. none: w = 1 (naive transfer). Masked positions get 0."""
    mask = mask.to(logp_free.dtype)
    log_ratio = (logp_free - logp_cond).detach()
    if mode == "token":
        weights = log_ratio.exp().clamp(max=clip)
    elif mode == "seq":
        mean_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        weights = mean_log_ratio.exp().clamp(max=clip)[:, None].expand_as(log_ratio)
    elif mode == "none":
        weights = torch.ones_like(log_ratio)
    else:
        raise ValueError(f"calibration mode must be token, seq or none, got {mode!r}")
    return weights * mask


def clipped_token_loss(logp, old_logp, adv, weight, mask, clip_low=0.2, clip_high=0.28):
    """SPEC §2.7: loss_t = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A), per token,
    unreduced; rho_t = exp(logp_t - old_logp_t). The asymmetric clip is DAPO's."""
    ratio = (logp - old_logp).exp()
    adv = adv[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return -weight * surrogate * mask


def rolewise_token_mean(token_loss, mask, is_critic, solver_tokens, critic_tokens, critic_coef=1.0,
                        world_size=1):
    """SPEC §2.7 aggregation: L = L_solver + critic_coef * L_critic, each role's token-loss sum over the
    global batch divided by that role's global response-token count.

    Each rank holds a slice, and DDP averages gradients over ranks, so the local sums are scaled by
    world_size / N_global: the average of the ranks' gradients is then exactly the global token mean."""
    per_sample = (token_loss * mask).sum(-1)
    solver_sum = per_sample[~is_critic].sum()
    critic_sum = per_sample[is_critic].sum()
    loss = solver_sum * (world_size / max(solver_tokens, 1))
    return loss + critic_coef * critic_sum * (world_size / max(critic_tokens, 1))
