"""Clip-Cov math on hand-made tensors (values worked out by hand in the comments) and its
invariants: the selected tokens get exactly zero gradient, the selection size and scope, and the
whole-mini-batch no-grad pass."""

import math

import pytest
import torch
from conftest import load_algorithm, run_distributed, sample_batch, scored_batch

import common

clip_cov = load_algorithm("clip_cov")

# A worked 1-D example: six valid tokens and one padding token.
# A = [2, 2, -2, -2, 0, 0, 0] (padding has A = 0), mean over valid tokens 0.
# logp = [0, -1, -3, -5, -2, -1, 9], mean over valid tokens (0 - 1 - 3 - 5 - 2 - 1) / 6 = -2;
# centred [2, 1, -1, -3, 0, 1].
# cov = A * centred = [4, 2, 2, 6, 0, 0] and 0 for the padding (the 9 there must not move the mean).
ADV = torch.tensor([2.0, 2.0, -2.0, -2.0, 0.0, 0.0, 0.0])
LOGP = torch.tensor([0.0, -1.0, -3.0, -5.0, -2.0, -1.0, 9.0])
MASK = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
# token 1 moved up by a ratio of 1.5 since sampling:
# with A > 0 and eps 0.2 the PPO clamp is active there
OLD_LOGP = LOGP - torch.tensor([0.0, math.log(1.5), 0.0, 0.0, 0.0, 0.0, 0.0])


def test_token_covariance_worked_example():
    cov = clip_cov.token_covariance(LOGP, ADV, MASK)
    torch.testing.assert_close(cov, torch.tensor([4.0, 2.0, 2.0, 6.0, 0.0, 0.0, 0.0]))
    # its mean over valid tokens, 14 / 6, is the biased sample covariance:
    # torch.cov (unbiased, / 5) * 5 / 6
    valid = MASK.bool()
    unbiased = torch.cov(torch.stack([LOGP[valid], ADV[valid]]))[0, 1]
    torch.testing.assert_close(common.masked_mean(cov, MASK), unbiased * 5 / 6)
    assert common.masked_mean(cov, MASK).item() == pytest.approx(14 / 6)


def test_worked_example_selection_and_loss():
    cov = clip_cov.token_covariance(LOGP, ADV, MASK)
    _, _, ppo_clipped = clip_cov.ppo_clip_loss(LOGP, OLD_LOGP, ADV, 0.2, 0.2)
    assert ppo_clipped.tolist() == [False, True, False, False, False, False, False]
    # bounds (1, 5): cov 4, 2, 2 are inside, 6 is above;
    # token 1 is PPO-clipped -> candidates {0, 2}.
    # r = 0.5: k = max(int(0.5 * 6), 1) = 3 > 2 candidates -> both are selected.
    selected, n_candidates = clip_cov.clip_cov_select(cov, MASK, ppo_clipped, 0.5, 1.0, 5.0)
    assert (n_candidates == 2
            and selected.tolist() == [True, False, True, False, False, False, False])
    # the bounds are strict: (2, 6) leaves only cov 4 (token 0); 2 and 6 sit on the bounds
    strict, n_strict = clip_cov.clip_cov_select(cov, MASK, ppo_clipped, 0.5, 2.0, 6.0)
    assert n_strict == 1 and strict.tolist() == [True, False, False, False, False, False, False]

    logp = LOGP.clone().requires_grad_(True)
    token_loss, _, _ = clip_cov.clip_cov_loss(logp, OLD_LOGP, ADV, selected, 0.2, 0.2)
    loss = clip_cov.aggregate_loss(token_loss, MASK, "token-mean")
    loss.backward()
    # token 0, 2: selected -> 0; token 1:
    # max(-2 * 1.5, -2 * 1.2) = -2.4 (clamped, no gradient); token 3: -(-2) * 1 = 2;
    # tokens 4, 5: A = 0. The selected tokens stay in the denominator: (-2.4 + 2) / 6, not / 4.
    assert loss.item() == pytest.approx(-0.4 / 6)
    # gradient of -A r / N at r = 1: only token 3 carries one, 2 / 6
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 0.0, 2 / 6, 0.0, 0.0, 0.0]))


def test_random_choice_is_uniform_not_top_k():
    cov = clip_cov.token_covariance(LOGP, ADV, MASK)
    _, _, ppo_clipped = clip_cov.ppo_clip_loss(LOGP, OLD_LOGP, ADV, 0.2, 0.2)
    # r = 0.2: k = max(int(1.2), 1) = 1 of the candidates {0 (cov 4), 2 (cov 2)};
    # top-k would always take token 0
    picks = []
    for seed in range(200):
        selected, _ = clip_cov.clip_cov_select(cov, MASK, ppo_clipped, 0.2, 1.0, 5.0,
                                               torch.Generator().manual_seed(seed))
        (position,) = selected.nonzero().flatten().tolist()
        picks.append(position)
    assert set(picks) == {0, 2} and 70 < picks.count(2) < 130  # binomial(200, 1/2): mean 100, std 7


@pytest.mark.parametrize("ratio", [1e-4, 0.01, 0.05, 0.3, 1.0])
def test_selection_count_bounds_and_ppo_clipped(ratio):
    generator = torch.Generator().manual_seed(0)
    cov = torch.randn(16, 12, generator=generator) * 2
    mask = (torch.rand(16, 12, generator=generator) < 0.7).float()
    ppo_clipped = torch.rand(16, 12, generator=generator) < 0.2
    selected, n_candidates = clip_cov.clip_cov_select(cov, mask, ppo_clipped, ratio, 0.5, 3.0,
                                                      generator)
    candidates = mask.bool() & ~ppo_clipped & (cov > 0.5) & (cov < 3.0)
    assert n_candidates == candidates.sum().item() > 0
    assert selected.sum().item() == min(max(int(ratio * mask.sum().item()), 1), n_candidates)
    assert not (selected & ~candidates).any()  # never padding, PPO-clipped or outside (0.5, 3.0)


