"""PRIME math on hand-made tensors (values worked out by hand in the comments), invariants,
prime.py's steps made by one process or two (either of which may keep no prompt), and end-to-end
runs of the paths the default smoke run does not reach (skipped steps, --prm-update before,
--prm-ref policy, mini-batches)."""

import copy
import json
import math

import pytest
import torch
from conftest import assert_same_run, load_algorithm, records, run_on_fixed_rollouts, run_python
from test_smoke import TINY_BUDGET

import common

prime = load_algorithm("prime")


def test_outcome_leave_one_out_sits_at_the_last_valid_token():
    # four responses of one prompt, lengths 3, 2, 4, 1; acc [1, 0, 0, 1]
    # acc_i - mean_{j != i} acc_j: 1 - (0+0+1)/3 = 2/3, 0 - (1+0+1)/3 = -2/3,
    # -2/3, 1 - (1+0+0)/3 = 2/3
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    last = prime.last_token_mask(mask)
    assert last.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    acc = torch.tensor([1.0, 0, 0, 1])
    out = prime.leave_one_out(acc[:, None] * last, last, torch.zeros(4, dtype=torch.long))
    expected = torch.zeros(4, 4)
    expected[0, 2], expected[1, 1], expected[2, 3], expected[3, 0] = 2 / 3, -2 / 3, -2 / 3, 2 / 3
    torch.testing.assert_close(out, expected)


def test_process_leave_one_out_on_a_worked_2x3_example():
    # one group of n = 2: row means m_0 = (0.1 + 0.2 + 0.3) / 3 = 0.2,
    # m_1 = (0.4 + 0.2) / 2 = 0.3 (padding excluded)
    # r_t * n/(n-1) - (m_0 + m_1)/(n-1) = 2 r_t - 0.5:
    #   row 0: [0.2 - 0.5, 0.4 - 0.5, 0.6 - 0.5] = [-0.3, -0.1, 0.1];  row 1: [0.8 - 0.5, 0.4 - 0.5,
    #   pad] = [0.3, -0.1, 0] paper form + extra term, row 0 t 0: r - m_1 + (r - m_0)/(n-1) = 0.1 -
    #   0.3 + (0.1 - 0.2) = -0.3 (same)
    rewards = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, 7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    out = prime.leave_one_out(rewards, mask, torch.tensor([0, 0]))
    torch.testing.assert_close(out, torch.tensor([[-0.3, -0.1, 0.1], [0.3, -0.1, 0.0]]))
    # the extra term sums to 0 over a response: row sums equal n_tokens * (m_i - m_other)
    torch.testing.assert_close(out.sum(-1), torch.tensor([3 * (0.2 - 0.3), 2 * (0.3 - 0.2)]))


