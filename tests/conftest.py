"""Shared test set-up: offline flags before anything imports transformers/wandb, repository root on
sys.path, loaders for the algorithm scripts (they are scripts, not a package), and the quick tier's
guard: a test not marked `slow` may start no process."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import common  # noqa: E402


ALGORITHMS = sorted(p.stem for p in (REPO_ROOT / "algorithms").glob("*.py"))
# algorithm -> flags a short run needs (a smaller set-up pass, a non-empty rehearsal set)
SETUP_FLAGS = {
    "dph_rl": ["--pool-prompts", "16", "--presample-k", "4", "--rehearsal-threshold", "1"],
}
# for `sample_batch`'s 2 prompts x 4 responses
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
TIMING = ("time/", "charts/tokens_per_sec")


def records(run_dir: Path) -> list[dict]:
    """A run folder's metrics.jsonl without the timing metrics (which no two runs share)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def kill_after_first_checkpoint(proc: subprocess.Popen, out_dir: Path, kill) -> Path:
    """Wait until the run writing under `out_dir` has saved its first checkpoint, call `kill()`
    wherever the run then is, and return its run folder."""
    deadline = time.time() + 600
    while (time.time() < deadline and not list(out_dir.glob("*/checkpoint.pt"))
           and proc.poll() is None):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill()
    proc.wait()
    (run_dir,) = out_dir.iterdir()
    return run_dir


def base_with_sampling_defaults(folder: Path) -> Path:
    """A copy of the embedded model whose generation_config carries sampling defaults,
    as hub models' often do."""
    shutil.copytree(REPO_ROOT / common.EMBEDDED_MODEL, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 0,
                                                               "top_k": 20,
                                                               "top_p": 0.8, "temperature": 0.7,
                                                               "do_sample": True}))
    return folder


# the running test unless it is marked slow: the quick tier (-m "not slow") starts no process
QUICK_TEST = {"id": None}


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, which may start processes too
def pytest_runtest_setup(item):
    QUICK_TEST["id"] = None if item.get_closest_marker("slow") else item.nodeid


def refuse_in_the_quick_tier() -> None:
    assert QUICK_TEST["id"] is None, (
        f"{QUICK_TEST['id']} starts a process: mark it @pytest.mark.slow")


