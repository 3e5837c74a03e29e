"""GRPO math on hand-made tensors
(values worked out by hand in the comments) and on-policy invariants."""

import math

import pytest
import torch
from conftest import load_algorithm, sample_batch, scored_batch

import common

grpo = load_algorithm("grpo")


def test_group_advantages_with_unbiased_std():
    # mean 0.25; centred [0.75, -0.25, -0.25, -0.25];
    # unbiased var (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5
    adv, zero_std = grpo.grpo_advantages(torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]),
                                         True)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    assert zero_std.tolist() == [False]


def test_group_advantages_without_scaling_and_equal_rewards():
    adv, _ = grpo.grpo_advantages(torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    adv, zero_std = grpo.grpo_advantages(torch.tensor([1.0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]),
                                         True)
    assert torch.equal(adv, torch.zeros(4)) and zero_std.tolist() == [True, True]


def test_groups_follow_prompt_index_not_position():
    # interleaved layout: responses of prompt 0 at even positions, prompt 1 at odd ones
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1])
    index = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    adv, _ = grpo.grpo_advantages(rewards, index, True)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, 1.5]),
                               atol=1e-5, rtol=0)


TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 18 / 5),  # (1 + 2 + 4 + 5 + 6) / 5 valid tokens
    ("seq-mean-token-mean", (3 / 2 + 15 / 3) / 2),  # mean of the per-sequence means 1.5 and 5
    ("seq-mean-token-sum-norm", 18 / (2 * 3)),  # sum / (B * max_new_tokens), max_new_tokens = 3
])
def test_loss_aggregation_modes(mode, expected):
    assert (grpo.aggregate_loss(TOKEN_LOSS, MASK, mode, max_new_tokens=3).item()
            == pytest.approx(expected))
    # micro-batched: one row at a time with the whole step's denominators sums to the same value
    parts = [grpo.aggregate_loss(TOKEN_LOSS[i:i + 1], MASK[i:i + 1], mode, MASK.sum(), 2, 3)
             for i in range(2)]
    assert sum(parts).item() == pytest.approx(expected)


def test_dr_grpo_normaliser_is_constant_in_length():
    # Dr. GRPO divides by max_new_tokens, not by the padded length of this batch
    assert (grpo.aggregate_loss(TOKEN_LOSS, MASK, "seq-mean-token-sum-norm",
                                max_new_tokens=10).item() == pytest.approx(0.9))


def test_k3_kl():
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    # d = log(0.25 / 0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1;
    # identical log-probs give exactly 0
    torch.testing.assert_close(grpo.k3_kl(logp, ref), torch.tensor([math.log(2) - 0.5, 0.0]))


def test_ppo_clip_cases():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, ratio, clipped = grpo.ppo_clip_loss(logp, old, adv, 0.2, 0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped);
    # A>0, r=0.5: max(-0.5, -0.8) = -0.5 (not clipped: pessimistic term);
    # r=1.1 inside the range: -1.1
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.8, -0.5, -1.1]))
    assert clipped.tolist() == [True, True, False, False]
    # clip-higher lets r=1.5 through
    _, _, clipped_high = grpo.ppo_clip_loss(logp, old, adv, 0.2, 0.6)
    assert clipped_high.tolist() == [False, True, False, False]


def test_first_on_policy_minibatch_has_ratio_one(random_model):
    model, tokenizer = random_model
    ro, mask, T = sample_batch(model, tokenizer)
    with torch.no_grad():
        old_logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T,
                                            micro_batch_size=3).logp
    logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    advantages = torch.randn(8)[:, None] * mask
    _, ratio, clipped = grpo.ppo_clip_loss(logp, old_logp, advantages, 0.2, 0.2)
    approx_kl = common.masked_mean((ratio - 1) - (logp - old_logp), mask)
    torch.testing.assert_close(ratio * mask, mask, atol=1e-6, rtol=0)
    assert abs(approx_kl.item()) < 1e-9 and clipped[mask.bool()].sum() == 0


def test_parameters_change_after_one_step(random_model):
    model, tokenizer = random_model
    ro, mask, T, advantages, old_logp = scored_batch(model, tokenizer, grpo.grpo_advantages)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    loss, _, _ = grpo.ppo_clip_loss(logp, old_logp, advantages, 0.2, 0.2)
    grpo.aggregate_loss(loss, mask, "token-mean").backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
