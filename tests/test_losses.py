"""SPEC §2.5–2.8 equations against numbers worked out by hand (not the code against itself)."""
import math

import pytest
import torch

from icrl import (calibration_weights, clipped_token_loss, critic_gain, group_advantages,
                  rolewise_token_mean)

EPS = 1e-6


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=tol)


# --- §2.5 critic reward: 1 if the retry succeeds, else r_{k+1} - r_k --------------------------------

def test_critic_gain_two_branches_by_hand():
    r_before = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.0])
    r_after = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.25, 0.7, 0.4])
    # success branch: 1 whatever came before (rows 0, 2, 4); otherwise the difference:
    # 0 - 0 = 0, 0 - 1 = -1 (a broken success, under --critic_gate always), 0.25 - 0.5, 0.7 - 0.2, 0.4 - 0
    close(critic_gain(r_before, r_after), [1.0, 0.0, 1.0, -1.0, 1.0, -0.25, 0.5, 0.4])


# --- §2.6 group advantages ------------------------------------------------------------------------

def test_group_advantages_bessel_std_by_hand():
    # group 0: {1,0,0,0}: mean 1/4, Bessel var = (9/16 + 3/16)/3 = 1/4, std 1/2 -> A = (v - 1/4)/(1/2 + eps)
    # group 1: {1,1,0,0}: mean 1/2, var = 4 * 1/4 / 3 = 1/3, std = 0.5773503
    # group 2: gains {1,0,-1}: mean 0, var = 2/2 = 1 -> A = v / (1 + eps)
    values = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 0, -1])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    s1 = math.sqrt(1 / 3)
    expected = [0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS),
                0.5 / (s1 + EPS), 0.5 / (s1 + EPS), -0.5 / (s1 + EPS), -0.5 / (s1 + EPS),
                1 / (1 + EPS), 0.0, -1 / (1 + EPS)]
    close(group_advantages(values, groups), expected)
    close(expected[:4], [1.5, -0.5, -0.5, -0.5], tol=1e-5)  # the familiar rounded values


def test_group_advantages_sizes_one_two_and_five_in_one_batch():
    # SPEC §2.6: group sizes vary with the gate. size 1 {0.7} -> 0; size 2 {1, 0}: std sqrt(1/2) -> +/-0.7071;
    # size 5 {1, 0, 0, 0, 0}: mean 0.2, Bessel var (0.64 + 4 * 0.04) / 4 = 0.2 -> (1 - 0.2)/sqrt(0.2) = 1.78885,
    # (0 - 0.2)/sqrt(0.2) = -0.44721
    values = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([5, 5, 9, 7, 7, 5, 5, 5])  # 5: {0, 1, 0, 0, 0}, 9: {0.7}, 7: {0, 1}
    s5, s2 = math.sqrt(0.2), math.sqrt(0.5)
    close(group_advantages(values, groups),
          [-0.2 / (s5 + EPS), 0.8 / (s5 + EPS), 0.0, -0.5 / (s2 + EPS), 0.5 / (s2 + EPS),
           -0.2 / (s5 + EPS), -0.2 / (s5 + EPS), -0.2 / (s5 + EPS)])
    close(0.8 / s5, 1.78885, tol=1e-5)


def test_group_advantages_interleaved_and_unsorted_ids():
    # Same groups as above but shuffled in memory: membership, not position, defines a group.
    values = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([7, 3, 7, 3])  # group 7: {1, 0}, group 3: {0, 1}; std = sqrt(1/2)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    close(group_advantages(values, groups), [a, -a, -a, a])


def test_group_advantages_constant_and_singleton_groups_are_zero():
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # all-correct, all-wrong, and a group of one
    out = group_advantages(values, groups)
    close(out, [0.0] * 6)
    assert torch.isfinite(out).all()