def run_python(args: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `python *args` (a script and its flags) with the offline settings above; the timeout is a
    hang guard, not a speed test (the machine may be shared)."""
    refuse_in_the_quick_tier()
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    """Start `torchrun --standalone --nproc-per-node 2 *args` (a free port), one thread per process,
    in its own session (so that a test can kill torchrun and both workers at once)."""
    refuse_in_the_quick_tier()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def run_on_fixed_rollouts(runs: list[list[str]], processes: int, widths: Path) -> str:
    """Run algorithm scripts (each `[script, *flags]`) one after the other in one process, or in 2
    under torchrun, on rollouts that do not depend on the processes (tests/fixed_rollouts.py), which
    writes {script: widest forward pass} to `widths`; returns the standard output."""
    args = ["tests/fixed_rollouts.py", str(widths), *runs[0]]
    for run in runs[1:]:
        args += ["::", *run]
    if processes == 2:
        proc = torchrun(args)
    else:
        refuse_in_the_quick_tier()
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    return out


def assert_same_run(one: Path, two: Path) -> None:
    """Two run folders (one process's and two processes') hold the same records, timing aside, and
    the same saved model: the weights moved, and by the same update up to float rounding."""
    assert [row["step"] for row in records(two)] == [row["step"] for row in records(one)]
    for expected, got in zip(records(one), records(two), strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6,
                                             nan_ok=True), (key, got[key], expected[key])
    initial = load_file(REPO_ROOT / common.EMBEDDED_MODEL / "model.safetensors")
    one_params, two_params = (load_file(folder / "model" / "model.safetensors")
                              for folder in (one, two))
    moved = sum(((one_params[k] - initial[k]) ** 2).sum() for k in initial).sqrt()
    apart = sum(((two_params[k] - one_params[k]) ** 2).sum() for k in initial).sqrt()
    assert moved > 0.01 and apart < 1e-3 * moved, (float(apart), float(moved))


def load_algorithm(name: str):
    """Import `algorithms/<name>.py` as a module (its `__main__` block does not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def embedded():
    """The committed tiny base model and its tokenizer, loaded the way every user loads them."""
    return common.load_model_and_tokenizer(common.EMBEDDED_MODEL)


@pytest.fixture
def random_model(embedded):
    """A freshly initialised 1-layer model over the embedded tokenizer's vocabulary (seeded)."""
    _, tokenizer = embedded
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sample_batch(model, tokenizer):
    """A seeded rollout of 2 prompts x 4 responses: (rollout, response mask as float (8, T), T)."""
    torch.manual_seed(0)
    ro = common.rollout(model, tokenizer, ["17 13 5>6:", "3 5 7>22:"], group_size=4,
                        sampling=common.Sampling(24))
    return ro, ro.response_mask.float(), ro.response_ids.shape[1]


def run_distributed(fn, *args, world_size: int = 2) -> list:
    """Run `fn(*args)` in `world_size` processes joined in a gloo process group on this machine
    (what torchrun sets up, through `common.init_distributed`); returns each rank's result, in rank
    order. `fn` must be a module-level function of a test file."""
    refuse_in_the_quick_tier()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_distributed_entry, args=(world_size, port, fn, args, out),
                                    nprocs=world_size)
        return [torch.load(Path(out) / f"{rank}.pt", weights_only=False)
                for rank in range(world_size)]


def _distributed_entry(rank, world_size, port, fn, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    common.init_distributed(use_cuda=False)
    result = fn(*args)
    torch.save(result, Path(out) / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def scored_batch(model, tokenizer, grpo_advantages):
    """`sample_batch` scored with REWARDS and a file's `grpo_advantages` (std-scaled): (rollout,
    mask, T, token advantages (B, T), the sampling policy's log-probs (B, T))."""
    ro, mask, T = sample_batch(model, tokenizer)
    adv, _ = grpo_advantages(REWARDS, ro.prompt_index, True)
    with torch.no_grad():
        old_logp = common.response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
    return ro, mask, T, adv[:, None] * mask, old_logp


def process_share():
    """For functions run by `run_distributed`: the embedded model, a seeded global batch of 2
    prompts x 4 responses (the same in every process, see `sample_batch`) and this process's share
    of its rows (whole groups), as `(model, rollout, T, share)`; `share` holds the rows'
    `input_ids`, `attention_mask`, `mask` (float), `widths` and `prompt_index` (counted from 0 in
    this process). In a single process the share is the whole batch."""
    model, tokenizer = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)
    ro, mask, T = sample_batch(model, tokenizer)
    rows = torch.arange(len(mask)).chunk(common.world_size())[common.rank()]
    share = SimpleNamespace(rows=rows, input_ids=ro.input_ids[rows],
                            attention_mask=ro.attention_mask[rows],
                            mask=mask[rows], widths=ro.widths[rows],
                            prompt_index=ro.prompt_index[rows] - ro.prompt_index[rows].min())
    return model, ro, T, share


def step_and_report(optimizer, policy, loss: float) -> tuple[float, dict]:
    """End of a one-step update in `run_distributed`: take the step; return (this process's summed
    loss reduced over the processes, the full parameters after the step)."""
    optimizer.step()
    params, _ = common.full_state_dicts(policy)
    return common.reduce_metrics({"loss": loss})["loss"], params


def assert_two_processes_match_one(cases: list, one: list, first: list, second: list) -> None:
    """Per case, `(part, loss, params)` from one process on the whole batch (`one`) and from each of
    two processes on its halves (`first`, `second`): the halves' parts (advantages, rewards, ...)
    join into the whole's, and the reduced loss and the parameters after the step are the same."""
    initial = common.load_model_and_tokenizer(common.EMBEDDED_MODEL)[0].state_dict()
    for case, (one_part, one_loss, one_params), (part0, loss, params), (part1, _, _) in zip(
            cases, one, first, second, strict=True):
        torch.testing.assert_close(torch.cat([part0, part1]), one_part,
                                   msg=lambda m: f"{case}: {m}")
        assert (one_loss != 0
                and abs(loss - one_loss) <= 1e-7 + 1e-5 * abs(one_loss)), (case, loss, one_loss)
        assert_same_update(params, one_params, initial)


def assert_same_update(params: dict, expected: dict, initial: dict, rtol: float = 1e-4,
                       atol: float = 1e-6) -> None:
    """Parameters after a step equal the expected ones, and the step moved the weights (so equal
    parameters mean equal gradients). `atol` is relative to the largest change of each tensor (at
    least 1): with SGD at lr 1 a change is the gradient itself, up to ~40 on the embedded model, and
    fp32 sums taken in another order (a trimmed micro-batch, another split of the rows) differ by
    ~1e-7 of it."""
    for name, value in expected.items():
        scale = max(1.0, (value - initial[name]).abs().max().item())
        torch.testing.assert_close(params[name], value, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name}: {m}")
    assert sum(not torch.equal(value, initial[name]) for name, value in expected.items()) > 10


@torch.no_grad()
def move_off_policy(model, scale: float = 0.02) -> None:
    """Add seeded noise to every weight, so that ratios to the sampling policy are not all 1."""
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator).to(p.device))
