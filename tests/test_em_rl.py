"""EM-RL / EM-FT math on hand-made tensors (values worked out by hand in the comments), sign
invariants of one update, the method's defining property: training never reads the gold answers (the
same update from one process or two: tests/test_distributed.py, on the script itself)."""

import json
import math
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, load_algorithm, run_python, sample_batch
from safetensors.torch import load_file

import common

em_rl = load_algorithm("em_rl")

NEG = -1e4  # a logit whose probability underflows to exactly 0 (and 0 * NEG = 0 inside the entropy)


def test_rloo_worked_values():
    # n = 4: A_i = r_i - mean of the other three: 1 - 9/3, 2 - 8/3, 3 - 7/3, 4 - 6/3 = -2, -2/3,
    # 2/3, 2 (= 4/3 * (r_i - 2.5), the n/(n-1) form)
    adv, zero_std = em_rl.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                          torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(adv, torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]))
    assert zero_std.tolist() == [False]


def test_rloo_groups_follow_prompt_index_and_equal_rewards_give_zero():
    # prompt 0 at even positions with rewards [1, 3]: A = [1 - 3, 3 - 1] = [-2, 2];
    # prompt 1 all equal: A = 0
    rewards = torch.tensor([1.0, 5.0, 3.0, 5.0])
    adv, zero_std = em_rl.rloo_advantages(rewards, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0, 0.0]))
    assert zero_std.tolist() == [False, True]
    # no std normalisation: scaling the rewards scales the advantages
    torch.testing.assert_close(em_rl.rloo_advantages(10 * rewards, torch.tensor([0, 1, 0, 1]))[0],
                               10 * adv)


def test_rloo_group_of_one_gets_zero():
    adv, zero_std = em_rl.rloo_advantages(torch.tensor([-0.7, 0.2, 0.4]), torch.tensor([0, 1, 1]))
    # prompt 0 alone: no other response to compare with -> 0; prompt 1: [0.2 - 0.4, 0.4 - 0.2]
    torch.testing.assert_close(adv, torch.tensor([0.0, -0.2, 0.2]))
    assert zero_std.tolist() == [True, False]


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are given by hand:
    (B, P + T, V), position p predicts token p + 1."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        return type("Output", (), {"logits": self.logits[:, -logits_to_keep:]})()