def test_a_constant_group_of_partial_rewards_is_exactly_zero():
    """SPEC §2.6: a constant group gives A = 0, exactly, whatever its value: the float mean of 3 x 0.1 is not 0.1
    (v - mean = -1.4e-17, over a std of 2e-17 + 1e-6: A = -1.4e-11, not 0), and the update leaves out only
    samples of A = 0 (TrainSample.has_gradient). AgentGym's rewards are fractions (webshop's score / 100)."""
    values = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.0, 0.01], dtype=torch.float64)
    groups = torch.tensor([0] * 3 + [1] * 8 + [2] * 2)
    out = group_advantages(values, groups).tolist()
    assert out[:11] == [0.0] * 11
    assert out[11:] == pytest.approx([-0.005 / (0.01 / math.sqrt(2) + EPS), 0.005 / (0.01 / math.sqrt(2) + EPS)])


def test_group_advantages_eps_beside_the_std_not_inside_a_root():
    """SPEC §2.6 adds eps to the std, (v - mean) / (std + 1e-6); sqrt(var + eps) instead is the same only
    while the spread is large. Partial rewards 0.01 apart (a score out of 100): {0, 0.01}: mean 0.005, Bessel
    var = 2 * 0.005^2 / 1 = 5e-5, std = 0.01 / sqrt(2) = 0.0070711; A = +/-0.005 / (0.0070711 + 1e-6) =
    +/-0.70701 (sqrt(5e-5 + 1e-6) = 0.0071414 would give +/-0.70014)."""
    values = torch.tensor([0.0, 0.01], dtype=torch.float64)
    s = 0.01 / math.sqrt(2)
    close(group_advantages(values, torch.tensor([0, 0])), [-0.005 / (s + EPS), 0.005 / (s + EPS)])
    close(0.005 / (s + EPS), 0.70701, tol=1e-5)


# --- §2.7 distribution-calibration weights --------------------------------------------------------

