"""Several processes on the CPU (gloo), as torchrun runs them: the same global batch gives the same
loss and update as one process (DDP and FSDP2, fixed-size and token-budget micro-batches), the
shared helpers agree across processes, every algorithm file runs under
`torchrun --nproc-per-node 2`, and FSDP checkpoints are sharded, resumable and survive a crash in
the middle of a save."""

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
from conftest import (ALGORITHMS, REPO_ROOT, assert_same_run, base_with_sampling_defaults,
                      kill_after_first_checkpoint, process_share, records, run_distributed,
                      run_on_fixed_rollouts, torchrun)
from transformers import AutoModelForCausalLM, GenerationConfig

import common

pytestmark = pytest.mark.slow  # every test starts several processes


def micro_batch_counts(widths_per_rank):
    widths = torch.tensor(widths_per_rank[common.rank()])
    return [len(b) for b in common.micro_batches(torch.arange(len(widths)), widths, 8, 20)]


def mini_batch_rows(counts: list[int], seed):
    """This process's parts of 3 mini-batches; its rows are labelled 100 x rank + local index."""
    rows = torch.arange(counts[common.rank()]) + 100 * common.rank()
    return [(part.tolist(), weights.tolist())
            for part, weights in common.mini_batch_parts(rows, 3, seed)]


def collectives():
    r = common.rank()
    return (common.all_sum(torch.tensor([r + 1.0])).item(), common.gather_lists([r, r]),
            common.shard(list(range(6))),
            common.reduce_metrics({"a": float(r), "time/step": float(r)}))


def greedy_eval(n_prompts):
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    task = common.get_task("countdown")
    return common.evaluate(model, tokenizer, task, task.items("test")[:n_prompts], 0,
                           common.Sampling(32))


# 20 tokens: 8 short rows fit in 1 micro-batch, long rows go 2 by 2
SHORT, LONG = [[1, 1]] * 8, [[5, 5]] * 8
EVAL_PROMPTS = (9, 10)  # uneven shares are padded, and the padding is not counted


def helper_calls():
    """The calls of the tests below, made in one spawn of 2 processes
    (a spawn costs seconds: each imports torch)."""
    return {"micro_batches": micro_batch_counts([SHORT, LONG]),
            # uneven, as PRIME's kept rows
            "shuffles": {seed: mini_batch_rows([5, 2], seed) for seed in (None, 7)},
            "collectives": collectives(),
            "evaluations": [greedy_eval(n_prompts) for n_prompts in EVAL_PROMPTS]}


@pytest.fixture(scope="module")
def two_processes():
    return run_distributed(helper_calls)


def test_every_process_gets_as_many_micro_batches(two_processes):
    assert micro_batch_counts([LONG]) == [2, 2, 2, 2]
    sizes = [result["micro_batches"] for result in two_processes]
    assert len(sizes[0]) == len(sizes[1]) == 4 and sum(sizes[0]) == sum(sizes[1]) == 8


@pytest.mark.parametrize("seed", [None, 7])
def test_processes_share_one_shuffle_into_mini_batches(seed, two_processes):
    one = mini_batch_rows([7], seed)  # one process holding the global batch of 7 rows
    assert (sorted(row for part, _ in one for row in part) == list(range(7))
            and all(min(w) == 1 for _, w in one))
    first, second = (result["shuffles"][seed] for result in two_processes)  # shares of 5 and 2 rows
    to_global = {**{r: r for r in range(5)}, 100: 5, 101: 6}
    for (rows, weights), (part0, w0), (part1, w1) in zip(one, first, second, strict=True):
        # fillers even the shares out: as many micro-batches everywhere
        assert len(part0) == len(part1)
        real = [to_global[r] for r, w in zip(part0 + part1, w0 + w1) if w == 1]
        assert real == rows  # the one-process mini-batch, in its order
        assert sum(w == 0 for w in w0 + w1) == len(part0) + len(part1) - len(rows)
    if seed is not None:
        assert one != mini_batch_rows([7], None)  # shuffled


def test_shared_helpers_agree_across_processes(two_processes):
    first, second = (result["collectives"] for result in two_processes)
    assert first == (3.0, [0, 0, 1, 1], [0, 1, 2], {"a": 0.5, "time/step": 1.0})
    assert second[:2] == first[:2] and second[2] == [3, 4, 5] and second[3] == first[3]


