"""KL-Cov math on hand-made tensors (values worked out by hand in the comments) and its invariants:
plain policy gradient on-policy, the extra beta * sign(d) gradient on exactly the top-k tokens, and
a non-zero penalty from the second mini-batch of a rollout on."""

import json

import pytest
import torch
from conftest import load_algorithm, run_distributed, run_python, scored_batch

import common

kl_cov = load_algorithm("kl_cov")

# A worked 1-D example: A = [1, 1, -1, -1] (mean 0),
# logp = [-1, -3, -1, -3] (mean -2, centred [1, -1, 1, -1]);
# cov = A * centred = [1, -1, -1, 1];
# a padding token with a large raw value must never count or be selected.
ADV = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
LOGP = torch.tensor([-1.0, -3.0, -1.0, -3.0, 50.0])
MASK = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])


def test_top_k_selection_worked_example():
    cov = kl_cov.token_covariance(LOGP, ADV, MASK)
    torch.testing.assert_close(cov, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0]))
    # ratio 0.5: k = max(int(0.5 * 4), 1) = 2 -> the two tokens of cov 1
    assert kl_cov.kl_cov_select(cov, MASK, 0.5).tolist() == [True, False, False, True, False]
    # ratio 1e-3: int(0.004) = 0 -> at least one token
    assert kl_cov.kl_cov_select(cov, MASK, 1e-3).sum().item() == 1