def test_leave_one_out_groups_follow_prompt_index_and_need_two_members():
    # interleaved layout: prompt 0 at rows 0 and 2 (acc 1, 0), prompt 1 at rows 1 and 3 (acc 0, 0)
    ones = torch.ones(4, 1)
    out = prime.leave_one_out(torch.tensor([[1.0], [0], [0], [0]]), ones,
                              torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(out, torch.tensor([[1.0], [0], [-1], [0]]))
    with pytest.raises(ValueError, match="at least 2"):
        prime.leave_one_out(torch.ones(3, 1), torch.ones(3, 1), torch.tensor([0, 0, 1]))


def test_returns_are_reverse_cumulative_sums():
    rewards = torch.tensor([[1.0, 2, 3], [1, 2, 3]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    # gamma 1: [1+2+3, 2+3, 3] = [6, 5, 3]; the masked row ignores its padding: [1+2, 2, 0]
    torch.testing.assert_close(prime.discounted_returns(rewards, mask, 1.0),
                               torch.tensor([[6.0, 5, 3], [3, 2, 0]]))
    # gamma 0.5: [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3] = [2.75, 3.5, 3];
    # [1 + 0.5 * 2, 2, 0] = [2, 2, 0]
    torch.testing.assert_close(prime.discounted_returns(rewards, mask, 0.5),
                               torch.tensor([[2.75, 3.5, 3], [2, 2, 0]]))


def test_process_rewards_are_normalised_by_the_largest_return():
    rewards = torch.tensor([[0.1, -0.3, 0.1], [0.2, 0.2, 5.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    # reverse cumsums: row 0 [-0.1, -0.2, 0.1],
    # row 1 [0.4, 0.2, 0] (padding excluded) -> scale 0.4 (+1e-6)
    normalised, scale = prime.normalise_process_rewards(rewards, mask)
    assert scale.item() == pytest.approx(0.4 + 1e-6)
    torch.testing.assert_close(normalised, torch.tensor([[0.25, -0.75, 0.25], [0.5, 0.5, 0.0]]),
                               atol=1e-5, rtol=0)
    assert prime.discounted_returns(normalised, mask, 1.0).abs().max() <= 1


def test_whitened_advantages_have_masked_mean_zero_and_unit_variance():
    # by hand: [1, 2, 3] has mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    # -> [-1, 0, 1]; padding stays 0
    out = prime.masked_whiten(torch.tensor([[1.0, 2, 3, 100]]), torch.tensor([[1.0, 1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0, 1, 0]]), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    x, mask = torch.randn(6, 9) * 3 + 5, (torch.rand(6, 9) > 0.3).float()
    white = prime.masked_whiten(x, mask)
    valid = white[mask.bool()]
    assert (abs(valid.mean().item()) < 1e-6
            and valid.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5))
    assert torch.all(white[~mask.bool()] == 0)


def test_prm_loss_is_bce_of_the_scaled_sequence_score():
    # row 0: sum q = 0.5 + 1.5 = 2 (the 9 is padding), beta 0.5 -> logit 1, acc 1:
    # -log sigmoid(1) = log(1 + e^-1)
    # row 1: sum q = -2 -> logit -1, acc 0:
    # -log(1 - sigmoid(-1)) = -log sigmoid(1) = log(1 + e^-1); mean of the two
    q = torch.tensor([[0.5, 1.5, 9.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    loss = prime.prm_ce_loss(q, mask, torch.tensor([1.0, 0.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # micro-batched with the step's count: the two halves sum to the whole
    halves = [prime.prm_ce_loss(q[i:i + 1], mask[i:i + 1], torch.tensor([1.0, 0.0])[i:i + 1], 0.5,
                                2) for i in range(2)]
    assert sum(halves).item() == pytest.approx(loss.item())
    # a wrong label costs more: acc 0 for row 0 gives -log(1 - sigmoid(1)) = log(1 + e)
    assert (prime.prm_ce_loss(q[:1], mask[:1], torch.tensor([0.0]), 0.5).item()
            == pytest.approx(math.log(1 + math.e)))
    # weight 0 leaves a row out (a filler): row 1 alone, divided by the given count
    weighted = prime.prm_ce_loss(q, mask, torch.tensor([0.0, 0.0]), 0.5, 1,
                                 torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_no_gradient_reaches_the_prm_reference(random_model):
    prm, tokenizer = random_model
    # deliberately left trainable: the function itself must keep it out of the graph
    reference = copy.deepcopy(prm)
    torch.manual_seed(0)
    ro = common.rollout(prm, tokenizer, ["17 13 5>6:", "3 5 7>22:"], group_size=2,
                        sampling=common.Sampling(6))
    mask, T = ro.response_mask.float(), ro.response_ids.shape[1]
    with torch.no_grad():
        old_logp = common.response_logprobs(prm, ro.input_ids, ro.attention_mask, T).logp
    ref_logp = prime.prm_reference_logprobs(reference, old_logp, ro.input_ids, ro.attention_mask, T,
                                            1.0)
    assert not ref_logp.requires_grad
    q = (common.response_logprobs(prm, ro.input_ids, ro.attention_mask, T).logp - ref_logp) * mask
    # the PRM starts equal to its reference:
    # q = 0, so the loss is BCE(sigmoid(0), acc) = log 2 whatever acc is
    torch.testing.assert_close(q, torch.zeros_like(q), atol=1e-5, rtol=0)
    loss = prime.prm_ce_loss(q, mask, torch.tensor([1.0, 0, 0, 1]), 0.05)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in prm.parameters())
    # --prm-ref policy: the policy's old log-probs, detached
    policy_ref = prime.prm_reference_logprobs(None, old_logp.requires_grad_(), ro.input_ids,
                                              ro.attention_mask, T, 1.0)
    assert not policy_ref.requires_grad and torch.equal(policy_ref, old_logp.detach())


def test_filter_keeps_exactly_the_prompts_in_bounds():
    # five prompts of n = 4 with 0, 1, 2, 3, 4 correct, interleaved (row b answers prompt b % 5)
    prompt_index = torch.arange(20) % 5
    acc = (torch.arange(20) // 5 < prompt_index).float()  # prompt p gets p correct responses
    truncated = torch.zeros(20, dtype=torch.bool)
    keep, group_acc = prime.keep_prompts(acc, truncated, prompt_index, 0.2, 0.8, True)
    torch.testing.assert_close(group_acc, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert keep.tolist() == [False, True, True, True, False]
    truncated[7] = True  # a response of prompt 2
    assert (prime.keep_prompts(acc, truncated, prompt_index, 0.2, 0.8, True)[0].tolist()
            == [False, True, False, True, False])
    assert (prime.keep_prompts(acc, truncated, prompt_index, 0.2, 0.8, False)[0].tolist()
            == [False, True, True, True, False])
    assert (prime.keep_prompts(acc, truncated, prompt_index, 0.5, 0.5, False)[0].tolist()
            == [False, False, True, False, False])
    # bounds are inclusive: n = 5 with 1 and 4 correct sits exactly on 0.2 and 0.8
    acc5 = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    keep5, _ = prime.keep_prompts(acc5, torch.zeros(10, dtype=torch.bool), torch.arange(10) // 5,
                                  0.2, 0.8, True)
    assert keep5.tolist() == [True, True]


def test_pairwise_ranking_accuracy():
    # group 0: acc [1, 0, 0, 1], scores [2, 1, 3, 0]; (correct, wrong) pairs: (0,1) 2 > 1 win, (0,2)
    # 2 < 3 loss, (3,1) 0 < 1 loss, (3,2) 0 < 3 loss -> 1/4. Group 1 (all correct) has no pair and
    # does not count.
    acc = torch.tensor([1.0, 0, 0, 1, 1, 1])
    index = torch.tensor([0, 0, 0, 0, 1, 1])
    assert (prime.pairwise_ranking_accuracy(torch.tensor([2.0, 1, 3, 0, 5, -5]), acc, index)
            == pytest.approx(0.25))
    # ties count one half: equal scores everywhere (the PRM at step 1)
    # -> 0.5; a perfect ranking -> 1
    assert prime.pairwise_ranking_accuracy(torch.zeros(6), acc, index) == pytest.approx(0.5)
    assert (prime.pairwise_ranking_accuracy(torch.tensor([1.0, 0, 0, 1, 0, 0]), acc, index)
            == pytest.approx(1.0))
    # pairs never cross groups; no pair at all -> 0.5
    assert (prime.pairwise_ranking_accuracy(torch.tensor([0.0, 9]), torch.tensor([1.0, 0]),
                                            torch.tensor([0, 1])) == 0.5)


def test_an_empty_kept_batch_gives_empty_advantages():
    advantages, scale = prime.prime_advantages(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0),
                                               torch.zeros(0, dtype=torch.long), 0.05, 1.0)
    assert advantages.shape == (0, 3) and scale.item() == pytest.approx(1e-6)


EQUIVALENCE_FLAGS = ["--num-steps", "3", "--prompts-per-step", "2", "--group-size", "4",
                     "--prm-update", "before", "--num-mini-batches", "3", "--no-filter-truncated",
                     "--eval-prompts", "4", "--eval-samples", "2", "--final-eval-samples", "2",
                     "--log-completions-every", "1", "--checkpoint-every", "0", "--save-model"]
# two processes add --fsdp to the second
VARIANTS = {"ddp": [], "fsdp": ["--micro-batch-tokens", "60"]}


@pytest.mark.slow
def test_two_processes_make_the_steps_of_one_even_when_one_keeps_no_prompt(tmp_path):
    """prime.py run by one process and by two under torchrun (DDP, then FSDP2 with token-budget
    micro-batches) on rollouts that do not depend on the processes (tests/fixed_rollouts.py),
    --prm-update before, 3 mini-batches: the same records (PRM loss and ranking accuracies,
    process-reward scale, policy loss, covariance) and the same policy update. The process-reward
    scale, the whitening, the PRM's and the policy's denominators and the mini-batches are global.
    With one prompt per process, a step that keeps half of the prompts leaves a process with nothing
    to train on: it must still make every collective call (DDP and FSDP would hang otherwise)."""
    for processes in (1, 2):
        runs = [["algorithms/prime.py", *EQUIVALENCE_FLAGS, *flags,
                 *(["--fsdp"] if processes == 2 and flags else []),
                 "--output-dir", str(tmp_path / variant / str(processes))]
                for variant, flags in VARIANTS.items()]
        run_on_fixed_rollouts(runs, processes, tmp_path / f"{processes}.json")
    for variant in VARIANTS:
        one, two = (next((tmp_path / variant / str(processes)).iterdir()) for processes in (1, 2))
        assert_same_run(one, two)
        steps = records(one)[1:]
        # the PRM moved: q is not 0
        assert max(step["charts/process_reward_scale"] for step in steps) > 1e-3
        # rank 0 logged its prompt's 4 responses:
        # it kept the prompt iff 1 to 3 are correct (--acc-low/high 0.2/0.8)
        completions = [json.loads(line)
                       for line in (two / "completions.jsonl").read_text().splitlines()]
        correct = [sum(row["reward"] for row in completions if row["step"] == step["step"])
                   for step in steps]
        empty = []  # per step, the process(es) that kept no prompt
        for step, n in zip(steps, correct, strict=True):
            kept = round(step["charts/kept_frac"] * 2)  # of the step's 2 prompts, one a process
            empty.append({0: "both", 2: "neither"}.get(kept, "rank 1" if 1 <= n <= 3 else "rank 0"))
        assert {"rank 0", "rank 1", "neither"} <= set(empty), empty


def _records(tmp_path):
    (run_dir,) = tmp_path.iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_step_with_no_kept_prompt_is_skipped_and_counted(tmp_path):
    # two-token responses can never end (an answer needs more characters):
    # every prompt is dropped as truncated
    result = run_python(["algorithms/prime.py", *TINY_BUDGET, "--max-new-tokens", "2",
                         "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    step1, step2 = _records(tmp_path)[1:3]
    assert (step1["charts/kept_frac"] == 0 and step2["charts/empty_steps"] == 2
            and step2["charts/skipped_steps"] == 0)
    assert (math.isnan(step2["losses/policy_loss"]) and step2["losses/cov"] == 0
            and "losses/prm_loss" not in step2)


@pytest.mark.slow
def test_prm_update_before_with_policy_reference_and_minibatches(tmp_path):
    result = run_python(["algorithms/prime.py", *TINY_BUDGET, "--prompts-per-step", "12",
                         "--acc-low", "0", "--acc-high", "1", "--prm-update", "before", "--prm-ref",
                         "policy", "--num-mini-batches", "3", "--num-epochs", "2",
                         "--micro-batch-size", "5", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    step1 = _records(tmp_path)[1]
    # bounds [0, 1] keep every prompt without a truncated response
    assert step1["charts/kept_frac"] > 0 and step1["charts/empty_steps"] == 0
    # PRM = reference = policy at the start:
    # q ~ 0 (exactly 0 before the PRM's first step), a loss of about log 2
    assert step1["losses/prm_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert 0 <= step1["charts/prm_acc_before"] <= 1 and 0 <= step1["charts/prm_acc_after"] <= 1
    # six optimizer steps per rollout: all but the first see a policy that moved since sampling
    assert step1["losses/approx_kl"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [  # the other flags' checks: tests/test_bad_input.py
    (["--group-size", "1"], "error: --group-size 1: must be >= 2: leave-one-out baselines")])
def test_bad_input_gives_one_line_error(flags, message, tmp_path):
    result = run_python(["algorithms/prime.py", *flags, "--output-dir", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