def _hand_made_stats():
    """Prompt length 1, response length 3, vocabulary 4. Rows (the distribution predicting each
    response token):
    row 0: uniform over 4 (H = log 4), [1/2, 1/2, 0, 0] (H = log 2), then padding;
    row 1: [3/4, 1/4, 0, 0] (H = -(3/4 log 3/4 + 1/4 log 1/4)), uniform (log 4), one-hot (0)."""
    logits = torch.tensor([
        [[0.0, 0, 0, 0], [0, 0, NEG, NEG], [0, 0, 0, 0], [0, 0, 0, 0]],
        [[math.log(3), 0, NEG, NEG], [0, 0, 0, 0], [0, NEG, NEG, NEG], [0, 0, 0, 0]],
    ])
    # prompt token 3, then the sampled response tokens
    input_ids = torch.tensor([[3, 0, 1, 3], [3, 1, 2, 0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    stats = common.response_logprobs(FixedLogits(logits), input_ids, torch.ones_like(input_ids), 3,
                                     with_entropy=True)
    return stats, mask


def test_token_reward_is_minus_the_mean_of_hand_computed_entropies():
    stats, mask = _hand_made_stats()
    h34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    torch.testing.assert_close(stats.entropy * mask,
                               torch.tensor([[math.log(4), math.log(2), 0], [h34, math.log(4), 0]]))
    rewards = em_rl.self_certainty_rewards(stats.logp, stats.entropy, mask, "token", "mean")
    # row 0: -(log 4 + log 2) / 2 valid tokens (the padded third position is ignored);
    # row 1: -(h34 + log 4 + 0) / 3
    torch.testing.assert_close(rewards, torch.tensor([-(math.log(4) + math.log(2)) / 2,
                                                      -(h34 + math.log(4)) / 3]))
    # the paper's sum
    summed = em_rl.self_certainty_rewards(stats.logp, stats.entropy, mask, "token", "sum")
    torch.testing.assert_close(summed, torch.tensor([-3 * math.log(2), -(h34 + math.log(4))]))


def test_sequence_reward_is_the_mean_log_prob_of_the_sampled_tokens():
    stats, mask = _hand_made_stats()
    rewards = em_rl.self_certainty_rewards(stats.logp, stats.entropy, mask, "sequence", "mean")
    # row 0 sampled 0 then 1: log 1/4 + log 1/2 over 2 tokens;
    # row 1 sampled 1, 2, 0: log 1/4 + log 1/4 + log 1 over 3
    torch.testing.assert_close(rewards, torch.tensor([-3 * math.log(2) / 2, -4 * math.log(2) / 3]))


def test_em_rl_update_raises_the_likelihood_of_the_more_certain_responses(random_model):
    model, tokenizer = random_model
    ro, mask, T = sample_batch(model, tokenizer)
    with torch.no_grad():
        old = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, with_entropy=True)
    rewards = em_rl.self_certainty_rewards(old.logp, old.entropy, mask, "sequence", "mean")
    adv, _ = em_rl.rloo_advantages(rewards, ro.prompt_index)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    loss, ratio, clipped = em_rl.ppo_clip_loss(logp, old.logp, adv[:, None] * mask, 0.2, 0.2)
    # first on-policy pass: ratio 1, nothing clipped
    torch.testing.assert_close(ratio * mask, mask, atol=1e-6, rtol=0)
    assert clipped[mask.bool()].sum() == 0
    em_rl.aggregate_loss(loss, mask, "token-mean").backward()
    optimizer.step()
    with torch.no_grad():
        new_logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    gain = ((new_logp - old.logp) * mask).sum(-1)  # (B,) change of each response's log-likelihood
    # the gradient step moves log-likelihood towards positive-advantage responses:
    # the gain correlates with A
    assert torch.dot(gain - gain.mean(), adv - adv.mean()) > 0


def test_em_ft_step_lowers_the_entropy_along_the_sampled_responses(random_model):
    model, tokenizer = random_model
    ro, mask, T = sample_batch(model, tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, with_entropy=True,
                                     entropy_grad=True)
    before = common.masked_mean(stats.entropy, mask)
    em_rl.aggregate_loss(stats.entropy, mask, "token-mean").backward()
    optimizer.step()
    with torch.no_grad():
        after = common.masked_mean(common.response_logprobs(model, ro.input_ids, ro.attention_mask,
                                                            T, with_entropy=True).entropy, mask)
    assert after < before - 1e-4


TINY = ["--num-steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
        "--eval-samples", "2",
        "--final-eval-samples", "4", "--log-completions-every", "0", "--save-model"]

# Runs the script in-process as __main__, optionally after replacing every gold answer (the
# countdown target the verifier checks against) by garbage. The prompts the policy sees are
# unchanged; only what the verifier knows differs.
RUNNER = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, sys.argv[1])
    import common
    if sys.argv[2] == "garbage":
        real_verify = common.verify_countdown
        common.Countdown.verify = lambda self, item, response: real_verify(
            item["nums"], item["target"] + 10**6, response)
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.parametrize("method_flags", [[], ["--method", "em-ft", "--group-size", "1"]])
def test_training_is_identical_when_every_gold_answer_is_garbage(method_flags, tmp_path):
    records, weights = {}, {}
    for labels in ("real", "garbage"):
        out = tmp_path / labels
        result = run_python(["-c", RUNNER, str(REPO_ROOT), labels,
                             str(REPO_ROOT / "algorithms" / "em_rl.py"), *TINY,
                       *method_flags, "--output-dir", str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = out.iterdir()
        records[labels] = [json.loads(line)
                           for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights[labels] = load_file(run_dir / "model" / "model.safetensors")
    real, garbage = records["real"], records["garbage"]
    assert (all(r["charts/accuracy"] == 0 for r in garbage[1:])
            and all(r["eval/pass@4"] == 0 for r in garbage[::2]))
    # the labels did differ between the two runs
    assert any(r["charts/accuracy"] > 0 for r in real[1:])
    for key in ("losses/policy_loss", "losses/entropy", "losses/grad_norm", "losses/kl",
                "charts/reward_mean"):
        assert [r[key] for r in real[1:]] == [r[key] for r in garbage[1:]], key
    assert weights["real"].keys() == weights["garbage"].keys()
    assert all(torch.equal(weights["real"][name], weights["garbage"][name])
               for name in weights["real"])


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "error: --group-size 1: must be >= 2 for em-rl"),
])  # --entropy-coef with em-ft: tests/test_bad_input.py
def test_bad_input_gives_one_line_error(flags, message, tmp_path):
    result = run_python(["algorithms/em_rl.py", *flags, "--output-dir", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.slow
def test_sequence_sum_reward_with_entropy_bonus_and_minibatches_runs(tmp_path):
    result = run_python(["algorithms/em_rl.py", *TINY, "--reward-type", "sequence", "--reward-norm",
                         "sum", "--entropy-coef", "0.001", "--num-mini-batches", "2",
                         "--num-epochs", "2", "--micro-batch-size", "3", "--output-dir",
                         str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    step2 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[2])
    # the second mini-batch and epoch are off-policy: the policy has moved since sampling
    assert step2["losses/approx_kl"] > 0 and step2["losses/kl"] > 0
    # sum over tokens of log-probs: at most 0 and,
    # for responses of several tokens, below the per-token mean
    assert step2["charts/reward_mean"] < step2["charts/em_sequence_reward"] <= 0
