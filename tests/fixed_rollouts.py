"""Run algorithm scripts on rollouts that do not depend on the number of processes, so that a run
with N processes can be compared with a run with one, and record the widest forward pass each script
makes outside generation.

    python tests/fixed_rollouts.py OUT.json algorithms/grpo.py --flags ... \
        [:: algorithms/prime.py --flags ...]

(also under `torchrun`). Each script runs as `__main__` in this interpreter, one after the
other, with
- `common.rollout` replaced: every prompt gets responses drawn from a generator seeded by the
  prompt's text alone (random tokens, random lengths, some truncated), whatever process samples it
  and whatever else is in the batch;
- every task's `verify` replaced: a response is correct when a hash of its prompt and text says so,
  and every response to a third of the prompts is (so that DPH-RL has a rehearsal set and PRIME
  mixed groups);
- a forward pre-hook on every loaded model recording rows x columns of each forward pass outside
  generation.
Rank 0 writes `{script: widest forward}` to OUT.json. Under torchrun the scripts share one process
group."""

import hashlib
import json
import os
import runpy
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def fixed_rollout(model, tokenizer, prompts, group_size, sampling, greedy=False) -> common.Rollout:
    """Responses drawn from the prompt's text alone:
    up to max_new_tokens random tokens, ended by EOS unless truncated."""
    max_new_tokens = sampling.max_new_tokens
    eos = common.eos_ids(common.unwrap(model))[0]
    device = next(common.unwrap(model).parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    responses = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        for _ in range(group_size):
            length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=generator))
            tokens = torch.randint(3, len(tokenizer), (length,), generator=generator)
            tokens[tokens == eos] = 3
            if length < max_new_tokens:
                tokens[-1] = eos
            responses.append(tokens)
    T = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), T), eos, dtype=torch.long)
    for row, tokens in enumerate(responses):
        response_ids[row, : len(tokens)] = tokens
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0)
    response_mask = common.response_mask_from_ids(response_ids, [eos])
    truncated = torch.tensor([len(r) == max_new_tokens and r[-1] != eos for r in responses])
    texts = tokenizer.batch_decode(response_ids * response_mask + (1 - response_mask) * eos,
                                   skip_special_tokens=True)
    # distinct in a group: the hash varies
    texts = [f"{text}#{row % group_size}" for row, text in enumerate(texts)]
    ro = common.Rollout(torch.cat([prompt_ids, response_ids], 1),
                        torch.cat([prompt_mask, torch.ones_like(response_ids)], 1), response_ids,
                        response_mask, torch.arange(len(prompts)).repeat_interleave(group_size),
                        truncated, texts, prompt_ids.shape[1])
    for field in ("input_ids", "attention_mask", "response_ids", "response_mask", "prompt_index",
                  "truncated"):
        setattr(ro, field, getattr(ro, field).to(device))
    return ro


def fixed_verify(item, response) -> tuple[bool, bool]:
    prompt, text = (hashlib.sha256(s.encode()).digest()[0]
                    for s in (json.dumps(item, sort_keys=True), response))
    return prompt % 3 == 0 or (prompt + text) % 2 == 0, True


widest = {"": 0}


def record_width(module, args, kwargs):
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    # response_logprobs; generation uses the cache
    if kwargs.get("use_cache") is False and input_ids is not None:
        widest[""] = max(widest[""], input_ids.numel())


def load_with_hook(*args, **kwargs):
    model, tokenizer = real_load(*args, **kwargs)
    model.register_forward_pre_hook(record_width, with_kwargs=True)
    return model, tokenizer


def get_task(*args, **kwargs):
    task = real_get_task(*args, **kwargs)
    object.__setattr__(task, "verify", fixed_verify)  # tasks are frozen dataclasses
    return task


real_load, real_get_task = common.load_model_and_tokenizer, common.get_task
common.rollout, common.load_model_and_tokenizer, common.get_task = (
    fixed_rollout, load_with_hook, get_task)

if __name__ == "__main__":
    # under torchrun the scripts share one process group:
    # each one's leaving it at its end waits for the others only
    leave = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = lambda *args, **kwargs: torch.distributed.barrier()
    out, runs, results = sys.argv[1], " ".join(sys.argv[2:]).split(" :: "), {}
    for run in runs:
        script, *flags = run.split()
        widest[""] = 0
        sys.argv = [script, *flags]
        runpy.run_path(script, run_name="__main__")
        results[script] = widest[""]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        leave()