def test_padding_is_never_selected_even_with_the_largest_value():
    cov = torch.tensor([[0.3, -0.2, 9.0], [0.1, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # ratio 0.5 of N = 4 valid tokens: k = 2 -> 0.5 and 0.3;
    # ratio 1: all four valid tokens, never the padding
    assert (kl_cov.kl_cov_select(cov, mask, 0.5).tolist()
            == [[True, False, False], [False, True, False]])
    assert (kl_cov.kl_cov_select(cov, mask, 1.0).tolist()
            == [[True, True, False], [True, True, False]])


def test_on_policy_loss_and_gradient_equal_plain_policy_gradient():
    logp = LOGP.clone().requires_grad_(True)
    selected = torch.tensor([True, False, False, True, False])
    token_loss, ratio, penalty = kl_cov.kl_cov_loss(logp, LOGP, ADV, selected, 1.0)
    loss = kl_cov.aggregate_loss(token_loss, MASK, "token-mean")
    loss.backward()
    # ratio 1 everywhere: loss = -mean(A) = 0, gradient -A / N = -A / 4,
    # and no penalty at d = 0 (gradient of |0| is 0)
    assert (loss.item() == 0.0 and torch.equal(penalty, torch.zeros(5))
            and torch.equal(ratio, torch.ones(5)))
    torch.testing.assert_close(logp.grad, -ADV / 4, atol=0, rtol=0)


def test_perturbed_log_probs_add_beta_sign_d_on_exactly_the_top_k():
    d = torch.tensor([0.1, 0.1, -0.2, -0.3, 0.0])
    old_logp = LOGP - d
    cov = kl_cov.token_covariance(LOGP, ADV, MASK)
    selected = kl_cov.kl_cov_select(cov, MASK, 0.5)  # tokens 0 and 3, as above
    beta = 0.5
    logp = LOGP.clone().requires_grad_(True)
    token_loss, _, penalty = kl_cov.kl_cov_loss(logp, old_logp, ADV, selected, beta)
    kl_cov.aggregate_loss(token_loss, MASK, "token-mean").backward()
    plain = LOGP.clone().requires_grad_(True)
    kl_cov.aggregate_loss(-ADV * torch.exp(plain - old_logp), MASK, "token-mean").backward()
    # penalty beta |d| on tokens 0 and 3: 0.5 * 0.1 = 0.05 and 0.5 * 0.3 = 0.15
    torch.testing.assert_close(penalty, torch.tensor([0.05, 0.0, 0.0, 0.15, 0.0]))
    # extra gradient beta * sign(d) / N:
    # +0.5 / 4 on token 0, -0.5 / 4 on token 3, nothing anywhere else
    torch.testing.assert_close(logp.grad - plain.grad, torch.tensor([0.125, 0.0, 0.0, -0.125, 0.0]))


def test_penalty_is_zero_on_the_first_and_non_zero_on_the_second_mini_batch(random_model):
    model, tokenizer = random_model
    ro, mask, T, advantages, old_logp = scored_batch(model, tokenizer, kl_cov.grpo_advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    penalties = []
    # two mini-batches of one rollout, old_logp frozen
    for mb in (torch.arange(0, 4), torch.arange(4, 8)):
        logp = common.response_logprobs(model, ro.input_ids[mb], ro.attention_mask[mb], T).logp
        selected = kl_cov.kl_cov_select(kl_cov.token_covariance(logp, advantages[mb], mask[mb]),
                                        mask[mb], 0.25)
        token_loss, _, penalty = kl_cov.kl_cov_loss(logp, old_logp[mb], advantages[mb], selected,
                                                    1.0)
        optimizer.zero_grad()
        kl_cov.aggregate_loss(token_loss, mask[mb], "token-mean").backward()
        optimizer.step()
        penalties.append((penalty * mask[mb]).sum().item())
    assert penalties[0] == 0.0 and penalties[1] > 0


def _run_script(flags, tmp_path):
    return run_python(["algorithms/kl_cov.py", *flags, "--output-dir", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize("mini_batches,micro_batch_tokens", [(4, 0), (1, 0), (1, 200)])
def test_script_penalty_acts_only_with_several_mini_batches(mini_batches, micro_batch_tokens,
                                                            tmp_path):
    # with --micro-batch-tokens the gradient pass trims padding;
    # the on-policy d must still be exactly 0, not ~1e-7
    result = _run_script(["--num-steps", "1", "--prompts-per-step", "16", "--group-size", "4",
                          "--eval-prompts", "4",
                          "--final-eval-samples", "2", "--num-mini-batches", str(mini_batches),
                          "--micro-batch-tokens", str(micro_batch_tokens)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    step1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert step1["losses/clipfrac"] == 0.0 and step1["losses/clip_cov_selected"] >= 1
    # mini-batches 2-4 are off-policy: the penalty (averaged over selected tokens) is positive
    if mini_batches == 4:
        assert step1["losses/kl_cov_penalty"] > 0 and step1["losses/approx_kl"] > 0
    else:
        assert step1["losses/kl_cov_penalty"] == 0.0 and step1["losses/approx_kl"] == 0.0
        assert "penalty at zero" in result.stdout


def _dyadic_batch():
    """A fixed mini-batch of 8 rows with log-probs and advantages in quarters: sums over any split
    are exact, and many covariances are equal (ties at the k-th largest)."""
    generator = torch.Generator().manual_seed(3)
    mask = (torch.rand(8, 6, generator=generator) < 0.75).float()  # 39 valid tokens
    logp = -torch.randint(0, 16, (8, 6), generator=generator) / 4 * mask
    advantages = (torch.randint(0, 4, (8,), generator=generator) - 1.5)[:, None] * mask
    return logp, advantages, mask


def _covariance_and_selection(logp, advantages, mask, ratios):
    """token_covariance and kl_cov_select as kl_cov.py calls them: on every process's rows
    (common.gather_rows), keeping this process's (common.own_rows). Each process holds half of the
    rows (all in a single process)."""
    if common.world_size() > 1:
        rows = slice(4 * common.rank(), 4 * common.rank() + 4)
        logp, advantages, mask = logp[rows], advantages[rows], mask[rows]
    all_logp, all_advantages, all_mask = (common.gather_rows(x) for x in (logp, advantages, mask))
    cov = kl_cov.token_covariance(all_logp, all_advantages, all_mask)
    return [(common.own_rows(cov, mask),
             common.own_rows(kl_cov.kl_cov_select(cov, all_mask, ratio), mask))
            for ratio in ratios]


@pytest.mark.slow
def test_two_processes_on_the_halves_select_what_one_process_selects_on_the_whole_batch():
    # global means, N and top-k (torch.topk of both processes' covariances in rank order),
    # every process keeps its own
    batch, ratios = _dyadic_batch(), [0.01, 0.1, 0.2, 0.3, 0.5, 1.0]
    whole = _covariance_and_selection(*batch, ratios)
    first, second = run_distributed(_covariance_and_selection, *batch, ratios)
    ties = 0
    for ratio, (cov, selected), (cov0, selected0), (cov1, selected1) in zip(ratios, whole, first,
                                                                            second):
        assert selected.sum() == max(int(ratio * 39), 1) and not (selected & ~batch[2].bool()).any()
        torch.testing.assert_close(torch.cat([cov0, cov1]), cov, atol=0, rtol=0)
        assert torch.equal(torch.cat([selected0, selected1]), selected)
        kth = cov[selected].min()
        # a tie cut at the k-th largest
        ties += int(((cov == kth) & batch[2].bool() & ~selected).any())
    assert ties  # the test covers tie-breaking