def test_evaluation_split_over_processes_equals_one_process(two_processes):
    for i, n_prompts in enumerate(EVAL_PROMPTS):
        assert ([result["evaluations"][i] for result in two_processes]
                == [greedy_eval(n_prompts)] * 2)


FLAGS = ["--num-steps", "4", "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "8",
         "--eval-samples", "2", "--final-eval-samples", "4", "--eval-every", "2",
         "--checkpoint-every", "2", "--log-completions-every", "2"]


EQUIVALENCE_FLAGS = ["--num-steps", "2", "--prompts-per-step", "4", "--group-size", "4",
                     "--num-mini-batches", "2", "--num-epochs", "2", "--micro-batch-tokens", "60",
                     "--eval-prompts", "4", "--eval-samples", "2", "--final-eval-samples", "4",
                     "--log-completions-every", "1", "--checkpoint-every", "2", "--save-model"]


# always correct
EQUIVALENCE_SETUP = {"dph_rl": ["--pool-prompts", "16", "--presample-k", "4",
                                "--rehearsal-threshold", "4"],
                     # two processes shard these with FSDP2
                     "em_rl": ["FSDP"], "prime": ["FSDP"], "rover": ["FSDP"]}


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """Every algorithm file run for 2 steps (2 epochs x 2 mini-batches, token-budget micro-batches)
    by one process and by two under torchrun, on rollouts that do not depend on the processes
    (tests/fixed_rollouts.py): one python and one torchrun for all files. Returns ({name:
    {processes: run folder}}, {processes: {script: widest forward}}, torchrun's stdout)."""
    root = tmp_path_factory.mktemp("equivalence")
    widths = {}
    for processes in (1, 2):
        runs = [[f"algorithms/{name}.py", *EQUIVALENCE_FLAGS, "--output-dir",
                 str(root / name / str(processes)),
                 *[flag for flag in EQUIVALENCE_SETUP.get(name, []) if flag != "FSDP"],
                 *(["--fsdp"] if processes == 2 and "FSDP" in EQUIVALENCE_SETUP.get(name, [])
                   else [])]
                # with 2 processes the FSDP2 files shard, the others replicate (DDP)
                for name in ALGORITHMS]
        out = run_on_fixed_rollouts(runs, processes, root / f"{processes}.json")
        widths[processes] = json.loads((root / f"{processes}.json").read_text())
    folders = {name: {n: next((root / name / str(n)).iterdir()) for n in (1, 2)}
               for name in ALGORITHMS}
    return folders, widths, out


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_processes_make_the_update_of_one(name, one_and_two_processes):
    """Under torchrun each file runs, rank 0 alone writes and prints, and 2 processes make the
    update 1 process makes on the same global batch: one shared shuffle into mini-batches, global
    token means and covariances."""
    folders, _, out = one_and_two_processes
    one, two = folders[name][1], folders[name][2]
    assert ({"completions.jsonl", "config.json", "metrics.jsonl", "model"}
            < {p.name for p in two.iterdir()})
    assert out.count(f"run folder: {two}") == 1  # rank 1 prints nothing
    assert [row["step"] for row in records(two)] == [0, 1, 2]
    assert_same_run(one, two)


def test_no_forward_exceeds_the_token_budget(one_and_two_processes):
    """--micro-batch-tokens bounds every forward pass of every file outside generation (old,
    reference and PRM log-probs, selection passes, DPH-RL's pre-pass included), counted with the
    padding each pass really holds."""
    _, widths, _ = one_and_two_processes
    budget = int(EQUIVALENCE_FLAGS[EQUIVALENCE_FLAGS.index("--micro-batch-tokens") + 1])
    for processes, by_script in widths.items():
        assert sorted(by_script) == [f"algorithms/{name}.py" for name in ALGORITHMS]
        assert all(budget // 2 < width <= budget
                   for width in by_script.values()), (processes, by_script)


