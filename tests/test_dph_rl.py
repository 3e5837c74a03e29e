"""DPH-RL math on hand-made tensors
(values worked out by hand in the comments) and the rehearsal-set invariants."""

import math
from types import SimpleNamespace

import json

import pytest
import torch
from conftest import SETUP_FLAGS, load_algorithm, run_distributed, run_python
from test_smoke import TINY_BUDGET

import common

dph = load_algorithm("dph_rl")

GENERATORS = ["js", "forward-kl", "alpha"]


@pytest.mark.parametrize("divergence", GENERATORS)
def test_generator_is_zero_with_zero_slope_at_one(divergence):
    # u = exp(log_ratio); d f / d log_ratio = u f'(u), so a zero slope at log_ratio 0 is f'(1) = 0
    log_ratio = torch.zeros(1, requires_grad=True)
    value = dph.f_divergence(log_ratio, divergence)
    value.sum().backward()
    assert value.item() == 0.0 and log_ratio.grad.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("divergence,at_half,at_two", [
    # forward-kl u - log u - 1: f(0.5) = 0.5 + log 2 - 1 = 0.19315; f(2) = 2 - log 2 - 1 = 0.30685
    ("forward-kl", math.log(2) - 0.5, 1 - math.log(2)),
    # js u log u - (u + 1) log((u + 1) / 2):
    # f(0.5) = 0.5 log 0.5 - 1.5 log 0.75 = -0.34657 + 0.43152 = 0.08495;
    # f(2) = 2 log 2 - 3 log 1.5 = 1.38629 - 1.21640 = 0.16990
    ("js", 0.5 * math.log(0.5) - 1.5 * math.log(0.75), 2 * math.log(2) - 3 * math.log(1.5)),
    # alpha 0.2: (u^0.8 - 0.8 u - 0.2) / (0.2 * -0.8). u = 0.5: 0.5^0.8 = 0.574349, (0.574349 - 0.4
    # - 0.2) / -0.16 = 0.160318; u = 2: 2^0.8 = 1.741101, (1.741101 - 1.6 - 0.2) / -0.16 = 0.368118
    ("alpha", 0.160318, 0.368118),
])
def test_generator_values_by_hand(divergence, at_half, at_two):
    values = dph.f_divergence(torch.log(torch.tensor([0.5, 2.0], dtype=torch.float64)), divergence)
    torch.testing.assert_close(values, torch.tensor([at_half, at_two], dtype=torch.float64),
                               atol=2e-6, rtol=0)


def test_alpha_generator_tends_to_reverse_kl_near_zero_and_forward_kl_near_one():
    # alpha -> 0: u^(1-alpha) = u (1 - alpha log u + ...), so f
    # -> u log u - u + 1, the generator of KL(pi || pi0);
    # alpha -> 1: u^(1-alpha) = 1 + (1 - alpha) log u + ..., so f
    # -> u - log u - 1, forward-kl's (KL(pi0 || pi))
    log_u = torch.log(torch.tensor([0.1, 0.5, 2.0, 7.0], dtype=torch.float64))
    u = log_u.exp()
    reverse, forward = u * log_u - u + 1, u - log_u - 1
    near_zero, near_one = dph.f_divergence(log_u, "alpha", 1e-6), dph.f_divergence(log_u, "alpha",
                                                                                   1 - 1e-6)
    torch.testing.assert_close(near_zero, reverse, atol=1e-5, rtol=0)
    torch.testing.assert_close(near_one, forward, atol=1e-5, rtol=0)
    # the limits differ
    assert (near_zero - forward).abs().max() > 0.1 and (near_one - reverse).abs().max() > 0.1
    # the default alpha 0.2 lies in between, nearer reverse KL:
    # at u = 2, 0.30685 < 0.36812 < 0.38629
    at_two = dph.f_divergence(log_u, "alpha")[2]
    assert forward[2] < at_two < reverse[2]


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.95])
def test_alpha_generator_is_convex_and_nonnegative(alpha):
    log_u = torch.linspace(-6, 3, 201, dtype=torch.float64)
    values = dph.f_divergence(log_u, "alpha", alpha)
    u = log_u.exp()
    chords = (values[:-2] * (u[2:] - u[1:-1]) + values[2:] * (u[1:-1] - u[:-2])) / (u[2:] - u[:-2])
    # on or below every neighbour chord
    assert (values >= 0).all() and (values[1:-1] <= chords + 1e-12).all()


