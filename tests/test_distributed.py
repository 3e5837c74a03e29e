"""Several processes on the CPU (gloo), as torchrun runs them: the same global batch gives the same loss and update
as one process (DDP and FSDP2, fixed-size and token-budget micro-batches), the shared helpers agree across processes,
every algorithm file runs under `torchrun --nproc-per-node 2`, and FSDP checkpoints are sharded, resumable and
survive a crash in the middle of a save."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (ALGORITHMS, REPO_ROOT, REWARDS, SETUP_FLAGS, assert_same_update, base_with_sampling_defaults,
                      kill_after_first_checkpoint, load_algorithm, process_share, records, run_distributed, step_and_report)
from transformers import AutoModelForCausalLM, GenerationConfig

import common



def grpo_update(fsdp: bool, micro_batch_tokens: int, loss_agg: str):
    """One GRPO optimizer step (SGD, lr 1: the update is minus the gradient) on this process's share of a fixed global
    batch of 2 prompts x 4 responses, as grpo.py makes it. Returns (reduced loss, full parameters after the step)."""
    grpo = load_algorithm("grpo")
    model, _, T, share = process_share()  # the same global batch in every process, and this process's rows
    input_ids, attention_mask, mask, lengths = share.input_ids, share.attention_mask, share.mask, share.lengths
    world = common.world_size()
    policy = common.data_parallel(model, fsdp)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    with torch.no_grad():
        old_logp = common.response_logprobs(policy, input_ids, attention_mask, T).logp
    seq_adv, _ = grpo.grpo_advantages(REWARDS[share.rows], share.prompt_index, True)
    advantages = seq_adv[:, None] * mask
    mb_tokens, total = common.all_sum(mask.sum()), 0.0
    for idx in common.micro_batches(torch.arange(len(mask)), lengths, 3, micro_batch_tokens):
        logp = common.response_logprobs(policy, input_ids[idx], attention_mask[idx], T, trim=micro_batch_tokens > 0).logp
        token_loss, _, _ = grpo.ppo_clip_loss(logp, old_logp[idx], advantages[idx], 0.2, 0.2)
        loss = world * grpo.aggregate_loss(token_loss, mask[idx], loss_agg, mb_tokens, 8, T)
        loss.backward()
        total += loss.item()
    return step_and_report(optimizer, policy, total)


@pytest.mark.parametrize("fsdp, micro_batch_tokens, loss_agg", [(False, 0, "token-mean"),
                                                                 (False, 40, "seq-mean-token-mean"),
                                                                 (True, 40, "seq-mean-token-sum-norm")])
def test_two_processes_make_the_update_of_one_on_the_same_global_batch(fsdp, micro_batch_tokens, loss_agg):
    one_loss, one_params = grpo_update(fsdp, 0, loss_agg)
    (loss, params), _ = run_distributed(grpo_update, fsdp, micro_batch_tokens, loss_agg)
    assert one_loss != 0
    assert loss == pytest.approx(one_loss, rel=1e-5, abs=1e-7)
    assert_same_update(params, one_params, common.load_model_and_tokenizer(common.EMBEDDED_MODEL)[0].state_dict())


def micro_batch_counts(lengths_per_rank):
    lengths = torch.tensor(lengths_per_rank[common.rank()])
    return [len(b) for b in common.micro_batches(torch.arange(len(lengths)), lengths, 8, 20)]


def test_every_process_gets_as_many_micro_batches():
    short, long = [2] * 8, [10] * 8  # 20 tokens: 8 short rows fit in 1 micro-batch, long rows go 2 by 2
    assert micro_batch_counts([long]) == [2, 2, 2, 2]
    sizes = run_distributed(micro_batch_counts, [short, long])
    assert len(sizes[0]) == len(sizes[1]) == 4 and sum(sizes[0]) == sum(sizes[1]) == 8


def collectives():
    r = common.rank()
    return (common.all_sum(torch.tensor([r + 1.0])).item(), common.gather_lists([r, r]), common.shard(list(range(6))),
            common.reduce_metrics({"a": float(r), "time/step": float(r)}))


def test_shared_helpers_agree_across_processes():
    first, second = run_distributed(collectives)
    assert first == (3.0, [0, 0, 1, 1], [0, 1, 2], {"a": 0.5, "time/step": 1.0})
    assert second[:2] == first[:2] and second[2] == [3, 4, 5] and second[3] == first[3]


def greedy_eval(n_prompts):
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    task = common.get_task("countdown")
    return common.evaluate(model, tokenizer, task, task.items("test")[:n_prompts], 0, 1.0, 32)


def test_evaluation_split_over_processes_equals_one_process():
    for n_prompts in (9, 10):  # uneven shares are padded, and the padding is not counted
        assert run_distributed(greedy_eval, n_prompts) == [greedy_eval(n_prompts)] * 2


FLAGS = ["--num-steps", "4", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8", "--eval-samples", "2",
         "--final-eval-samples", "4", "--eval-every", "2", "--checkpoint-every", "2", "--log-completions-every", "2"]


def torchrun(args: list[str], **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]  # a free port
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_under_torchrun(name, tmp_path):
    proc = torchrun([f"algorithms/{name}.py", *FLAGS, *SETUP_FLAGS.get(name, []), "--output-dir", str(tmp_path)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()  # one run folder: only rank 0 writes
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "completions.jsonl", "config.json",
                                                         "metrics.jsonl"]
    steps = [row["step"] for row in records(run_dir)]
    assert steps == [0, 1, 2, 3, 4]
    assert out.count("step 4/4") == 1  # rank 1 prints nothing
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=False)["rng_per_process"]) == 2


def test_fsdp_with_token_budget_and_static_cache_follows_ddp(tmp_path):
    """FSDP2 shards the same computation DDP replicates: with the same seeds both runs sample the same responses, so
    their metrics agree (up to the float rounding of trimmed, differently reduced computations)."""
    runs = {}
    for variant, flags in {"ddp": [], "fsdp": ["--fsdp", "--micro-batch-tokens", "64", "--rollout", "static"]}.items():
        proc = torchrun(["algorithms/grpo.py", *FLAGS, "--output-dir", str(tmp_path / variant), *flags])
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        (run_dir,) = (tmp_path / variant).iterdir()
        runs[variant] = records(run_dir)
    for ddp, fsdp in zip(runs["ddp"], runs["fsdp"], strict=True):
        assert ddp.keys() == fsdp.keys()
        for key in ddp:
            assert fsdp[key] == pytest.approx(ddp[key], rel=1e-3, abs=1e-5), key


def test_killed_torchrun_job_resumes_exactly(tmp_path):
    full = torchrun(["algorithms/grpo.py", *FLAGS, "--output-dir", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = torchrun(["algorithms/grpo.py", *FLAGS, "--output-dir", str(tmp_path / "killed")])
    run_dir = kill_after_first_checkpoint(victim, tmp_path / "killed",
                                          lambda: os.killpg(victim.pid, signal.SIGKILL))  # torchrun and both workers
    assert records(run_dir)[-1]["step"] < 4
    resumed = torchrun(["algorithms/grpo.py", "--resume", str(run_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)

    one = subprocess.run([sys.executable, "algorithms/grpo.py", "--resume", str(run_dir)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode != 0 and "written by 2 process(es)" in one.stderr and "Traceback" not in one.stderr
    shutil.rmtree(tmp_path)


SHARD_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp"]  # torch.distributed.checkpoint: its index, a file per rank


def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tmp_path):
    """Under --fsdp every process writes its own shard of the policy and AdamW state and reads it back: a run killed
    after its first checkpoint and resumed ends with the uninterrupted run's records. --save-model gathers the
    shards into a bf16 from_pretrained folder with the base model's generation_config."""
    base = base_with_sampling_defaults(tmp_path / "base")
    flags = ["algorithms/grpo.py", *FLAGS, "--fsdp", "--model-name", str(base)]
    full = torchrun([*flags, "--output-dir", str(tmp_path / "full"), "--save-model", "--save-dtype", "bfloat16"])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = torchrun([*flags, "--output-dir", str(tmp_path / "killed")])
    run_dir = kill_after_first_checkpoint(victim, tmp_path / "killed", lambda: os.killpg(victim.pid, signal.SIGKILL))
    assert records(run_dir)[-1]["step"] < 4
    resumed = torchrun(["algorithms/grpo.py", "--resume", str(run_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)

    for folder in (full_dir, run_dir):  # the last checkpoint's shards only; checkpoint.pt keeps no weights
        assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-4"]
        assert sorted(p.name for p in (folder / "checkpoint-4").iterdir()) == SHARD_FILES
        assert "policy" not in torch.load(folder / "checkpoint.pt", weights_only=False)
    weights_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    for shard in SHARD_FILES[1:]:  # each process wrote half of the weights and of AdamW's two moments
        assert (run_dir / "checkpoint-4" / shard).stat().st_size > 0.4 * 3 * weights_bytes

    saved = AutoModelForCausalLM.from_pretrained(full_dir / "model")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    assert json.loads((full_dir / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert GenerationConfig.from_pretrained(full_dir / "model").to_dict() == GenerationConfig.from_pretrained(base).to_dict()


def crash_in_a_sharded_save(run_dir: str):
    """An FSDP policy checkpointed at step 1, trained a step more, then a save at step 2 that dies in its commit
    (rank 0 killed just before it renames checkpoint.pt), its shard folder then cut short. Returns (restored step,
    full state after step 1, full state restored, files after the crash, files after the next save, the error for a
    missing shard); the full states are rank 0's."""
    model, _, T, share = process_share()
    policy = common.data_parallel(model, fsdp=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    models = {"policy": (policy, optimizer)}

    def train_step():
        optimizer.zero_grad()
        logp = common.response_logprobs(policy, share.input_ids, share.attention_mask, T).logp
        (logp * share.mask).sum().backward()
        optimizer.step()

    train_step()
    common.save_checkpoint(Path(run_dir), 1, {}, models)
    after_step_1 = copy.deepcopy(common.full_state_dicts(policy, optimizer))  # AdamW's step counters change in place
    train_step()
    replace = os.replace

    def dies_in_the_commit(src, dst):
        if Path(dst).name == common.CHECKPOINT_FILE:
            raise KeyboardInterrupt  # stands in for SIGKILL
        return replace(src, dst)

    os.replace = dies_in_the_commit
    try:
        common.save_checkpoint(Path(run_dir), 2, {}, models)
    except KeyboardInterrupt:
        pass
    finally:
        os.replace = replace
    torch.distributed.barrier()
    if common.is_main():
        for shard in (Path(run_dir) / "checkpoint-2").iterdir():
            shard.write_bytes(shard.read_bytes()[:100])  # as if the kill had come while the shards were written
    torch.distributed.barrier()
    after_crash = sorted(p.name for p in Path(run_dir).iterdir())

    fresh = common.data_parallel(common.load_model_and_tokenizer(common.EMBEDDED_MODEL)[0], fsdp=True)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    checkpoint = common.load_checkpoint(run_dir)
    common.load_models(checkpoint, {"policy": (fresh, fresh_optimizer)})
    restored = common.full_state_dicts(fresh, fresh_optimizer)
    common.save_checkpoint(Path(run_dir), 2, {}, models)  # the next save replaces the left-overs
    after_save = sorted(p.name for p in Path(run_dir).iterdir())
    torch.distributed.barrier()
    if common.is_main():
        (Path(run_dir) / "checkpoint-2" / "__1_0.distcp").unlink()
    torch.distributed.barrier()
    try:
        common.load_models(common.load_checkpoint(run_dir), models)
        error = ""
    except common.UserInputError as exc:
        error = str(exc)
    return checkpoint["step"], after_step_1, restored, after_crash, after_save, error


def test_a_crash_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    (step, (model_sd, optim_sd), (restored_sd, restored_optim_sd), after_crash, after_save, error), second = \
        run_distributed(crash_in_a_sharded_save, str(tmp_path))
    assert step == 1 and after_crash == ["checkpoint-1", "checkpoint-2", "checkpoint.pt", "checkpoint.tmp"]
    torch.testing.assert_close(restored_sd, model_sd, rtol=0, atol=0)
    torch.testing.assert_close(restored_optim_sd["state"], optim_sd["state"], rtol=0, atol=0)
    assert len(optim_sd["state"]) > 10
    assert after_save == ["checkpoint-2", "checkpoint.pt"]
    assert error.startswith("checkpoint ") and "corrupt or incomplete" in error and "\n" not in error
    assert second[-1] == error  # every process stops with the same message
