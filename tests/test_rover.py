"""ROVER math on hand-made tensors (values worked out by hand in the comments) and on-policy
invariants (the same update from one process or two: tests/test_distributed.py, on the script
itself)."""

import torch
from conftest import REWARDS, load_algorithm, sample_batch

import common

rover = load_algorithm("rover")


def test_vocabulary_mean_is_the_mean_log_softmax(random_model):
    model, tokenizer = random_model
    ro, mask, T = sample_batch(model, tokenizer)
    valid = mask.bool()
    with torch.no_grad():
        stats = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, temperature=0.7,
                                          with_vocab_mean=True, micro_batch_size=3)
        position_ids = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                       position_ids=position_ids).logits
        # (B, T, V), the logits that predict response token t
        logits = logits[:, -T - 1 : -1].float() / 0.7
    vocab_mean = stats.vocab_mean[valid]
    torch.testing.assert_close(vocab_mean, torch.log_softmax(logits, -1).mean(-1)[valid], atol=1e-5,
                               rtol=0)
    # the closed form used in the spec: mean(z) - logsumexp(z)
    torch.testing.assert_close(vocab_mean, (logits.mean(-1) - torch.logsumexp(logits, -1))[valid],
                               atol=1e-5, rtol=0)
    assert (~valid).any() and (stats.vocab_mean[~valid] == 0).all()  # after the first EOS: 0


def test_next_state_value_is_shifted_and_zero_after_the_last_valid_token():
    # M - M_old per position (state before token t): row 0 = [1, 2, 3, 4] with 3 valid tokens, row 1
    # = [5, 6, 7, 8] all valid. rho 0.5: next value of token t = 0.5 * (M - M_old)[t + 1], 0 for the
    # last valid token and after it
    vocab_mean = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    value = rover.next_state_value(vocab_mean, torch.zeros(2, 4), mask, rho=0.5)
    torch.testing.assert_close(value, torch.tensor([[1.0, 1.5, 0.0, 0.0], [3.0, 3.5, 4.0, 0.0]]))


def test_loss_by_hand_and_target_carries_no_gradient():
    # rho 2: Q = 2 * (logp - old) = [1, -1]; next values 2 * (M - M_old)[t + 1] = [2 * 0.25, 0] =
    # [0.5, 0] target = r~ + beta * next = 0.25 + 0.5 * [0.5, 0] = [0.5, 0.25]; loss = [(1 - 0.5)^2,
    # (-1 - 0.25)^2] = [0.25, 1.5625]
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    vocab_mean = torch.tensor([[0.0, 0.25]], requires_grad=True)
    loss, q, next_value = rover.rover_loss(logp, torch.zeros(1, 2), vocab_mean, torch.zeros(1, 2),
                                           torch.tensor([0.25]),
                                           torch.ones(1, 2), rho=2.0, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([[0.25, 1.5625]]))
    torch.testing.assert_close(q, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(next_value, torch.tensor([[0.5, 0.0]]))
    loss.sum().backward()
    # the target is stop-gradient even when M_theta comes with a graph
    assert vocab_mean.grad is None
    # d/dlogp (Q - target)^2 = 2 (Q - target) rho = [2 * 0.5 * 2, 2 * -1.25 * 2] = [2, -5]
    torch.testing.assert_close(logp.grad, torch.tensor([[2.0, -5.0]]))


def test_centred_rewards_without_and_with_std():
    # group mean 0.25: r~ = [0.75, -0.25, -0.25, -0.25];
    # with --std-norm divided by the unbiased std 0.5
    rewards, index = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1,
                                                                             1])
    centred, zero_std = rover.grpo_advantages(rewards, index, False)
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert zero_std.tolist() == [False, True]
    normed, _ = rover.grpo_advantages(rewards, index, True)
    torch.testing.assert_close(normed[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_on_policy_gradient_is_reinforce_on_the_centred_reward(random_model):
    # with theta = old: Q = 0 and Qbar = 0,
    # so d/dtheta mean (Q - r~)^2 = -2 rho mean_t r~ grad logp_t
    model, tokenizer = random_model
    ro, mask, T = sample_batch(model, tokenizer)
    with torch.no_grad():
        old = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T,
                                       with_vocab_mean=True, micro_batch_size=3)
    centred, _ = rover.grpo_advantages(REWARDS, ro.prompt_index, False)
    rho = 0.5
    current = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T,
                                       with_vocab_mean=True)
    token_loss, q, next_value = rover.rover_loss(current.logp, old.logp, current.vocab_mean,
                                                 old.vocab_mean, centred, mask, rho, beta=1.0)
    assert q.abs().max() < 1e-5 and next_value.abs().max() < 1e-5
    rover_grads = _grads(model, (token_loss * mask).sum() / mask.sum())
    logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    reinforce_grads = _grads(model, -2 * rho * (centred[:, None] * logp * mask).sum() / mask.sum())
    for a, b in zip(rover_grads, reinforce_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in rover_grads)