def test_js_generator_is_symmetric_and_forward_kl_is_not():
    # JS is a symmetric divergence: its generator satisfies u f(1/u) = f(u),
    # here 2 f(0.5) = f(2) = 0.16990
    u = torch.tensor([0.1, 0.5, 3.0, 7.0], dtype=torch.float64)
    js = dph.f_divergence(u.log(), "js")
    torch.testing.assert_close(u * dph.f_divergence(-u.log(), "js"), js)
    forward = dph.f_divergence(u.log(), "forward-kl")
    assert not torch.allclose(u * dph.f_divergence(-u.log(), "forward-kl"), forward)
    assert (js > 0).all() and (forward > 0).all()


@pytest.mark.parametrize("divergence", GENERATORS)
def test_log_ratio_is_clamped_to_twenty(divergence):
    values = dph.f_divergence(torch.tensor([100.0, -100.0]), divergence)
    torch.testing.assert_close(values, dph.f_divergence(torch.tensor([20.0, -20.0]), divergence))
    assert torch.isfinite(values).all()


def test_forward_kl_is_capped_at_ten_as_the_authors_code():
    # u - log u - 1 = 10 at log u = -11.0 (u = 1.67e-5) and log u = 2.611 (u = 13.6): outside that
    # band the value is 10 and the gradient 0; inside it the gradient is u - 1 (through log u): -1 +
    # 2.3e-5 at log u = -10.9, 12.2 at 2.58
    log_u = torch.tensor([-15.0, -11.1, -10.9, 0.5, 2.58, 2.65, 5.0], dtype=torch.float64,
                         requires_grad=True)
    values = dph.f_divergence(log_u, "forward-kl")
    values.sum().backward()
    outside = torch.tensor([True, True, False, False, False, True, True])
    assert (values[outside] == 10).all() and (values[~outside] < 10).all()
    assert (log_u.grad[outside] == 0).all()
    torch.testing.assert_close(log_u.grad[~outside], log_u.detach()[~outside].exp() - 1)
    assert (log_u.grad[~outside].abs() > 0.6).all()
    # js and alpha have no cap: at log u = 5 their gradients are large (js u log(2u / (u + 1)) =
    # 101.9, alpha (u - u^0.8) / 0.2 = 469.1), at -15 small (both tend to 0 as u -> 0: -4.4e-6 and
    # -2.9e-5) but not 0
    for divergence in ("js", "alpha"):
        far = torch.tensor([5.0, -15.0], dtype=torch.float64, requires_grad=True)
        dph.f_divergence(far, divergence).sum().backward()
        assert far.grad[0] > 50 and far.grad[1] < 0


def test_reverse_kl_has_no_rehearsal_generator():
    with pytest.raises(ValueError, match="reverse-kl"):
        dph.f_divergence(torch.zeros(1), "reverse-kl")


def test_split_on_a_table_of_presample_results():
    # 4 prompts x k = 4 verdicts, interleaved (response n answers prompt n % 4):
    # 4/4, 3/4, 0/4, 4/4 correct
    # (prompt, sample)
    table = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    correct, prompt_index = table.T.reshape(-1), torch.arange(4).repeat(4)
    # k/k: the paper
    assert (dph.split_pool(correct, prompt_index, 4, threshold=4).tolist()
            == [True, False, False, True])
    # a looser one
    assert (dph.split_pool(correct, prompt_index, 4, threshold=3).tolist()
            == [True, True, False, True])
    # a prompt with no responses at all (never sampled) stays in the exploration set
    assert (dph.split_pool(correct, prompt_index, 5, threshold=1).tolist()
            == [True, True, False, True, False])


