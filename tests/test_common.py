"""common.py: masks, log-probs and entropy, pass@k, model loading, rollout."""

import itertools
import math

import pytest
import torch

import common


def test_response_mask_includes_first_eos_when_pad_is_eos():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 0, 0],  # answer, EOS, then pads that are also EOS
                        [5, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0],  # EOS straight away
                        [5, 6, 7, 8, 9]])  # truncated: no EOS
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1]])
    assert torch.equal(common.response_mask_from_ids(ids, [eos]), expected)
    # several EOS ids (instruction-tuned models): the first of any of them ends the response
    assert (common.response_mask_from_ids(torch.tensor([[5, 7, 9, 0]]), [0, 7]).tolist()
            == [[1, 1, 0, 0]])


def _manual_logprobs(model, prompt, response, temperature):
    """Unpadded single-sequence reference computation."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    log_probs = torch.log_softmax(logits, -1)
    probs = log_probs.exp()
    return (log_probs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1),
            -(probs * log_probs).sum(-1),
            log_probs.mean(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_unpadded_computation(random_model, temperature):
    model, tokenizer = random_model
    pad = tokenizer.pad_token_id
    prompts = [[3, 4, 5, 6, 7], [8, 9]]  # different lengths: the second is left-padded
    responses = [[10, 11, 12], [13, 14, 15]]
    P = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (P - len(p)) + p + r for p, r in zip(prompts, responses)])
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r))
                                   for p, r in zip(prompts, responses)])
    with torch.no_grad():
        full = common.response_logprobs(model, input_ids, attention_mask, 3, temperature,
                                        with_entropy=True, with_vocab_mean=True)
        chunked = common.response_logprobs(model, input_ids, attention_mask, 3, temperature,
                                           with_entropy=True,
                                           with_vocab_mean=True, micro_batch_size=1)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ref_logp, ref_entropy, ref_vocab_mean = _manual_logprobs(model, p, r, temperature)
            torch.testing.assert_close(full.logp[row], ref_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full.entropy[row], ref_entropy, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full.vocab_mean[row], ref_vocab_mean, atol=1e-5, rtol=1e-5)
    for name in ("logp", "entropy", "vocab_mean"):
        torch.testing.assert_close(getattr(chunked, name), getattr(full, name))


def test_gradient_reaches_logp_and_entropy_only_when_asked(random_model):
    model, _ = random_model
    ids = torch.tensor([[3, 4, 5, 6]])
    stats = common.response_logprobs(model, ids, torch.ones_like(ids), 2, with_entropy=True,
                                     with_vocab_mean=True)
    assert (stats.logp.requires_grad and not stats.entropy.requires_grad
            and not stats.vocab_mean.requires_grad)
    stats = common.response_logprobs(model, ids, torch.ones_like(ids), 2, with_entropy=True,
                                     entropy_grad=True)
    assert stats.entropy.requires_grad and stats.vocab_mean is None
    with torch.no_grad():
        assert not common.response_logprobs(model, ids, torch.ones_like(ids), 2, with_entropy=True,
                                            entropy_grad=True).entropy.requires_grad


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_matches_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(common.pass_at_k(n, c, k), brute, abs_tol=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        common.pass_at_k(4, 1, 8)


def test_embedded_tokenizer_round_trip(embedded):
    _, tokenizer = embedded
    assert type(tokenizer).__name__ != "Qwen2Tokenizer"
    text = "17 13 5>6:(13+17)/5"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, spaces included
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "left"


def test_reloaded_embedded_model_solves_countdown(embedded):
    """Catches a tokenizer or weights that do not survive save
    -> from_pretrained (a broken reload scores ~0%)."""
    model, tokenizer = embedded
    task = common.get_task("countdown")
    metrics = common.evaluate(model, tokenizer, task, task.items("test")[:64], 0,
                              sampling=common.Sampling(task.max_new_tokens))
    assert metrics["eval/greedy_acc"] >= 0.25


def test_rollout_contract(embedded):
    model, tokenizer = embedded
    torch.manual_seed(0)
    prompts = ["17 13 5>6:", "9 9 1>81:", "3 5 7>22:"]
    ro = common.rollout(model, tokenizer, prompts, group_size=4, sampling=common.Sampling(12))
    B, T = ro.response_ids.shape
    assert B == 12 and ro.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (ro.input_ids.shape == (B, ro.prompt_len + T)
            and torch.equal(ro.input_ids[:, ro.prompt_len:], ro.response_ids))
    lengths = ro.response_mask.sum(-1)
    for b in range(B):
        if ro.truncated[b]:
            assert lengths[b] == T and tokenizer.eos_token_id not in ro.response_ids[b].tolist()
        else:  # the first EOS is the last token inside the mask, though pad == eos
            assert ro.response_ids[b, lengths[b] - 1] == tokenizer.eos_token_id
            assert tokenizer.eos_token_id not in ro.response_ids[b, : lengths[b] - 1].tolist()
        assert (ro.texts[b]
                == tokenizer.decode(ro.response_ids[b, : lengths[b]], skip_special_tokens=True))


def test_rollout_ignores_sampling_defaults_shipped_with_a_model(embedded):
    model, _ = embedded
    config = model.generation_config
    assert config.top_k is None and config.top_p is None and config.repetition_penalty is None


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserInputError, match="model folder not found"):
        common.load_model_and_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(common.UserInputError, match="offline: pass a local path"):
        common.load_model_and_tokenizer("some-org/some-model-that-is-not-cached")


def test_evaluate_reports_every_metric_and_each_subset(embedded):
    model, tokenizer = embedded
    task = common.get_task("countdown")
    # 4 one-solution and 4 several-solution prompts, then 4 of the second skill
    items = task.eval_items("test", 8)
    torch.manual_seed(0)
    metrics = common.evaluate(model, tokenizer, task, items, 4,
                              sampling=common.Sampling(task.max_new_tokens))
    names = ["greedy_acc", "mean@4", "pass@1", "pass@2", "pass@4", "distinct_correct"]
    prefixes = ["", "one_solution/", "several_solutions/", "second_skill/"]
    assert set(metrics) == {f"eval/{prefix}{name}" for prefix in prefixes for name in names}
    # pass@1 is the mean accuracy
    assert metrics["eval/pass@1"] == pytest.approx(metrics["eval/mean@4"])
    assert metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= metrics["eval/pass@4"]
    assert (0 <= metrics["eval/distinct_correct"] <= 4
            and metrics["eval/one_solution/distinct_correct"] <= 1)
    # the trained task's metrics cover its own prompts only: the mean of its two equal halves
    for name in names:
        halves = metrics[f"eval/one_solution/{name}"] + metrics[f"eval/several_solutions/{name}"]
        assert metrics[f"eval/{name}"] == pytest.approx(halves / 2)
    # the base computes far better than it searches
    assert metrics["eval/second_skill/mean@4"] > metrics["eval/mean@4"]