def test_fsdp_with_token_budget_and_static_cache_follows_ddp(tmp_path):
    """FSDP2 shards the same computation DDP replicates: with the same seeds both runs sample the
    same responses, so their metrics agree (up to the float rounding of trimmed, differently reduced
    computations)."""
    runs = {}
    for variant, flags in {"ddp": [], "fsdp": ["--fsdp", "--micro-batch-tokens", "64",
                                               "--rollout", "static"]}.items():
        proc = torchrun(["algorithms/grpo.py", *FLAGS, "--output-dir", str(tmp_path / variant),
                         *flags])
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
                                          # torchrun and both workers
                                          lambda: os.killpg(victim.pid, signal.SIGKILL))
    assert records(run_dir)[-1]["step"] < 4
    resumed = torchrun(["algorithms/grpo.py", "--resume", str(run_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)

    one = subprocess.run([sys.executable, "algorithms/grpo.py", "--resume", str(run_dir)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert (one.returncode != 0 and "written by 2 process(es)" in one.stderr
            and "Traceback" not in one.stderr)
    shutil.rmtree(tmp_path)


# torch.distributed.checkpoint: its index, a file per rank
SHARD_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tmp_path):
    """Under --fsdp every process writes its own shard of the policy and AdamW state and reads it
    back: a run killed after its first checkpoint and resumed ends with the uninterrupted run's
    records. --save-model gathers the shards into a bf16 from_pretrained folder with the base
    model's generation_config."""
    base = base_with_sampling_defaults(tmp_path / "base")
    flags = ["algorithms/grpo.py", *FLAGS, "--fsdp", "--model-name", str(base)]
    full = torchrun([*flags, "--output-dir", str(tmp_path / "full"), "--save-model", "--save-dtype",
                     "bfloat16"])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    victim = torchrun([*flags, "--output-dir", str(tmp_path / "killed")])
    run_dir = kill_after_first_checkpoint(victim, tmp_path / "killed",
                                          lambda: os.killpg(victim.pid, signal.SIGKILL))
    assert records(run_dir)[-1]["step"] < 4
    resumed = torchrun(["algorithms/grpo.py", "--resume", str(run_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    (full_dir,) = (tmp_path / "full").iterdir()
    assert records(run_dir) == records(full_dir)

    # the last checkpoint's shards only; checkpoint.pt keeps no weights
    for folder in (full_dir, run_dir):
        assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-4"]
        assert sorted(p.name for p in (folder / "checkpoint-4").iterdir()) == SHARD_FILES
        assert "policy" not in torch.load(folder / "checkpoint.pt", weights_only=False)
    weights_bytes = sum(p.numel() * 4
                        for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    # each process wrote half of the weights and of AdamW's two moments
    for shard in SHARD_FILES[1:]:
        assert (run_dir / "checkpoint-4" / shard).stat().st_size > 0.4 * 3 * weights_bytes

    saved = AutoModelForCausalLM.from_pretrained(full_dir / "model")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    assert json.loads((full_dir / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (GenerationConfig.from_pretrained(full_dir / "model").to_dict()
            == GenerationConfig.from_pretrained(base).to_dict())


def crash_in_a_sharded_save(run_dir: str):
    """An FSDP policy checkpointed at step 1, trained a step more, then a save at step 2 that dies
    in its commit (rank 0 killed just before it renames checkpoint.pt), its shard folder then cut
    short. Returns (restored step, full state after step 1, full state restored, files after the
    crash, files after the next save, the error for a missing shard); the full states are rank
    0's."""
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
    # AdamW's step counters change in place
    after_step_1 = copy.deepcopy(common.full_state_dicts(policy, optimizer))
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
            # as if the kill had come while the shards were written
            shard.write_bytes(shard.read_bytes()[:100])
    torch.distributed.barrier()
    after_crash = sorted(p.name for p in Path(run_dir).iterdir())

    fresh = common.data_parallel(common.load_model_and_tokenizer(common.EMBEDDED_MODEL)[0],
                                 fsdp=True)
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
    (step, (model_sd, optim_sd), (restored_sd, restored_optim_sd), after_crash, after_save,
     error), second = \
        run_distributed(crash_in_a_sharded_save, str(tmp_path))
    assert (step == 1
            and after_crash == ["checkpoint-1", "checkpoint-2", "checkpoint.pt", "checkpoint.tmp"])
    torch.testing.assert_close(restored_sd, model_sd, rtol=0, atol=0)
    torch.testing.assert_close(restored_optim_sd["state"], optim_sd["state"], rtol=0, atol=0)
    assert len(optim_sd["state"]) > 10
    assert after_save == ["checkpoint-2", "checkpoint.pt"]
    assert (error.startswith("checkpoint ") and "corrupt or incomplete" in error
            and "\n" not in error)
    assert second[-1] == error  # every process stops with the same message