@pytest.mark.parametrize("divergence,slopes", [
    # d f(u)/d logp = u f'(u). forward-kl: u - 1 -> [1, -0.5];
    # js: u log(2u / (u + 1)) -> [2 log(4/3), 0.5 log(2/3)]
    ("forward-kl", [1.0, -0.5]),
    ("js", [2 * math.log(4 / 3), 0.5 * math.log(2 / 3)]),
    # alpha 0.2: u f'(u) = (u - u^0.8) / 0.2
    # -> [(2 - 1.741101) / 0.2, (0.5 - 0.574349) / 0.2] = [1.294494, -0.371746]
    ("alpha", [1.294494, -0.371746]),
])
def test_rehearsal_gradient_flows_only_through_the_current_logprobs(divergence, slopes):
    logp0 = torch.log(torch.tensor([[0.2, 0.4]], dtype=torch.float64)).requires_grad_()
    # u = [2, 0.5]
    logp = torch.log(torch.tensor([[0.4, 0.2]], dtype=torch.float64)).requires_grad_()
    f_u, u = dph.rehearsal_token_loss(logp, logp0, divergence)
    torch.testing.assert_close(u, torch.tensor([[2.0, 0.5]], dtype=torch.float64))
    f_u.sum().backward()
    assert logp0.grad is None and not u.requires_grad
    torch.testing.assert_close(logp.grad, torch.tensor([slopes], dtype=torch.float64), atol=2e-6,
                               rtol=0)


@pytest.mark.slow
def test_script_trains_with_the_alpha_divergence(tmp_path):
    result = run_python(["algorithms/dph_rl.py", *TINY_BUDGET, *SETUP_FLAGS["dph_rl"],
                         "--divergence", "alpha",
                         "--alpha", "0.3", "--eta", "0.05", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["divergence"], config["alpha"]) == ("alpha", 0.3)
    step1, step2 = [json.loads(line)
                    for line in (run_dir / "metrics.jsonl").read_text().splitlines()[1:]]
    assert step1["charts/rehearsal_prompts"] > 0
    # the config is written after the pre-pass:
    # it records the real set sizes (it said 0 when written before)
    assert config["rehearsal_prompts"] == step1["charts/rehearsal_prompts"]
    assert config["rehearsal_prompts"] + config["exploration_prompts"] == 16  # --pool-prompts
    # u = 1 before the first update
    assert step1["losses/rehearsal_loss"] == pytest.approx(0.0, abs=1e-6)
    assert (step2["losses/rehearsal_loss"] > 0
            and step2["losses/rehearsal_u_mean"] != pytest.approx(1.0, abs=1e-6))


def test_rehearsal_set_layout_keeps_the_initial_logprobs(random_model):
    # two stored successes with different prompt and response lengths, re-padded to one layout: the
    # stored logp0 must equal the log-probs of each pair scored alone (no padding), so u = 1 before
    # the first update
    model, tokenizer = random_model
    pairs = [(tokenizer("3 5 7>22:", add_special_tokens=False, return_tensors="pt").input_ids[0],
              tokenizer("3*5+7", add_special_tokens=False, return_tensors="pt").input_ids[0]),
             (tokenizer("17 13 5>6:", add_special_tokens=False, return_tensors="pt").input_ids[0],
              tokenizer("(13+17)/5", add_special_tokens=False, return_tensors="pt").input_ids[0])]
    pairs = [(prompt, torch.cat([response, torch.tensor([tokenizer.eos_token_id])]))
             for prompt, response in pairs]

    class Args:
        max_new_tokens, temperature, micro_batch_size, micro_batch_tokens = 12, 1.0, 1, 0

    stored = dph.build_rehearsal_set(model, pairs, tokenizer.pad_token_id, Args, "cpu")
    assert stored.mask.sum(-1).tolist() == [6, 10] and stored.input_ids.shape == (2, 10 + 12)
    for n, (prompt, response) in enumerate(pairs):
        ids = torch.cat([prompt, response])[None]
        with torch.no_grad():
            alone = common.response_logprobs(model, ids, torch.ones_like(ids),
                                             len(response)).logp[0]
        torch.testing.assert_close(stored.logp0[n, : len(response)], alone, atol=1e-5, rtol=0)
        assert (stored.logp0[n, len(response):] == 0).all()
    with torch.no_grad():
        logp = common.response_logprobs(model, stored.input_ids, stored.attention_mask, 12).logp
    _, u = dph.rehearsal_token_loss(logp, stored.logp0, "js")
    torch.testing.assert_close(u[stored.mask.bool()], torch.ones(16), atol=1e-5, rtol=0)


def _presample(pool_size):
    # top_k 1: the samples are the greedy responses, the same in any process and batch,
    # so the runs can be compared
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    task = common.get_task("countdown", "", tokenizer)
    sampling = common.Sampling(32, top_k=1)
    correct, item_index, kept = dph.presample_pool(model, tokenizer, task,
                                                   task.train_items()[:pool_size], 2, sampling)
    return correct, item_index, [(i, prompt.tolist(), response.tolist())
                                 for i, prompt, response in kept]


def _rehearsal_step(micro_batch_tokens):
    # a fixed rehearsal set of 5 stored responses (logp0 moved off the model's own log-probs, so the
    # loss is not 0) and a global batch of 6 rows (one repeated); each process takes its half.
    # Returns the loss and the gradient as DDP
    # leaves it (averaged over the processes).
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    texts = [("10 13 17>6:", "17-(13-10)"), ("20 12 13>19:", "20-13+12"), ("17 4 1>68:", "17*4*1"),
             ("3 5 7>22:", "3*5+7"), ("17 13 5>6:", "(13+17)/5")]
    pairs = [(tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0],
              torch.cat([tokenizer(response, add_special_tokens=False,
                                   return_tensors="pt").input_ids[0],
                         torch.tensor([tokenizer.eos_token_id])])) for prompt, response in texts]
    args = SimpleNamespace(max_new_tokens=12, temperature=1.0, micro_batch_size=2,
                           micro_batch_tokens=micro_batch_tokens,
                           divergence="js", eta=0.2, alpha=0.2)
    rehearsal = dph.build_rehearsal_set(model, pairs, tokenizer.pad_token_id, args, "cpu")
    noise = torch.randn(rehearsal.logp0.shape, generator=torch.Generator().manual_seed(0))
    rehearsal.logp0 = (rehearsal.logp0 + 0.3 * noise) * rehearsal.mask
    rows = torch.tensor(common.shard([4, 0, 2, 2, 1, 3]))
    sums = {"rehearsal_loss": 0.0, "rehearsal_u": 0.0, "rehearsal_tokens": 0.0}
    # the whole batch's, as dph_rl.py's step
    total_tokens = common.all_sum(rehearsal.mask[rows].sum())
    dph.rehearsal_backward(model, rehearsal, rows, total_tokens, common.world_size(), args, sums)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return sums["rehearsal_loss"], common.all_sum(grad) / common.world_size()