def test_no_candidates_selects_nothing():
    selected, n_candidates = clip_cov.clip_cov_select(torch.zeros(2, 3), torch.ones(2, 3),
                                                      torch.zeros(2, 3, dtype=torch.bool),
                                                      0.5, 1.0, 5.0)
    assert n_candidates == 0 and not selected.any()


def test_selected_tokens_have_exactly_zero_gradient_in_a_model(random_model):
    model, tokenizer = random_model
    ro, mask, T, advantages, old_logp = scored_batch(model, tokenizer, clip_cov.grpo_advantages)
    logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    logp.retain_grad()
    _, _, ppo_clipped = clip_cov.ppo_clip_loss(logp.detach(), old_logp, advantages, 1.0, 1.0)
    cov = clip_cov.token_covariance(logp, advantages, mask)
    selected, _ = clip_cov.clip_cov_select(cov, mask, ppo_clipped, 0.25, 0.0, float("inf"),
                                           torch.Generator().manual_seed(0))
    assert selected.sum() > 1
    token_loss, _, _ = clip_cov.clip_cov_loss(logp, old_logp, advantages, selected, 1.0, 1.0)
    clip_cov.aggregate_loss(token_loss, mask, "token-mean").backward()
    assert torch.equal(logp.grad[selected], torch.zeros(int(selected.sum())))
    # every other valid token with a non-zero advantage keeps its plain
    # gradient -A / N (ratio 1 on-policy)
    kept = mask.bool() & ~selected & (advantages != 0)
    torch.testing.assert_close(logp.grad[kept], -advantages[kept] / mask.sum())


def test_no_grad_selection_pass_equals_gradient_pass(random_model):
    # the script selects from a no-grad pass over the mini-batch in micro-batch chunks, then
    # recomputes each micro-batch with grad: the two must see identical log-probs, or PPO-clipped
    # tokens could slip into the selection
    model, tokenizer = random_model
    ro, _, T = sample_batch(model, tokenizer)
    micro = 3
    with torch.no_grad():
        whole = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T,
                                         micro_batch_size=micro).logp
    for start in range(0, 8, micro):
        rows = slice(start, start + micro)
        part = common.response_logprobs(model, ro.input_ids[rows], ro.attention_mask[rows], T).logp
        assert torch.equal(part.detach(), whole[rows])


def _dyadic_batch():
    """A fixed mini-batch of 8 rows with log-probs and advantages in quarters,
    so that sums over any split are exact."""
    generator = torch.Generator().manual_seed(3)
    mask = (torch.rand(8, 6, generator=generator) < 0.75).float()  # 39 valid tokens
    logp = -torch.randint(0, 16, (8, 6), generator=generator) / 4 * mask
    advantages = (torch.randint(0, 4, (8,), generator=generator) - 1.5)[:, None] * mask
    ppo_clipped = torch.rand(8, 6, generator=generator) < 0.2
    return logp, advantages, mask, ppo_clipped


def _covariance_and_selection(logp, advantages, mask, ppo_clipped, configs):
    """token_covariance and clip_cov_select as clip_cov.py calls them: on every process's rows
    (common.gather_rows), keeping this process's (common.own_rows). Each process holds half of the
    rows (all in a single process); the second process's half gets two more padding columns, as a
    rollout with longer responses would."""
    if common.world_size() > 1:
        rows, pad = slice(4 * common.rank(), 4 * common.rank() + 4), (0, 2 * common.rank())
        logp, advantages, mask = (torch.nn.functional.pad(x[rows], pad)
                                  for x in (logp, advantages, mask))
        ppo_clipped = torch.nn.functional.pad(ppo_clipped[rows], pad)
    all_logp, all_advantages, all_mask, all_clipped = (common.gather_rows(x) for x in
                                                       (logp, advantages, mask, ppo_clipped.long()))
    cov = clip_cov.token_covariance(all_logp, all_advantages, all_mask)
    results = []
    for ratio, seed in configs:
        selected, n_candidates = clip_cov.clip_cov_select(cov, all_mask, all_clipped.bool(), ratio,
                                                          0.1, 3.0,
                                                          torch.Generator().manual_seed(seed))
        results.append((common.own_rows(cov, mask), common.own_rows(selected, mask), n_candidates))
    return results


@pytest.mark.slow
def test_two_processes_on_the_halves_select_what_one_process_selects_on_the_whole_batch():
    # global means, N and candidates;
    # rank 0's draw over all candidates in rank order, every process keeps its own
    batch, configs = _dyadic_batch(), [(0.05, 0), (0.1, 1), (0.1, 2), (0.2, 3), (1.0, 4)]
    whole = _covariance_and_selection(*batch, configs)
    first, second = run_distributed(_covariance_and_selection, *batch, configs)
    for ((ratio, _), (cov, selected, n_candidates), (cov0, selected0, n0),
         (cov1, selected1, n1)) in zip(configs, whole, first, second):
        assert (n0 == n1 == n_candidates > 10
                and selected.sum() == min(max(int(ratio * 39), 1), n_candidates))
        torch.testing.assert_close(torch.cat([cov0, cov1[:, :6]]), cov, atol=0, rtol=0)
        assert (torch.equal(torch.cat([selected0, selected1[:, :6]]), selected)
                and not selected1[:, 6:].any())
    # the draw matters
    assert len({tuple(selected.nonzero().flatten().tolist()) for _, selected, _ in whole[1:3]}) == 2
