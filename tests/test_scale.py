"""The real-scale mechanics of common.py on the CPU: rollout backends, padding-trimmed log-probs,
token-budget micro-batches, gradient checkpointing, precision flags and full state dicts."""

import json
import weakref

import pytest
import torch
from conftest import ALGORITHMS, SETUP_FLAGS, run_python, sample_batch
from test_smoke import TINY_BUDGET

import common


def test_rollout_backends_give_the_same_greedy_responses(embedded):
    model, tokenizer = embedded
    task = common.get_task("countdown")
    prompts = [task.prompt(item) for item in task.items("test")[:6]]
    rollouts = {backend: common.rollout(model, tokenizer, prompts, 2,
                                        common.Sampling(32, backend=backend), greedy=True)
                for backend in common.ROLLOUT_BACKENDS}
    reference = rollouts["generate"]
    # 2 responses per prompt, next to each other
    assert reference.texts[0::2] == reference.texts[1::2]
    assert rollouts["static"].prompt_len == 64  # padded to a multiple of 64 (few compiled shapes)
    for backend, ro in rollouts.items():
        assert ro.texts == reference.texts, backend
        assert torch.equal(ro.response_ids, reference.response_ids), backend
        assert torch.equal(ro.response_mask, reference.response_mask), backend
        for row in range(len(ro.texts)):  # the same prompt tokens, left-padded
            assert torch.equal(
                ro.input_ids[row][ro.attention_mask[row].bool()],
                reference.input_ids[row][reference.attention_mask[row].bool()]), backend
        assert torch.equal(ro.prompt_index, reference.prompt_index)
        assert torch.equal(ro.widths, reference.widths)


def test_continuous_batching_samples_keep_the_rollout_contract(embedded):
    model, tokenizer = embedded
    torch.manual_seed(0)
    ro = common.rollout(model, tokenizer, ["17 13 5>6:", "3 5 7>22:", "1 2 3>6:"], 4,
                        common.Sampling(8, backend="continuous"))
    B, T = ro.response_ids.shape
    assert B == 12 and 1 <= T <= 8 and ro.input_ids.shape == (12, ro.prompt_len + T)
    assert torch.equal(ro.input_ids[:, ro.prompt_len:], ro.response_ids)
    assert torch.equal(ro.prompt_index, torch.arange(3).repeat_interleave(4))
    eos = tokenizer.eos_token_id
    has_eos = (ro.response_ids == eos).any(-1)
    assert torch.equal(ro.truncated, ~has_eos)
    valid = ro.response_mask.sum(-1)
    for row in range(B):  # valid tokens end at the first EOS
        if has_eos[row]:
            assert (ro.response_ids[row, valid[row] - 1] == eos
                    and (ro.response_ids[row, : valid[row] - 1] != eos).all())
    assert torch.equal(ro.widths,
                       torch.stack([ro.attention_mask[:, : ro.prompt_len].sum(-1), valid], -1))


def test_unknown_rollout_backend_is_a_clear_error(embedded):
    model, tokenizer = embedded
    with pytest.raises(common.UserInputError, match="unknown rollout backend"):
        common.rollout(model, tokenizer, ["1 2 3>6:"], 1, common.Sampling(4, backend="vllm"))


def test_trimmed_micro_batches_equal_one_full_pass_on_valid_tokens(embedded):
    model, tokenizer = embedded
    ro, mask, T = sample_batch(model, tokenizer)
    # the shorter prompt (1 pad column) and responses shorter than T: both sides trim
    rows = torch.tensor([4, 6])
    assert int(ro.response_mask[rows].sum(-1).max()) < T
    full = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, 0.7,
                                    with_entropy=True,
                                    # one micro-batch of every row: only the right side trims
                                    with_vocab_mean=True)
    trimmed = common.response_logprobs(model, ro.input_ids[rows], ro.attention_mask[rows], T, 0.7,
                                       with_entropy=True, with_vocab_mean=True, micro_batch_size=1)
    valid = mask[rows].bool()
    for name in ("logp", "entropy", "vocab_mean"):
        a, b = getattr(full, name)[rows], getattr(trimmed, name)
        assert b.shape == a.shape
        torch.testing.assert_close(b[valid], a[valid], rtol=1e-5, atol=1e-5)
        assert (~valid).any() and (b[~valid] == 0).all()


def test_token_budget_counts_the_padded_width():
    # (prompt, response) tokens per row;
    # the longest prompt (row 1) and the longest response (row 4) are different rows
    widths = torch.tensor([[2, 3], [15, 2], [4, 8], [3, 4], [2, 15], [1, 2], [10, 8], [5, 4]])
    rows = torch.arange(8)
    assert ([b.tolist() for b in common.micro_batches(rows, widths, 3)]
            == [[0, 1, 2], [3, 4, 5], [6, 7]])
    batches = common.micro_batches(rows, widths, 4, 40)
    assert sorted(torch.cat(batches).tolist()) == list(range(8))  # every row exactly once
    for batch in batches:  # a trimmed forward is (longest prompt + longest response) wide
        assert (len(batch) <= 4
                and len(batch) * int(widths[batch, 0].max() + widths[batch, 1].max()) <= 40)
    # rows 1 and 4 hold 17 tokens each but are 30 wide together (2 x 30 > 40): packing by each row's
    # own length would put them in one micro-batch
    assert [sorted(b.tolist()) for b in batches] == [[6], [1], [2, 4], [0, 3, 5, 7]]
    # wider: alone
    assert [b.tolist() for b in common.micro_batches(rows, widths, 8, 16)][:3] == [[6], [1], [4]]