MICRO_BATCH_TOKENS = [0, 40]  # row micro-batches, token-budget ones (trimmed)


def _both():
    return _presample(7), [_rehearsal_step(tokens) for tokens in MICRO_BATCH_TOKENS]


@pytest.fixture(scope="module")
def two_processes():
    """Both computations on 2 processes (one spawn, for time): each rank's results."""
    return run_distributed(_both)


@pytest.mark.slow
def test_presample_on_two_processes_gives_every_process_the_single_process_sets(two_processes):
    # 7 pool prompts over 2 processes: shares of 4 and 3 (+ 1 padding prompt whose samples are
    # dropped); the embedded model solves prompts 1, 3, 5 and 6 greedily, in both shares
    single = _presample(7)
    assert single[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert (dph.split_pool(single[0], single[1], 7, threshold=2).tolist()
            == [False, True, False, True, False, True, True])
    for (correct, item_index, kept), _ in two_processes:
        assert (torch.equal(correct, single[0]) and torch.equal(item_index, single[1])
                and kept == single[2])


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(MICRO_BATCH_TOKENS)))
def test_rehearsal_loss_on_two_processes_equals_one_process_on_the_whole_batch(two_processes, case):
    loss, grad = _rehearsal_step(MICRO_BATCH_TOKENS[case])
    assert loss > 0
    ranks = [rehearsal[case] for _, rehearsal in two_processes]
    # each process logs its share times the processes:
    # their mean (reduce_metrics) is the whole batch's loss
    assert sum(rank_loss for rank_loss, _ in ranks) / 2 == pytest.approx(loss, rel=1e-5)
    for _, rank_grad in ranks:
        torch.testing.assert_close(rank_grad, grad)