def test_calibration_weights_token_mode_default_clip_is_two():
    # free - cond = [0, -ln 2, ln 3, ln 1.5, (pad)] -> exp = [1, 1/2, 3, 1.5] -> min(., W = 2) = [1, 1/2, 2, 1.5]:
    # W binds on token 2 and not on token 3; pad -> 0
    cond = torch.tensor([[-1.0, -0.5, -2.0, -0.3, -7.0]])
    free = cond + torch.tensor([[0.0, -math.log(2), math.log(3), math.log(1.5), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    close(calibration_weights(free, cond, mask), [[1.0, 0.5, 2.0, 1.5, 0.0]])
    close(calibration_weights(free, cond, mask, clip=1.0), [[1.0, 0.5, 1.0, 1.0, 0.0]])


def test_calibration_weights_skip_observation_tokens():
    # a 2-turn retry: action (2 tokens), observation (2 tokens, mask 0), action (1 token).
    # l_free - l_cond on actions = [ln 0.25, 0, ln 4] -> w = [0.25, 1, 2 (clipped from 4)]; observations 0.
    cond = torch.tensor([[-1.0, -2.0, -9.0, -9.0, -0.5]])
    free = cond + torch.tensor([[math.log(0.25), 0.0, 3.0, -3.0, math.log(4)]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    close(calibration_weights(free, cond, mask), [[0.25, 1.0, 0.0, 0.0, 2.0]])
    # seq: mean over the 3 action tokens of [ln 1/4, 0, ln 4] = 0 -> w = 1 on actions only
    close(calibration_weights(free, cond, mask, mode="seq"), [[1.0, 1.0, 0.0, 0.0, 1.0]])


def test_calibration_weights_seq_mode_geometric_mean():
    # row 0: diffs [-ln 2, -ln 2, 0] -> mean -2 ln2 / 3 -> w = 2^(-2/3) = 0.6299605 on its 3 tokens
    # row 1: diffs [ln 3, 0, pad]     -> mean ln3 / 2  -> 3^(1/2) = 1.7320508, kept under W = 2 (clipped at 1)
    cond = torch.zeros(2, 3)
    free = torch.tensor([[-math.log(2), -math.log(2), 0.0], [math.log(3), 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = 2 ** (-2 / 3)
    close(calibration_weights(free, cond, mask, mode="seq", clip=1.0), [[w, w, w], [1.0, 1.0, 0.0]])
    close(calibration_weights(free, cond, mask, mode="seq"), [[w, w, w], [math.sqrt(3), math.sqrt(3), 0.0]])


def test_calibration_weights_seq_mode_does_not_explode_with_length():
    # 400 tokens each 2x likelier under the critique: the raw product would be 2^-400; the
    # geometric mean stays at 1/2.
    cond = torch.zeros(1, 400)
    free = torch.full((1, 400), -math.log(2))
    close(calibration_weights(free, cond, torch.ones(1, 400), mode="seq"), torch.full((1, 400), 0.5))


def test_calibration_weights_none_mode_and_stopgrad():
    free = torch.tensor([[-3.0, -1.0]], requires_grad=True)
    cond = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    close(calibration_weights(free, cond, mask, mode="none"), [[1.0, 0.0]])
    w = calibration_weights(free, cond, mask, mode="token")
    assert not w.requires_grad  # stopgrad (§2.7): the weight scales the loss, it is never trained
    close(w, [[math.exp(-2.0), 0.0]])
    with pytest.raises(ValueError, match="mode"):
        calibration_weights(free, cond, mask, mode="product")


# --- §2.8 clipped token loss ----------------------------------------------------------------------

@pytest.mark.parametrize("adv, ratio, weight, expected", [
    (1.0, 1.5, 1.0, -1.28),   # A > 0, rho above 1 + eps_high: clipped to 1.28
    (1.0, 0.5, 1.0, -0.5),    # A > 0, rho below 1 - eps_low: min picks the unclipped 0.5
    (1.0, 1.1, 1.0, -1.1),    # A > 0 inside the range
    (-1.0, 1.5, 1.0, 1.5),    # A < 0, rho above range: min(-1.5, -1.28) = -1.5, unclipped
    (-1.0, 0.5, 1.0, 0.8),    # A < 0, rho below range: min(-0.5, -0.8) = -0.8, clipped
    (-2.0, 0.9, 1.0, 1.8),    # A < 0 inside the range
    (2.0, 1.1, 0.5, -1.1),    # weight scales the whole term: -0.5 * 2.2
    (0.0, 3.0, 1.0, 0.0),     # zero advantage: no signal
])
def test_clipped_token_loss_by_hand(adv, ratio, weight, expected):
    old = torch.tensor([[-2.0]])
    logp = old + math.log(ratio)
    out = clipped_token_loss(logp, old, torch.tensor([adv]), torch.tensor([[weight]]), torch.ones(1, 1))
    close(out, [[expected]])


def test_clipped_token_loss_masks_and_broadcasts_advantage():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.7], [0.5, 2.0, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = clipped_token_loss(logp, old, adv, torch.ones(2, 3), mask, clip_low=0.2, clip_high=0.28)
    close(out, [[-1.28, -1.0, 0.0], [0.8, 2.0, 1.0]])


def test_clipped_token_loss_gradient_is_zero_when_clipped():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    clipped_token_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), torch.ones(1, 2)).sum().backward()
    # d/dlogp of -rho*A is -rho*A: token 0 is clipped (no gradient), token 1 gets -1.1
    close(logp.grad, [[0.0, -1.1]])


# --- §2.8 role-wise token-mean aggregation --------------------------------------------------------

def test_rolewise_token_mean_by_hand():
    # solver rows 0 and 1 (2 and 3 tokens), critic row 2 (1 token).
    token_loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [6.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    is_critic = torch.tensor([False, False, True])
    # one process: L = (1+2+3+4+5)/5 + 0.5 * 6/1 = 3 + 3 = 6
    close(rolewise_token_mean(token_loss, mask, is_critic, solver_tokens=5, critic_tokens=1,
                              critic_coef=0.5), 6.0)
    # this rank holds part of a global batch of 10 solver and 4 critic tokens over 2 ranks:
    # world_size * (15/10 + 0.5 * 6/4) = 2 * 2.25 = 4.5, so DDP's average gives global sums / counts.
    close(rolewise_token_mean(token_loss, mask, is_critic, solver_tokens=10, critic_tokens=4,
                              critic_coef=0.5, world_size=2), 4.5)


def test_rolewise_token_mean_without_critic_tokens():
    token_loss = torch.tensor([[2.0, 4.0]])
    mask = torch.ones(1, 2)
    close(rolewise_token_mean(token_loss, mask, torch.tensor([False]), solver_tokens=2, critic_tokens=0), 3.0)