def test_log_prob_passes_hold_about_one_logits_tensor():
    """Every pass of response_logprobs (no grad with entropy, gradient of the log-probs, gradient of
    the entropy too) keeps at most ~1 (rows, T, V) fp32 tensor alive: the peak of the tensors
    PyTorch allocates during the pass, measured on a 150k-vocabulary model, stays below 2 of them
    (the logits themselves are one)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from transformers import Qwen2Config, Qwen2ForCausalLM

    class PeakMemory(TorchDispatchMode):  # bytes of every storage an op creates, until it is freed
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.alive = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if (isinstance(tensor, torch.Tensor)
                    and id(storage := tensor.untyped_storage()) not in self.alive):
                    self.alive.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self.free, id(storage), storage.nbytes())
            return out

        def free(self, key, nbytes):
            self.alive.discard(key)
            self.live -= nbytes

    V, B, P, T = 150_000, 4, 4, 32
    config = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = 0  # never sampled below: every response token is valid
    input_ids = torch.randint(1, V, (B, P + T))
    one_tensor = B * T * V * 4
    for mode in ("no grad", "grad", "entropy grad"):
        with PeakMemory() as memory, torch.set_grad_enabled(mode != "no grad"):
            stats = common.response_logprobs(model, input_ids, torch.ones_like(input_ids), T, 0.7,
                                             with_entropy=True, entropy_grad=mode == "entropy grad",
                                             with_vocab_mean=True)
            if mode != "no grad":
                (stats.logp.sum() + stats.entropy.sum()).backward()
            del stats
        assert one_tensor < memory.peak < 2 * one_tensor, (mode, memory.peak / one_tensor)


def test_gradient_checkpointing_gives_the_same_gradients(embedded):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL,
                                                           gradient_checkpointing=checkpointing)
        assert model.is_activation_checkpointing == checkpointing
        ro, mask, T = sample_batch(model, tokenizer)
        model.train()
        logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
        (logp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_bf16_flag_leaves_the_cpu_in_fp32():
    policy, _ = common.load_model_and_tokenizer(common.EMBEDDED_MODEL, "cpu", bf16=True)
    reference, _ = common.load_model_and_tokenizer(common.EMBEDDED_MODEL, "cpu", bf16=True,
                                                   frozen=True)
    assert policy.dtype == reference.dtype == torch.float32 and policy.autocast_dtype is None
    with common.autocast(policy):
        assert not torch.is_autocast_enabled("cpu")


def test_full_state_dicts_restore_model_and_optimizer_exactly(embedded):
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ro, mask, T = sample_batch(model, tokenizer)
    for _ in range(2):
        optimizer.zero_grad()
        (common.response_logprobs(model, ro.input_ids, ro.attention_mask,
                                  T).logp * mask).sum().backward()
        optimizer.step()
    model_sd, optim_sd = common.full_state_dicts(model, optimizer)
    fresh, _ = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    common.load_full_state_dicts(fresh, fresh_optimizer, model_sd, optim_sd)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert (torch.equal(a["exp_avg"], b["exp_avg"])
                and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]))
    assert len(fresh_optimizer.state) == len(optimizer.state) > 0


@pytest.fixture(scope="module")
def qwen_style_model_and_gsm8k(tmp_path_factory, embedded):
    """A Qwen2-architecture model (random, tiny) whose tokenizer has a chat template, and
    GSM8K-format local files: what `--model-name Qwen/Qwen2.5-0.5B-Instruct --task gsm8k` looks like
    to the scripts, offline."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = embedded
    root = tmp_path_factory.mktemp("real_style")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "model")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}>{% endif %}")
    tokenizer.save_pretrained(root / "model")
    tokenizer.chat_template = None
    rows = [{"question": f"{i} + {i + 1} = ?", "answer": f"#### {2 * i + 1}"} for i in range(12)]
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n"
                                                               for row in rows))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_file_runs_a_chat_model_on_gsm8k_with_the_scale_flags(name,
                                                                    qwen_style_model_and_gsm8k,
                                                                    tmp_path):
    root = qwen_style_model_and_gsm8k
    flags = ["--model-name", str(root / "model"), "--task", "gsm8k", "--dataset",
             str(root / "gsm8k"),
             "--max-new-tokens", "12", "--micro-batch-size", "4", "--micro-batch-tokens", "96",
             "--gradient-checkpointing", "--rollout", "static", "--save-model"]
    result = run_python([f"algorithms/{name}.py", *TINY_BUDGET, *SETUP_FLAGS.get(name, []), *flags,
                         "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    steps = [json.loads(line)["step"]
             for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    saved, _ = common.load_model_and_tokenizer(str(run_dir / "model"))
    assert type(saved).__name__ == "Qwen2ForCausalLM"
    # the flag wins
    assert json.loads((run_dir / "config.json").read_text())["max_new_tokens"] == 12


@pytest.mark.slow
# the length, the line and config.json are the shared blocks'
@pytest.mark.parametrize("name", ["grpo", "dph_rl"])
def test_a_file_generates_the_tasks_own_length_unless_told(name, qwen_style_model_and_gsm8k,
                                                           tmp_path):
    # without --max-new-tokens a gsm8k run generates up to gsm8k's 512 tokens (not countdown's 32),
    # says so, and records it. common.check_shared_args sets it, and the line and config.json
    # (written with the first record) are in blocks
    # that test_anatomy keeps equal to grpo.py's in every file;
    # dph_rl.py samples in its set-up before the first record
    root = qwen_style_model_and_gsm8k
    flags = ["--model-name", str(root / "model"), "--task", "gsm8k", "--dataset",
             str(root / "gsm8k"), "--num-steps", "1", "--prompts-per-step", "2", "--group-size",
             "2", "--eval-prompts", "2", "--eval-samples", "1", "--final-eval-samples", "1"]
    result = run_python([f"algorithms/{name}.py", *flags, *SETUP_FLAGS.get(name, []),
                         "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max new tokens: 512\n" in result.stdout
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "config.json").read_text())["max_new_tokens"] == 512
    assert (common.get_task("gsm8k").max_new_tokens == 512
            and common.get_task("countdown").max_new_tokens == 32)


def test_bf16_decode_copy_casts_parameters_only():
    # --rollout static|continuous decode from a bf16 copy of an fp32 policy;
    # RoPE's inv_freq (a buffer) stays fp32
    model, _ = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    model.autocast_dtype = torch.bfloat16  # what load_model_and_tokenizer sets on a GPU with --bf16
    with torch.no_grad():
        # the copy holds the policy's current weights, not the saved ones
        next(model.parameters()).add_(1.0)
        copy = common._low_precision_copy(model)
    buffers = dict(model.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    for name, buffer in copy.named_buffers():
        assert buffer.dtype == buffers[name].dtype == torch.float32, name
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)
    for (name, param), source in zip(copy.named_parameters(), model.parameters(), strict=True):
        assert param.dtype == torch.bfloat16 and torch.equal(param, source.to(torch.bfloat16)), name


def test_bf16_autocast_paths_run(embedded):
    """The GPU's bf16 paths, exercised on the CPU (whose autocast also knows bfloat16): every
    rollout backend and a training forward/backward of an fp32 policy under autocast; gradients stay
    fp32 and close to the fp32 ones."""
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    ro, mask, T = sample_batch(model, tokenizer)
    fp32 = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, with_entropy=True)
    model.autocast_dtype = torch.bfloat16  # what load_model_and_tokenizer sets on a GPU with --bf16
    for backend in common.ROLLOUT_BACKENDS:
        out = common.rollout(model, tokenizer, ["17 13 5>6:", "3 5 7>22:"], 2,
                             common.Sampling(8, backend=backend))
        assert out.response_ids.shape[0] == 4 and out.input_ids.dtype == torch.long
    stats = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T, with_entropy=True,
                                     micro_batch_size=3)
    # computed in bf16
    assert stats.logp.dtype == torch.float32 and not torch.equal(stats.logp, fp32.logp)
    torch.testing.assert_close(stats.logp * mask, fp32.logp * mask, atol=0.1, rtol=0.1)
    (stats.logp * mask).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, embedded):
    """A tiny GPT-2 (random) with dropout 0.1 everywhere, saved with the embedded char tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = embedded
    folder = tmp_path_factory.mktemp("dropout") / "model"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_dropout_is_off_in_every_loaded_model(dropout_model):
    # every model a script uses (policy, reference, PRM) comes from load_model_and_tokenizer
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    raw = AutoModelForCausalLM.from_pretrained(dropout_model).train()
    assert not torch.equal(raw(ids).logits, raw(ids).logits)  # dropout on: two passes differ
    for frozen in (False, True):
        model, _ = common.load_model_and_tokenizer(str(dropout_model), frozen=frozen)
        model.train()
        assert torch.equal(model(ids).logits, model(ids).logits)
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.slow
def test_first_mini_batch_is_on_policy_with_a_dropout_model(dropout_model, tmp_path):
    # from step 2 on the old log-probs come from the policy in train mode: ratio 1 needs dropout off
    result = run_python(["algorithms/grpo.py", "--model-name", str(dropout_model), *TINY_BUDGET,
                         "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = {r["step"]: r
               for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert (records[2]["losses/approx_kl"] == pytest.approx(0.0, abs=1e-7)
            and records[2]["losses/clipfrac"] == 0.0)
