"""Shared, algorithm-free pieces of every script in `algorithms/` (advantages and losses stay
there).

Read top to bottom in the order a script uses them: model loading, rollout, log-probs and entropy,
evaluation, tasks and verifiers; then, under one closing banner, the run infrastructure (errors,
flag checks, processes, checkpoints, logging) that a trainer of your own would replace. Conventions
every file relies on: group statistics go by prompt index, never position; the mask covers tokens up
to and including the first EOS (pad may equal EOS); log-probs come from temperature-scaled fp32
logits, old_logp once per rollout (no_grad).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = "benchmarks/tiny-countdown"  # built by benchmarks/make_tiny_base.py


class UserInputError(Exception):
    """A problem with what the user asked for (flag, path, dataset): one line, no traceback."""


class TrainingStopped(Exception):
    """The run cannot go on (e.g. non-finite losses step after step): one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """A local folder (relative to the working directory, then to the repository), else a hub id."""
    for candidate in (Path(name).expanduser(), REPO_ROOT / name):
        if candidate.is_dir():
            return str(candidate)
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name):
        raise UserInputError(f"model folder not found: {name}")
    return name


def load_model_and_tokenizer(name: str, device: torch.device | str = "cpu", bf16: bool = False,
                             gradient_checkpointing: bool = False, frozen: bool = False):
    """A causal LM and its tokenizer (padding on the left for batched generation, EOS as pad).

    The model's generation_config is replaced by one with only its special-token ids, so sampling is
    set by our flags alone (hub configs often carry top_k / top_p defaults that would change the
    policy); the original stays in `model.base_generation_config` for `save_pretrained`. Dropout is
    off. Precision: with `bf16` on a GPU a model to train keeps fp32 weights (AdamW updates of ~1e-6
    vanish in bf16) and computes under bf16 autocast; a `frozen` model is stored in bf16. The CPU
    stays fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no progress bars in run logs
    path = resolve_model_path(name)
    low_precision = bf16 and torch.device(device).type == "cuda"
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise UserInputError(f"model folder {name!r} has no config.json: not a saved model")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # missing files, offline hub, unknown model type, ...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc)
        hint = " (offline: pass a local path)" if offline and not local else ""
        raise UserInputError(f"could not load model {name!r}{hint}: {_first_line(exc)}") from None
    architectures = config.architectures or []
    causal = all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.is_encoder_decoder or not causal:
        raise UserInputError(f"model {name!r} is not a causal (decoder-only) language model: "
                             f"{', '.join(architectures) or config.model_type}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        usable = len(tokenizer("1 + 2 = 3", add_special_tokens=False).input_ids) > 0
    except Exception as exc:  # no tokenizer files: converting a slow tokenizer fails
        no_files = not any(Path(path).glob("tokenizer*")) and not any(Path(path).glob("*.model"))
        why = _first_line(exc)
        if local and no_files:
            why = "the folder has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)"
        raise UserInputError(f"model {name!r} has no usable tokenizer: {why}") from None
    if not usable:
        raise UserInputError(f"model {name!r} has no usable tokenizer: it encodes text to no "
                             "tokens")
    dtype = torch.bfloat16 if low_precision and frozen else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # truncated or missing weights, a config the class rejects
        why = _first_line(exc)
        raise UserInputError(f"could not read the weights of model {name!r}: {why}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserInputError(f"model {name!r}: its tokenizer has {len(tokenizer)} tokens but the "
                             f"model's embedding only {rows} rows (vocab_size); the tokenizer does "
                             "not belong to these weights")
    disable_dropout(model)
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise UserInputError(f"model {name!r} has no end-of-sequence token (eos_token_id in its "
                             "generation_config.json, config.json or tokenizer): responses could "
                             "never end")
    if tokenizer.pad_token_id is None:  # pad with EOS: the response mask ends at the first EOS
        first_eos = eos[0] if isinstance(eos, list) else eos
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(first_eos)
    model.base_generation_config = model.generation_config
    bos = model.generation_config.bos_token_id
    pad = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos)
    model.autocast_dtype = torch.bfloat16 if low_precision and not frozen else None  # autocast()
    if gradient_checkpointing and not frozen:  # recompute activations: less memory, ~1/3 more time
        kwargs = {"use_reentrant": False}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model.to(device), tokenizer


def position_limit(model) -> int | None:
    """The longest prompt + response the model's config allows, or None when it states no limit."""
    config = unwrap(model).config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def disable_dropout(model) -> None:
    """Dropout off (as TRL does): with it, two passes over the same tokens give different log-probs,
    so the first, on-policy mini-batch would not have ratio 1. Covers `nn.Dropout` and the float
    rates attention implementations read at forward time (module attributes and the config)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(model.config, key, 0.0)


def autocast(model):
    """The autocast context for a forward pass (a no-op unless loaded with bf16 on a GPU)."""
    dtype = getattr(unwrap(model), "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """B = n_prompts * G responses. Response token t of row b is `input_ids[b, prompt_len + t]`."""

    input_ids: torch.Tensor  # (B, P + T) left-padded prompt ⊕ response
    attention_mask: torch.Tensor  # (B, P + T)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    prompt_index: torch.Tensor  # (B,) index into the list of prompts this response answers
    truncated: torch.Tensor  # (B,) bool, no EOS within max_new_tokens
    texts: list[str]  # decoded responses (special tokens removed)
    prompt_len: int

    @property
    def widths(self) -> torch.Tensor:
        """(B, 2) real tokens per row: the prompt without padding, the response to its first EOS."""
        prompt = self.attention_mask[:, : self.prompt_len].sum(-1)
        return torch.stack([prompt, self.response_mask.sum(-1)], -1)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after; correct when pad == eos."""
    eos = torch.tensor(eos_token_ids, device=response_ids.device, dtype=torch.long)
    is_eos = torch.isin(response_ids, eos).long()
    return ((torch.cumsum(is_eos, dim=-1) - is_eos) == 0).long()


ROLLOUT_BACKENDS = ("generate", "static", "continuous")


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled, built once from the flags and passed to `rollout`, `evaluate` and
    any pre-pass. top_p 1 and top_k 0 are off; `backend` is one of ROLLOUT_BACKENDS."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    backend: str = "generate"

    @classmethod
    def from_args(cls, args) -> "Sampling":
        return cls(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.rollout)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], group_size: int, sampling: Sampling,
            greedy: bool = False) -> Rollout:
    """Sample `group_size` responses per prompt, in one batch. Backends (same outputs and sampling):
    - `generate`: HF `generate` with its dynamic KV cache;
    - `static`: a preallocated static KV cache, with which transformers compiles the decoding step
      on a GPU (prompts are padded to a multiple of 64 tokens, so that few shapes are compiled);
    - `continuous`: continuous batching (`generate_batch`, paged attention): finished sequences
      leave the batch and the G responses to a prompt share its prefix's cache blocks. With bf16 on
      a GPU, `static` and `continuous` decode in a bf16 copy of the fp32 policy (their caches hold
      one dtype); `generate` runs under autocast. Under FSDP every process keeps stepping until all
      are done (`synced_gpus`), since each forward is collective."""
    max_new_tokens, temperature = sampling.max_new_tokens, sampling.temperature
    backend = sampling.backend
    if not greedy and not temperature > 0:
        raise UserInputError(f"the sampling temperature must be > 0, got {temperature}")
    if backend not in ROLLOUT_BACKENDS:
        raise UserInputError(f"unknown rollout backend {backend!r}; "
                             f"choose one of: {', '.join(ROLLOUT_BACKENDS)}")
    if backend == "continuous" and is_fsdp(model):
        raise UserInputError("--rollout continuous does not run on FSDP-sharded weights; "
                             "use generate or static")
    policy = unwrap(model)
    device = next(policy.parameters()).device
    pad_to = 64 if backend == "static" else None  # a compiled step recompiles for each length
    enc = tokenizer(prompts, return_tensors="pt", padding=True, pad_to_multiple_of=pad_to,
                    add_special_tokens=False).to(device)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0)  # (B, P)
    prompt_attn = enc["attention_mask"].repeat_interleave(group_size, dim=0)
    knobs = dict(temperature=temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    knobs = {} if greedy else knobs
    eos = eos_ids(policy)
    low_precision = backend != "generate" and not is_fsdp(model)
    generator = _low_precision_copy(policy) if low_precision else policy
    was_training = policy.training
    policy.eval()
    with autocast(generator):
        if backend == "continuous":
            response_ids = _continuous_batching(generator, enc, group_size, max_new_tokens, greedy,
                                                knobs, tokenizer.pad_token_id)
        else:
            extra = {"cache_implementation": "static"} if backend == "static" else {}
            out = generator.generate(input_ids=prompt_ids, attention_mask=prompt_attn,
                                     max_new_tokens=max_new_tokens, do_sample=not greedy,
                                     use_cache=True, synced_gpus=is_fsdp(model), **extra, **knobs)
            response_ids = out[:, prompt_ids.shape[1]:]  # (B, T)
    policy.train(was_training)
    P = prompt_ids.shape[1]
    out = torch.cat([prompt_ids, response_ids], dim=1)
    response_mask = response_mask_from_ids(response_ids, eos)
    truncated = ~torch.isin(response_ids, torch.tensor(eos, device=device)).any(dim=-1)
    kept_ids = response_ids * response_mask + (1 - response_mask) * tokenizer.pad_token_id
    texts = tokenizer.batch_decode(kept_ids, skip_special_tokens=True)
    attention_mask = torch.cat([prompt_attn, torch.ones_like(response_ids)], dim=1)
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    return Rollout(out, attention_mask, response_ids, response_mask, prompt_index, truncated, texts,
                   P)


_LOW_PRECISION_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _low_precision_copy(model):
    """A bf16 copy holding an fp32 model's current weights (made once, refreshed on every call), for
    caches that hold one dtype: under autocast values are bf16 but rotary keys fp32; continuous
    batching also decodes in a worker thread that autocast does not reach. The model itself without
    autocast (the CPU). Buffers keep their dtype: RoPE's `inv_freq` in bf16 would shift the angles
    by ~0.1 rad at position 500, and sampling would drift off-policy on long responses."""
    dtype = getattr(model, "autocast_dtype", None)
    if dtype is None:
        return model
    if model not in _LOW_PRECISION_COPIES:
        shadow = copy.deepcopy(model).eval().requires_grad_(False)
        for param in shadow.parameters():
            param.data = param.data.to(dtype)
        _LOW_PRECISION_COPIES[model] = shadow
    shadow = _LOW_PRECISION_COPIES[model]
    for target, source in zip(shadow.parameters(), model.parameters(), strict=True):
        target.copy_(source)
    return shadow


# continuous batching logs two lines about psutil (absent: CPU memory accounting only) on every call
logging.getLogger("ContinuousBatchingLogger").addFilter(lambda r: "psutil" not in r.getMessage())


def _continuous_batching(model, enc, group_size: int, max_new_tokens: int, greedy: bool,
                         sampling: dict, pad_id: int) -> torch.Tensor:
    """(n_prompts * G, T) responses from `generate_batch`, right-padded with `pad_id`; row i * G + j
    is the j-th response to prompt i, as with `generate`."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    masks = enc["attention_mask"].bool()
    prompts = [ids[mask].tolist() for ids, mask in zip(enc["input_ids"], masks)]
    forks = 1 if greedy else group_size  # sampled responses fork from their prompt's request
    requests = [p for p in prompts for _ in range(group_size // forks)]
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens,
                              num_return_sequences=forks, pad_token_id=pad_id,
                              eos_token_id=model.generation_config.eos_token_id, **sampling)
    page = 256  # tokens per cache block; the cache fits this rollout (default: 90% of memory)
    pages_per_row = math.ceil((enc["input_ids"].shape[1] + max_new_tokens) / page)
    cb_config = ContinuousBatchingConfig(page_size=page,
                                         num_blocks=len(prompts) * group_size * pages_per_row + 1)
    results = model.generate_batch(requests, generation_config=config,
                                   continuous_batching_config=cb_config)
    outputs = list(results.values())  # ordered by prompt, a prompt's G responses next to each other
    if len(outputs) != len(prompts) * group_size or any(o.error is not None for o in outputs):
        raise RuntimeError("continuous batching lost or failed requests; rerun with --rollout "
                           "generate")
    T = max(1, max(len(o.generated_tokens) for o in outputs))
    response_ids = torch.full((len(outputs), T), pad_id, dtype=torch.long)
    for row, output in enumerate(outputs):
        tokens = output.generated_tokens[:max_new_tokens]
        response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return response_ids.to(enc["input_ids"].device)


# --------------------------------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """Per-response-token statistics, each (B, T); the optional ones are None unless requested."""

    logp: torch.Tensor  # log-prob of the sampled token
    entropy: torch.Tensor | None = None  # full-vocabulary entropy of the next-token distribution
    vocab_mean: torch.Tensor | None = None  # vocabulary mean of log p (ROVER's uniform policy)


LOGITS_CHUNK = 2**24  # fp32 logits at once in _LogitStats (64 MB, ~110 rows of a 152k vocabulary)


def _logit_chunk(logits: torch.Tensor) -> int:
    """Rows per chunk: at most LOGITS_CHUNK logits and 1/16 of the rows (small temporaries)."""
    return max(1, min(LOGITS_CHUNK // logits.shape[1], logits.shape[0] // 16))


class _LogitStats(torch.autograd.Function):
    """From (n, V) logits x and taken tokens y (n,), with z = x / temperature: log p(y) = z_y -
    logsumexp(z), the entropy H = logsumexp(z) - sum_v p_v z_v and the vocabulary mean of log p.
    Rows go through fp32 in chunks, so no fp32 copy of the logits exists. The backward recomputes
    softmax chunk by chunk, d log p(y)/dz = onehot(y) - p and dH/dz = -p (log p + H), and writes the
    gradient over the saved logits (read by nothing else): one (n, V) tensor is alive in either
    pass."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, with_entropy: bool):
        n = logits.shape[0]
        logp, entropy, vocab_mean = (logits.new_zeros(n, dtype=torch.float32) for _ in range(3))
        chunk = _logit_chunk(logits)
        for s in range(0, n, chunk):
            z = logits[s:s + chunk].float() / temperature
            lse = z.logsumexp(-1)
            logp[s:s + chunk] = z.gather(-1, tokens[s:s + chunk, None]).squeeze(-1) - lse
            vocab_mean[s:s + chunk] = z.mean(-1) - lse
            if with_entropy:
                entropy[s:s + chunk] = lse - (torch.softmax(z, -1) * z).sum(-1)
        ctx.save_for_backward(logits, tokens, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an output nothing uses gets None: its term is skipped
        ctx.mark_non_differentiable(vocab_mean)
        return logp, entropy, vocab_mean

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _):
        logits, tokens, entropy = ctx.saved_tensors
        chunk = _logit_chunk(logits)
        for s in range(0, logits.shape[0], chunk):
            log_p = torch.log_softmax(logits[s:s + chunk].float() / ctx.temperature, -1)
            p = log_p.exp()
            grad = torch.zeros_like(p)
            if grad_logp is not None:
                g = grad_logp[s:s + chunk, None]
                grad.scatter_(-1, tokens[s:s + chunk, None], g).sub_(p * g)
            if grad_entropy is not None:
                h, g = entropy[s:s + chunk, None], grad_entropy[s:s + chunk, None]
                grad.sub_(log_p.add_(h).mul_(p).mul_(g))
            logits[s:s + chunk] = grad.div_(ctx.temperature)
        return logits, None, None, None


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = False, with_vocab_mean: bool = False,
                      micro_batch_size: int | None = None,
                      micro_batch_tokens: int = 0) -> TokenStats:
    """Statistics of every response token from temperature-scaled fp32 logits (`_LogitStats`).

    `input_ids` is (B, P + T), the last T = `response_len` positions the response; the logits that
    predict response token t sit at position P - 1 + t. Rows go through the model in `micro_batches`
    of at most `micro_batch_size` rows and, with `micro_batch_tokens`, that many tokens. Columns
    that are padding in every row of a micro-batch are cut before the forward pass (a causal model
    never looks right, so the values are the same up to rounding). Gradients flow to `logp` when
    grad is enabled; to the entropy only with `entropy_grad`; never to `vocab_mean` (used only
    inside stop-gradient targets). Positions after a row's first EOS are 0 in every statistic, so
    ratios exp(logp - old_logp) there are 1 and never overflow."""
    config = getattr(unwrap(model), "generation_config", None)
    has_eos = getattr(config, "eos_token_id", None) is not None
    eos = eos_ids(unwrap(model)) if has_eos else []
    valid = response_mask_from_ids(input_ids[:, -response_len:], eos).bool()  # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    widths = torch.stack([attention_mask[:, :-response_len].sum(-1), valid.sum(-1)], -1)  # (B, 2)
    B, width = input_ids.shape
    stats = [input_ids.new_zeros(B, response_len, dtype=torch.float32) for _ in range(3)]
    collective = model is not unwrap(model) or is_fsdp(model)  # DDP, FSDP: as many forwards
    all_rows = torch.arange(B, device=input_ids.device)
    for rows in micro_batches(all_rows, widths, micro_batch_size or B, micro_batch_tokens,
                              even=collective):
        first = width - response_len - int(widths[rows, 0].max())  # columns first .. P + T
        T = max(1, int(widths[rows, 1].max()))
        end = width - response_len + T
        with autocast(model):
            logits = model(input_ids=input_ids[rows, first:end],
                           attention_mask=attention_mask[rows, first:end],
                           position_ids=position_ids[rows, first:end], logits_to_keep=T + 1,
                           use_cache=False).logits  # (b, T + 1, V); the last is past the window
        tokens = torch.nn.functional.pad(input_ids[rows, end - T:end], (0, 1))  # (b, T + 1)
        logp, entropy, vocab_mean = _LogitStats.apply(logits.flatten(0, 1), tokens.flatten(),
                                                      temperature, with_entropy)
        if not entropy_grad:
            entropy = entropy.detach()
        for stat, values in zip(stats, (logp, entropy, vocab_mean)):
            values = values.view(len(rows), T + 1)[:, :-1]  # (b, T)
            values = torch.nn.functional.pad(values, (0, response_len - T))
            stat[rows] = torch.where(valid[rows], values, 0.0)
        del logits
    logp, entropy, vocab_mean = stats
    return TokenStats(logp, entropy if with_entropy else None,
                      vocab_mean if with_vocab_mean else None)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_processes: bool = False) -> torch.Tensor:
    """Mean of x where mask is 1; with `all_processes`, over every process's positions together."""
    total, count = (x * mask).sum(), mask.sum()
    if all_processes:
        total, count = all_sum(total), all_sum(count)
    return total / count.clamp(min=1)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples, c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


PROGRESS_SECONDS = 10.0  # evaluations print a progress line (rank 0) at most this often
_LAST_PROGRESS = [0.0]


def _progress(what: str, done: int, total: int, began: float) -> None:
    now = time.time()
    if is_main() and now - _LAST_PROGRESS[0] >= PROGRESS_SECONDS:
        _LAST_PROGRESS[0] = now
        print(f"{what}: {done}/{total} prompts ({now - began:.0f} s)", flush=True)


def evaluate(model, tokenizer, task, items: list[dict], n_samples: int, sampling: Sampling,
             batch_size: int = 1024) -> dict:
    """Greedy accuracy and, for `n_samples` > 0, with n samples per prompt drawn with `sampling`:
    mean@n, unbiased pass@k for powers of two k <= n, and distinct correct answers per prompt.

    An item may name its `subset` (countdown: one_solution, several_solutions, and second_skill for
    a skill the run does not train): each subset gets the metrics under `eval/<subset>/`, and
    second_skill items count only there. Under torchrun every process evaluates its share of the
    prompts and all return the same metrics."""
    mine, n_mine, _ = padded_share(items)
    prompts = [task.prompt(item) for item in mine]
    greedy_correct, began = [], time.time()
    for start in range(0, len(mine), batch_size):
        ro = rollout(model, tokenizer, prompts[start:start + batch_size], 1, sampling, greedy=True)
        batch = mine[start:start + batch_size]
        greedy_correct += [task.verify(item, text)[0] for item, text in zip(batch, ro.texts)]
        _progress("evaluating, greedy", len(greedy_correct), len(mine), began)
    greedy_correct = gather_lists(greedy_correct[:n_mine])
    correct_counts, distinct = [], []
    per_prompt = max(1, batch_size // max(1, n_samples))
    for start in range(0, len(mine) if n_samples else 0, per_prompt):
        chunk = mine[start:start + per_prompt]
        ro = rollout(model, tokenizer, prompts[start:start + per_prompt], n_samples, sampling)
        for i, item in enumerate(chunk):
            texts = ro.texts[i * n_samples:(i + 1) * n_samples]
            correct = [text for text in texts if task.verify(item, text)[0]]
            correct_counts.append(len(correct))
            distinct.append(len({task.answer_key(text) for text in correct}))
        _progress(f"evaluating, {n_samples} samples each", len(correct_counts), len(mine), began)
    correct_counts = gather_lists(correct_counts[:n_mine])
    distinct = gather_lists(distinct[:n_mine])

    subsets = {"": [i for i, item in enumerate(items) if item.get("subset") != "second_skill"]}
    for name in dict.fromkeys(item["subset"] for item in items if item.get("subset")):
        subsets[name] = [i for i, item in enumerate(items) if item.get("subset") == name]
    metrics = {}
    for name, rows in subsets.items():
        prefix = f"eval/{name}/" if name else "eval/"
        metrics[f"{prefix}greedy_acc"] = float(np.mean([greedy_correct[i] for i in rows]))
        if n_samples == 0:
            continue
        counts = [correct_counts[i] for i in rows]
        metrics[f"{prefix}mean@{n_samples}"] = sum(counts) / (len(rows) * n_samples)
        k = 1
        while k <= n_samples:
            pass_k = [pass_at_k(n_samples, c, k) for c in counts]
            metrics[f"{prefix}pass@{k}"] = float(np.mean(pass_k))
            k *= 2
        metrics[f"{prefix}distinct_correct"] = float(np.mean([distinct[i] for i in rows]))
    return metrics


PROBE_SAMPLES, PROBE_SEED = 8, 0


def probe(model, tokenizer, task, items: list[dict], sampling: Sampling, **micro) -> dict:
    """Token entropy and accuracy of the policy on a fixed probe set (`items`, PROBE_SAMPLES
    responses each), for the entropy-performance law: unlike a training batch, the probe's
    difficulty never changes, so what moves its accuracy is the policy. The samples come from a
    fixed seed (the same random numbers at every probe) inside a forked random state: a run with
    probes trains exactly as one without."""
    mine, n_mine, _ = padded_share(items)
    prompts = [task.prompt(item) for item in mine]
    device = next(unwrap(model).parameters()).device
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with forked, torch.no_grad():
        torch.manual_seed(PROBE_SEED)
        ro = rollout(model, tokenizer, prompts, PROBE_SAMPLES, sampling)
        response_len = ro.response_ids.shape[1]
        entropy = response_logprobs(model, ro.input_ids, ro.attention_mask, response_len,
                                    sampling.temperature, with_entropy=True, **micro).entropy
    real = n_mine * PROBE_SAMPLES  # rows of the padding (FSDP's even shares) are dropped
    mask = ro.response_mask[:real].float()
    texts = ro.texts[:real]
    correct = sum(task.verify(mine[i // PROBE_SAMPLES], text)[0] for i, text in enumerate(texts))
    entropy_sum = (entropy[:real] * mask).sum().item()
    sums = torch.tensor([entropy_sum, mask.sum().item(), correct, real], dtype=torch.float64)
    sums = all_sum(sums)
    return {"probe/entropy": (sums[0] / sums[1].clamp(min=1)).item(),
            "probe/accuracy": (sums[2] / sums[3]).item()}


# --------------------------------------------------------------------------------------------------
# Tasks and verifiers: countdown (generated, shipped in benchmarks/data/)
# --------------------------------------------------------------------------------------------------


MAX_ANSWER_CHARS = 200  # longer answers get reward 0 unparsed: bounds the verifier's time and depth
_OPERATORS = {"\u00d7": "*", "\u00f7": "/", "\u2212": "-"}  # × ÷ − read as * / -
_STEPS = re.compile(r"n[-+*/]n=n(,n[-+*/]n=n)*")  # the step list, one letter per token: n a number


class _Malformed(Exception):
    pass


def extract_countdown_answer(response: str) -> str:
    """The text inside the last `<answer>...</answer>` (instruction-tuned models), else the whole
    response; stripped. Two reverse scans: linear in the response's length whatever it holds."""
    close = response.rfind("</answer>")
    opening = response.rfind("<answer>", 0, close) if close != -1 else -1
    answer = response[opening + len("<answer>"):close] if opening != -1 else response
    return answer.strip()


def _tokenize_countdown(text: str) -> list[str]:
    """Integers (ASCII digits only: '²' or full-width digits are not numbers), + - * / ( ) = , and
    × ÷ −; spaces and tabs are skipped; any other character is malformed."""
    tokens = [_OPERATORS.get(t, t) for t in re.findall(r"[0-9]+|[^ \t]", text)]
    if any(not (t[0] in "0123456789" or t in "+-*/()=,") for t in tokens):
        raise _Malformed
    return tokens


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    """a op b exactly; None for a division by zero."""
    if op == "/":
        return a / b if b != 0 else None
    return a + b if op == "+" else a - b if op == "-" else a * b


def _expression_tree(tokens: list[str]):
    """Recursive descent over `expr := term (('+'|'-') term)*`, `term := atom (('*'|'/') atom)*`,
    `atom := integer | '(' expr ')'` (no unary operators, no exponent). The tree is an int for a
    number, `(op, left, right)` for an operation, left-associative."""
    pos = 0

    def parse(level: int):  # level 0: a sum, 1: a product, 2: an atom
        nonlocal pos
        if level == 2:
            token = tokens[pos] if pos < len(tokens) else ""  # past the end: malformed below
            pos += 1
            if token == "(":
                tree = parse(0)
                if tokens[pos:pos + 1] != [")"]:
                    raise _Malformed
                pos += 1
                return tree
            if not token.isdigit():
                raise _Malformed
            return int(token)
        tree = parse(level + 1)
        while pos < len(tokens) and tokens[pos] in ("+-", "*/")[level]:
            pos += 1
            tree = (tokens[pos - 1], tree, parse(level + 1))
        return tree

    tree = parse(0)
    if pos != len(tokens):
        raise _Malformed
    return tree


def _value(tree) -> Fraction:
    """The exact (rational) value of an expression tree; a division by zero is malformed."""
    if isinstance(tree, int):
        return Fraction(tree)
    value = _apply(tree[0], _value(tree[1]), _value(tree[2]))
    if value is None:
        raise _Malformed
    return value


def _steps_tree(steps: list[tuple[int, str, int, int]], nums: list[int] | None):
    """The expression tree that `steps` (a op b = c) build, and whether they solve over `nums`: each
    step takes two available numbers (a given one or an earlier result, each used once), its result
    is exactly a op b, and at the end one number is left. An operand equal to an unused earlier
    result is read as that result (the latest), so chained steps give one tree whatever `nums` hold.
    The verdict never depends on that choice; the tree can: when a result equals a given number or
    another result, another step order of the same solution may read as another tree (another
    canonical form)."""
    available = Counter(nums or [])
    results: list[tuple[int, object]] = []  # (value, tree) of unused results, oldest first
    valid = nums is not None
    for a, op, b, c in steps:
        operands = []
        for x in (a, b):
            latest = next((k for k in reversed(range(len(results))) if results[k][0] == x), None)
            operands.append(results.pop(latest)[1] if latest is not None else x)
            valid = valid and available[x] > 0
            available[x] -= 1
        valid = valid and _apply(op, Fraction(a), Fraction(b)) == c
        available[c] += 1
        results.append((c, (op, *operands)))
    valid = valid and sum((+available).values()) == 1  # one number left: the last result
    return results[-1][1], valid and len(results) == 1


def canonical_form(tree) -> str:
    """A text equal for two trees iff they differ only by commutation and associativity: chains of +
    and - flatten into signed terms, chains of * and / into factors with exponent +1/-1, each
    sorted. So `13+17=30,30/5=6`, `17+13=30,30/5=6` and `(13+17)/5` share one form; a-(b-c) is
    a-b+c."""
    if isinstance(tree, int):
        return str(tree)
    additive = tree[0] in "+-"
    parts = []

    def collect(node, positive: bool):
        if not isinstance(node, int) and (node[0] in "+-") == additive:
            op, left, right = node
            collect(left, positive)
            collect(right, positive if op in "+*" else not positive)
        else:
            sign = ("+" if positive else "-") if additive else ("*" if positive else "/")
            parts.append((canonical_form(node), sign))

    collect(tree, True)
    return "(" + "".join(sign + text for text, sign in sorted(parts)) + ")"


def parse_countdown(response: str, steps: bool = True, nums: list[int] | None = None):
    """`(value, tree, valid)` of a countdown answer, or None if it is not well-formed. Steps
    (`13+17=30,30/5=6`): the value is the last written result, `valid` whether the steps solve over
    `nums`. An expression (`(13+17)/5`): its exact value, `valid` whether it uses exactly `nums`."""
    answer = extract_countdown_answer(response) if isinstance(response, str) else ""
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    try:
        tokens = _tokenize_countdown(answer)
        if steps:
            if not _STEPS.fullmatch("".join("n" if t[0].isdigit() else t for t in tokens)):
                return None
            step_list = [(int(tokens[i]), tokens[i + 1], int(tokens[i + 2]), int(tokens[i + 4]))
                         for i in range(0, len(tokens), 6)]  # "a op b = c ," per step
            tree, valid = _steps_tree(step_list, nums)
            return Fraction(step_list[-1][3]), tree, valid
        tree = _expression_tree(tokens)
        value = _value(tree)
    except _Malformed:
        return None
    return value, tree, nums is not None and sorted(_literals(tree)) == sorted(nums)


def _literals(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _literals(tree[1]) + _literals(tree[2])


def verify_countdown(nums: list[int], target: int, response: str,
                     steps: bool = True) -> tuple[bool, bool]:
    """`(correct, parsed)` of a countdown answer; never raises, never calls `eval`.

    Steps (the default): correct iff every step combines two available numbers (each given number
    used exactly once, each result at most once) with + - * / (also × ÷ −), writes its result
    exactly, and the last result is the target; a negative or fractional result cannot be written.
    Expression (`steps=False`): correct iff it uses every given number exactly once with + - * / and
    parentheses and is exactly the target. `parsed` is False for text that is not a well-formed
    answer (`charts/unparseable_frac`)."""
    parsed = parse_countdown(response, steps, nums)
    if parsed is None:
        return False, False
    value, _, valid = parsed
    return valid and value == target, True


@dataclass(frozen=True)
class Countdown:
    """Countdown: reach the target with the given numbers, each used once, with + - * /.

    Prompt `"17 13 5>6:"`; answer `13+17=30,30/5=6` (steps, the default: every intermediate result
    is written, so a process reward has steps to credit) or `(13+17)/5` (`steps=False`). The
    instances are `benchmarks/data/<data>/{train,val,test}.jsonl` (from
    `benchmarks/countdown_data.py`); test and val rows are half with exactly one solution up to
    commutation and associativity, half with several (`subset`)."""

    name: str
    data: str
    """folder in benchmarks/data/ with the splits"""
    steps: bool = True
    max_new_tokens: int = 32
    second_skill: str = ""
    """a task evaluated beside this one, never trained on (`eval/second_skill/*`: forgetting)"""
    chat_tokenizer: object = None
    """set by get_task: with a chat template, the natural-language question replaces the prompt"""
    max_prompt_length: int | None = None
    """set by get_task: longer prompts (in chat_tokenizer's tokens) are left out, with a count"""

    def question(self, item: dict) -> str:
        if "expression" in item:
            return (f"Compute {item['expression']} one operation at a time, 'a op b = c', steps "
                    "separated by commas, for example <answer>2*3=6,1+6=7</answer> for 1+2*3.")
        if self.steps:
            form = ("one step per operation, 'a op b = c', steps separated by commas, the last "
                    "result equal to the target, for example <answer>1+2=3,3*3=9</answer>")
        else:
            form = "an expression with parentheses, for example <answer>(1+2)*3</answer>"
        return (f"Using the numbers {item['nums']}, reach {item['target']} with + - * /. Use each "
                f"number exactly once. Give {form}.")

    def prompt(self, item: dict) -> str:
        if "expression" in item:  # an expression to compute step by step
            plain = f"{item['expression']}="
        else:
            plain = f"{' '.join(str(n) for n in item['nums'])}>{item['target']}:"
        return _chat_or_plain(self.chat_tokenizer, self.question(item), plain)

    def verify(self, item: dict, response: str) -> tuple[bool, bool]:
        return verify_countdown(item["nums"], item["target"], response, self.steps)

    def answer_key(self, response: str) -> str:
        """What makes two correct answers the same: their canonical form."""
        parsed = parse_countdown(response, self.steps)
        return canonical_form(parsed[1]) if parsed else re.sub(r"\s+", "", response)

    def items(self, split: str) -> list[dict]:
        key = (self.data, split)
        if key not in _SPLITS:
            path = REPO_ROOT / "benchmarks" / "data" / self.data / f"{split}.jsonl"
            if not path.is_file():
                raise UserInputError(f"task {self.name}: split file {path} is missing")
            lines = path.read_text().splitlines()
            _SPLITS[key] = [json.loads(line) for line in lines if line.strip()]
        return _SPLITS[key]

    def train_items(self) -> list[dict]:
        return _fitting(self, self.items("train"), "train")

    def eval_items(self, split: str, n: int) -> list[dict]:
        """The first `n` prompts of `split`, then the second skill's first n // 2 (subset
        second_skill)."""
        items = _fitting(self, self.items(split), split)[:n]
        if self.second_skill:
            second = _fitting(self, TASKS[self.second_skill].items(split), split)[: n // 2]
            items = items + [{**item, "subset": "second_skill"} for item in second]
        return items


_SPLITS: dict[tuple[str, str], list[dict]] = {}


def _fitting(task, items: list[dict], split: str) -> list[dict]:
    """The items whose prompt has at most `task.max_prompt_length` tokens (others counted)."""
    if not task.max_prompt_length or task.chat_tokenizer is None or not items:
        return items
    prompts = [task.prompt(item) for item in items]
    lengths = [len(ids) for ids in task.chat_tokenizer(prompts, add_special_tokens=False).input_ids]
    kept = [item for item, length in zip(items, lengths) if length <= task.max_prompt_length]
    limit = f"--max-prompt-length {task.max_prompt_length} tokens"
    if not kept:
        raise UserInputError(f"{task.name} ({split}): every prompt is longer than {limit} "
                             f"(the longest: {max(lengths)})")
    if len(kept) < len(items) and is_main():
        print(f"warning: {task.name} ({split}): left out {len(items) - len(kept)} of {len(items)} "
              f"prompts longer than {limit}", file=sys.stderr)
    return kept


# --------------------------------------------------------------------------------------------------
# Tasks and verifiers: GSM8K and MATH, loaded with `datasets`, checked with math-verify
# --------------------------------------------------------------------------------------------------


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_MATH_ANSWER_CHARS = 1000  # longer answers get reward 0 unparsed; such a gold is a malformed row
MAX_RESPONSE_CHARS = 100_000  # the final answer is looked for in this many last characters
MATH_TIMEOUT = 5  # seconds math-verify may spend parsing one expression, and comparing two
_BOX_TOKENS = re.compile(r"\\boxed\s*(\{)|\\boxed\s+([^\s{}$]+)|\{|\}")
_FINAL_PHRASE = re.compile(r"####|\banswer(?:\s+is\b|\s*:)(?![\s*:]*[A-Za-z]{2})", re.IGNORECASE)
_INLINE_MATH = re.compile(r"\$+([^$]+)\$|\\[(\[](.+?)\\[)\]]")


def extract_final_answer(response: str) -> str | None:
    """The content of the last non-empty `\\boxed{...}` (nested braces allowed) or `\\boxed 5`;
    without one, what follows the last `####`, "answer is" or "answer:" (not "answer is correct"):
    its `$...$`, else its line up to the sentence's end or first word ("72 clips." -> "72"); else
    None. One pass with a stack of open braces: linear time, well under a second for a hostile
    megabyte."""
    response = response[-MAX_RESPONSE_CHARS:]
    stack, box = [], None  # stack: where each open brace's content starts (-1: not a box's)
    for token in _BOX_TOKENS.finditer(response):
        if token.group() == "}":
            start, end = (stack.pop() if stack else -1), token.start()
        elif token.group(2):  # "\boxed 5": one unbraced token
            start, end = token.span(2)
        else:
            stack.append(token.end() if token.group(1) else -1)
            continue
        # a box that starts later closes later only if it lies after the current one (disjoint)
        if start > (box[0] if box else -1) and response[start:end].strip():
            box = (start, end)
    if box:
        return response[box[0] : box[1]].strip()
    phrase = max(_FINAL_PHRASE.finditer(response), key=lambda match: match.start(), default=None)
    if phrase is None:
        return None
    rest = re.compile(r"[\s*:]*([^\n]*)").match(response, phrase.end()).group(1)
    rest = rest[: MAX_MATH_ANSWER_CHARS + 1]
    if inline := _INLINE_MATH.match(rest):
        return (inline.group(1) or inline.group(2)).strip()
    for cut in re.finditer(r"\.\s|\s(?=[A-Za-z]{2})", rest):  # the sentence's end or first word,
        if rest.count("{", 0, cut.start()) == rest.count("}", 0, cut.start()):  # outside braces
            rest = rest[: cut.start()]
            break
    return rest.lstrip("$").rstrip(" \t*.$") or None


def verify_math(gold: str, response: str) -> tuple[bool, bool]:
    """`(correct, parsed)`: is the response's final answer equivalent to `gold` (math-verify)?

    No final answer, an unparseable one, an error or a timeout -> not correct; so does a gold over
    MAX_MATH_ANSWER_CHARS; never raises. math-verify bounds its work with SIGALRM, which exists only
    in a main thread: from another thread the check runs in a helper process's main thread."""
    if not (isinstance(response, str) and isinstance(gold, str)):
        return False, False
    if len(gold) > MAX_MATH_ANSWER_CHARS:
        return False, False
    answer = extract_final_answer(response)
    if answer is None or len(answer) > MAX_MATH_ANSWER_CHARS:
        return False, False
    if threading.current_thread() is threading.main_thread():
        return _math_verify(gold, answer)
    return _math_verify_in_helper(gold, answer)


def _parse_math(text: str) -> list:
    """math-verify's parse of LaTeX; thousands separated by thin spaces (`1\\,234`) become 1234."""
    from math_verify import parse

    text = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", "", text)
    return parse("$" + text + "$", parsing_timeout=MATH_TIMEOUT)


@functools.cache
def _parsed_gold(gold: str) -> list:
    """The parsed gold, once per gold string (re-parsing it cost about a third of each check). []
    when it does not parse, or when comparing it with 0 times out (`9^{9^{9^{9}}}`): every response
    then gets reward 0 at no further cost."""
    import sympy
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        parsed = _parse_math(gold)
    except Exception:  # math-verify reports most failures as [], sympy can still raise
        return []
    try:
        verify(parsed, sympy.Integer(0), timeout_seconds=MATH_TIMEOUT, raise_on_error=True)
    except TimeoutException:
        return []
    except Exception:  # any other failure against 0 says nothing about real answers
        pass
    return parsed


def _math_verify(gold: str, answer: str) -> tuple[bool, bool]:
    """math-verify on a gold and an extracted answer, in a main thread (timeouts need SIGALRM)."""
    from math_verify import verify

    try:
        gold_parsed, answer_parsed = _parsed_gold(gold), _parse_math(answer)
        if not answer_parsed:
            return False, False
        correct = verify(gold_parsed, answer_parsed, timeout_seconds=MATH_TIMEOUT)
        return bool(gold_parsed) and bool(correct), True
    except Exception:  # math-verify and sympy raise many types on hostile input: not verified
        return False, True


_HELPER: dict = {}
_HELPER_LOCK = threading.Lock()


def _math_verify_in_helper(gold: str, answer: str) -> tuple[bool, bool]:
    """`_math_verify` in a helper process (a plain `python -c`, so the caller's script is not
    re-imported), started on first use, shared by all threads. Its own timeouts end a check within
    ~4 x MATH_TIMEOUT; a helper silent for 6 x is killed, and the next call starts a new one."""
    with _HELPER_LOCK:
        helper = _HELPER.get("process")
        if helper is None or helper.poll() is not None:
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
                    "common._math_verify_server()")
            helper = subprocess.Popen([sys.executable, "-c", code, str(REPO_ROOT)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      bufsize=1)
            _HELPER["process"] = helper
            atexit.register(helper.kill)
        try:
            helper.stdin.write(json.dumps([gold, answer]) + "\n")
            helper.stdin.flush()
            if not select.select([helper.stdout], [], [], 6 * MATH_TIMEOUT)[0]:
                raise TimeoutError
            correct, parsed = json.loads(helper.stdout.readline())
            return bool(correct), bool(parsed)
        except Exception:  # no answer in time, or a helper that died: not verified
            helper.kill()
            _HELPER.pop("process", None)
            return False, True


def _math_verify_server() -> None:
    """The helper's loop: a JSON `[gold, answer]` per input line, `[correct, parsed]` per output
    line."""
    for line in sys.stdin:
        gold, answer = json.loads(line)
        print(json.dumps(_math_verify(gold, answer)), flush=True)


@dataclass(frozen=True)
class MathTask:
    """GSM8K / MATH-style problems with one final answer, from the hub or a local folder
    (`--dataset`).

    Items are `{"question": str, "gold": str}`. GSM8K's gold is the ASCII number after `####` in
    `answer` (thousands separators removed); MATH's the `answer` field, or the final answer of
    `solution`. A local folder needs a train and a test file (`train.jsonl`, `test.parquet`, ...).
    """

    name: str
    train_source: str
    test_source: str
    config: str | None = None
    question_field: str = "question"
    max_new_tokens: int = 512
    chat_tokenizer: object = None
    max_prompt_length: int | None = None

    def question(self, item: dict) -> str:
        return f"{item['question']}\n{MATH_INSTRUCTION}"

    def prompt(self, item: dict) -> str:
        return _chat_or_plain(self.chat_tokenizer, self.question(item), self.question(item) + "\n")

    def verify(self, item: dict, response: str) -> tuple[bool, bool]:
        return verify_math(item["gold"], response)

    def answer_key(self, response: str) -> str:
        return re.sub(r"\s+", "", extract_final_answer(response) or "")

    def gold(self, row: dict) -> str | None:
        """The row's gold answer, or None (a malformed row): none, or over MAX_MATH_ANSWER_CHARS."""
        answer, solution = row.get("answer"), row.get("solution")
        if self.name == "gsm8k":  # "... #### 1,234": an ASCII number after the last ####
            has_number = isinstance(answer, str) and "####" in answer
            gold = answer.split("####")[-1].strip().replace(",", "") if has_number else ""
            gold = gold if _plain_number(gold) else None
        elif isinstance(answer, str) and answer.strip():
            gold = answer.strip()
        else:
            gold = extract_final_answer(solution) if isinstance(solution, str) else None
        return gold if gold and len(gold) <= MAX_MATH_ANSWER_CHARS else None

    def items(self, split: str) -> list[dict]:
        """train and test from the source; val is train's last 10% of rows (at most 500), which the
        train split then leaves out."""
        if split == "test":
            return _math_split(self, "test")
        rows = _math_split(self, "train")
        n_val = min(500, len(rows) // 10)
        return rows[len(rows) - n_val:] if split == "val" else rows[: len(rows) - n_val]

    def train_items(self) -> list[dict]:
        return _fitting(self, self.items("train"), "train")

    def eval_items(self, split: str, n: int) -> list[dict]:
        return _fitting(self, self.items(split), split)[:n]


def _chat_or_plain(tokenizer, question: str, plain: str) -> str:
    """The tokenizer's chat template around the question when it has one, else the plain prompt."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain


def load_rows(source: str, split: str, config: str | None = None):
    """`datasets.load_dataset` of one split of a hub id or local folder; every failure is one line,
    which for a local folder names the file (and the line of a JSON Lines file that does not parse).
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its error lines too: ours carries the cause
    path = Path(source).expanduser()
    if path.is_file():
        raise UserInputError(f"dataset {source!r} is a single file: pass a folder with a train "
                             "and a test file")
    if not path.is_dir() and not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", source):
        raise UserInputError(f"dataset folder not found: {source}")
    if path.is_dir() and not _split_files(path, split):
        raise UserInputError(f"dataset folder {source!r} has no {split} file ({split}.jsonl, "
                             f"{split}.parquet, ...)")
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, config, split=split)
    except Exception as exc:  # ConnectionError, FileNotFoundError, ValueError, ... by the cause
        hint = " (offline: pass a local path)" if not path.is_dir() else ""
        files = _split_files(path, split) if path.is_dir() else []
        bad_line = next(filter(None, map(_first_bad_line, files)), None)
        raise UserInputError(f"could not load the {split} split of dataset {source!r}{hint}: "
                             f"{bad_line or _first_line(exc)}") from None


def _split_files(folder: Path, split: str) -> list[Path]:
    """A local dataset folder's files of `split`, as datasets names them (`data/train-0.jsonl`)."""
    return sorted(file for file in folder.rglob("*") if file.is_file()
                  and not any(part.startswith(".") for part in file.relative_to(folder).parts)
                  and re.match(rf"{split}([-_.]|$)", file.name))


def _first_bad_line(file: Path) -> str | None:
    """Why `file` cannot be read as rows: empty, or (JSON Lines) its first line that is not UTF-8
    or not an object."""
    try:
        if file.stat().st_size == 0:
            return f"{file} is empty"
        lines = file.read_bytes().splitlines() if file.suffix == ".jsonl" else []
    except OSError as exc:
        return f"{file} cannot be read ({exc.strerror})"
    for number, line in enumerate(lines, 1):
        try:
            if line.strip() and not isinstance(json.loads(line.decode("utf-8")), dict):
                return f"{file}, line {number}: not a JSON object"
        except UnicodeDecodeError:
            return f"{file}, line {number}: bytes that are not UTF-8"
        except ValueError as exc:
            return f"{file}, line {number}: not valid JSON ({_first_line(exc)})"
    return None


def _plain_number(text: str) -> bool:
    return re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text) is not None


def _math_split(task: MathTask, split: str) -> list[dict]:
    """The split's usable rows as items. Malformed rows are skipped, with one warning line naming
    the source and, per reason, the count and the first such row: undecodable text, no question, no
    final answer, or a gold math-verify cannot parse within MATH_TIMEOUT (checked once here, then
    cached)."""
    key = (f"{task.name}:{task.train_source}:{task.test_source}", split)
    if key in _SPLITS:
        return _SPLITS[key]
    source = task.train_source if split == "train" else task.test_source
    rows = load_rows(source, split, task.config)
    items, skipped = [], defaultdict(list)
    for index in range(len(rows)):
        try:
            row = rows[index]
        except UnicodeDecodeError:  # pyarrow decodes each string as it is read
            skipped["bytes that are not UTF-8"].append(index)
            continue
        question, gold = row.get(task.question_field), task.gold(row)
        if not isinstance(question, str) or not question.strip():
            skipped[f"no non-empty '{task.question_field}'"].append(index)
        elif not gold:
            skipped["no final answer"].append(index)
        elif not _plain_number(gold) and not _parsed_gold(gold):  # plain numbers always parse
            why = f"a gold answer math-verify cannot parse or compare within {MATH_TIMEOUT} s"
            skipped[why].append(index)
        else:
            items.append({"question": question.strip(), "gold": gold})
    folder = Path(source).expanduser()
    files = _split_files(folder, split) if folder.is_dir() else []
    where = str(files[0]) if len(files) == 1 else source
    if skipped:
        reasons = "; ".join(f"{len(rows)} with {why} (e.g. row {rows[0]})"
                            for why, rows in skipped.items())
        n_skipped = sum(map(len, skipped.values()))
        print(f"warning: {where} ({split}): skipped {n_skipped} malformed row(s): {reasons}",
              file=sys.stderr)
    if not items:
        raise UserInputError(f"the {split} split of dataset {source!r} has no usable rows")
    _SPLITS[key] = items
    return items


TASKS = {
    "countdown": Countdown("countdown", "countdown", second_skill="arith"),
    "countdown-expr": Countdown("countdown-expr", "countdown", steps=False),
    "arith": Countdown("arith", "arith"),
    "gsm8k": MathTask("gsm8k", "openai/gsm8k", "openai/gsm8k", config="main"),
    "math": MathTask("math", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
                     question_field="problem", max_new_tokens=1024),
}


def get_task(name: str, dataset: str | None = None, tokenizer=None,
             max_prompt_length: int | None = None):
    """The task `name`, reading `dataset` (hub id or local folder) instead of its default source,
    with `tokenizer`'s chat template when it has one, leaving out prompts over `max_prompt_length`.
    """
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    task = TASKS[name]
    if dataset:
        if not isinstance(task, MathTask):
            raise UserInputError(f"task {name} is generated, it reads no dataset; --dataset "
                                 "applies to gsm8k and math")
        task = replace(task, train_source=dataset, test_source=dataset,
                       config=task.config if dataset == task.train_source else None)
    if tokenizer is None:
        return task
    return replace(task, chat_tokenizer=tokenizer, max_prompt_length=max_prompt_length)


class PromptSampler:
    """Endless, seeded stream of training items: a fresh permutation each pass over the split."""

    def __init__(self, items: list[dict], batch_size: int, seed: int):
        if not items:
            raise UserInputError("the training split is empty")
        self.items, self.batch_size = items, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(items)), 0

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos = np.array(state["order"]), state["pos"]

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.items)), 0
            batch.append(self.items[self.order[self.pos]])
            self.pos += 1
        return batch


# ==================================================================================================
# Run infrastructure: errors, flags, processes (torchrun), checkpoints, logging. Nothing below is an
# algorithm's business: a trainer of your own brings its own.
# ==================================================================================================


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, (UserInputError, TrainingStopped)):
        print(f"error: {exc}", file=sys.stderr)
        if issubclass(exc_type, FlagError):  # a usage error: exit code 2, as argparse's
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
    elif _interrupted(exc):  # Ctrl-C: one line (rank 0's), not a traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: {where_to_resume()}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)


def _interrupted(exc: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an error raised while handling one: Ctrl-C inside torch.save's file
    writes surfaces as its RuntimeError ("unexpected pos ...")."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


sys.excepthook = _excepthook
sys.stdout.reconfigure(line_buffering=True)  # each printed line reaches a pipe (log, `tee`) at once

RUN_STATE: dict = {"run_dir": None, "checkpoint_step": None}
"""The run folder and the step of its last checkpoint on disk (kept by RunLogger and
save_checkpoint), for the lines that end a run early (Ctrl-C, a full disk, non-finite weights)."""


def where_to_resume() -> str:
    """Where this run's last checkpoint is and the command that continues from it (or that there is
    none)."""
    run_dir, step = RUN_STATE["run_dir"], RUN_STATE["checkpoint_step"]
    if run_dir is None:
        return "the run had not started; nothing was written"
    if step is None:
        return (f"no checkpoint was saved yet in {run_dir} (see --checkpoint-every); nothing to "
                "resume")
    world = os.environ.get("WORLD_SIZE", "1")
    launcher = f"torchrun --nproc-per-node {world}" if world != "1" else "python"
    return (f"the last checkpoint is step {step} in {run_dir}; "
            f"continue with: {launcher} {sys.argv[0]} --resume {run_dir}")


@contextlib.contextmanager
def disk_errors(folder, *partial: Path):
    """A failed write inside (a full disk, a read-only folder) becomes one line naming `folder` and
    the last checkpoint (TrainingStopped). Whatever stops the write (that, Ctrl-C, another error)
    removes the `partial` files or folders it may have left."""
    try:
        yield
    except BaseException as exc:
        for path in partial:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "no space left on the device" if full else exc.strerror or str(exc)
        raise TrainingStopped(f"could not write to {folder}: {why}; {where_to_resume()}") from None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Flags: one range check for every script, before any model loads
# --------------------------------------------------------------------------------------------------


class FlagError(UserInputError):
    """A flag value out of its range, `--flag VALUE: why`; uncaught it exits with code 2
    (argparse's)."""

    def __init__(self, name: str, value, why: str):
        super().__init__(f"--{name.replace('_', '-')} {value}: {why}")


def _rule(ok, why: str, finite: bool = False):
    """A FLAG_RULES entry: `ok(value)` must hold (and the value be finite when `finite`)."""
    return (lambda v: (not finite or math.isfinite(v)) and ok(v)), why


def _at_least(low: int, why: str = ""):
    return _rule(lambda v: v >= low, f"must be >= {low}{why}")


_POSITIVE = _rule(lambda v: v > 0, "must be a finite number > 0", finite=True)
_NON_NEGATIVE = _rule(lambda v: v >= 0, "must be a finite number >= 0", finite=True)
_UNIT = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]", finite=True)
_SHARE = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]", finite=True)
_FINITE = _rule(lambda v: True, "must be finite", finite=True)

FLAG_RULES = {  # field -> (ok(value), why), for the fields of a script's Args that exist there
    "seed": _rule(lambda v: 0 <= v <= 2**32 - 1, "must be in [0, 2**32 - 1]"),
    "exp_name": _rule(lambda v: v not in ("", ".", "..") and not any(c in v for c in "/\\\0"),
                      "must be a plain name, without path separators"),
    "output_dir": _rule(lambda v: _writable_folder(v),
                        "is not a folder that can be written (or created)"),
    **dict.fromkeys(("log_completions_every", "checkpoint_every", "probe_every"),
                    _at_least(0, " (0: never)")),
    "eval_every": _at_least(0, " (0: only before the first and after the last step)"),
    "max_new_tokens": _at_least(1, " (leave it out for the task's own length)"),
    "max_prompt_length": _at_least(1, " (leave it out for the model's limit)"),
    "temperature": _rule(lambda v: 0 < v <= 100, "must be in (0, 100]", finite=True),
    "top_p": _SHARE, "top_k": _at_least(0, " (0: off)"),
    "eval_samples": _at_least(0, " (0: greedy only)"),
    "final_eval_samples": _at_least(0, " (0: greedy only)"),
    "micro_batch_tokens": _at_least(0, " (0: micro-batches of --micro-batch-size rows)"),
    "group_size": _at_least(1, " (and >= 2 where groups give the baseline)"),
    **dict.fromkeys(("num_steps", "prompts_per_step", "num_mini_batches", "num_epochs",
                     "micro_batch_size", "presample_k", "rehearsal_threshold", "pool_prompts",
                     "rehearsal_batch_size", "eval_prompts", "probe_prompts"), _at_least(1)),
    # an AdamW step moves every weight by about the learning rate: above 1 it is noise
    "learning_rate": _rule(lambda v: 0 <= v <= 1, "must be in [0, 1] (0: the policy never changes)",
                           finite=True),
    "prm_learning_rate": _rule(lambda v: 0 <= v <= 1, "must be in [0, 1] (0: the PRM stays frozen)",
                               finite=True),
    **dict.fromkeys(("max_grad_norm", "prm_max_grad_norm", "prm_beta", "rho", "clip_eps_high"),
                    _POSITIVE),
    **dict.fromkeys(("beta", "eta", "kl_cov_coef", "entropy_coef"), _NON_NEGATIVE),
    **dict.fromkeys(("clip_eps_low", "acc_low", "acc_high", "gamma"), _UNIT),
    "clip_cov_ratio": _SHARE, "kl_cov_ratio": _SHARE,
    "clip_cov_lb": _FINITE, "clip_cov_ub": _FINITE,
    "alpha": _rule(lambda v: 0 < v < 1, "must be strictly between 0 and 1", finite=True),
}


def _writable_folder(path: str) -> bool:
    """`path` is a writable folder, or the nearest existing one above it is (RunLogger makes it)."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def check_flags(args) -> None:
    """Raise FlagError for the first field of `args` (an Args dataclass) outside its FLAG_RULES
    range."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name in FLAG_RULES and value is not None and not FLAG_RULES[field.name][0](value):
            raise FlagError(field.name, value, FLAG_RULES[field.name][1])


def check_shared_args(args) -> None:
    """Every flag in its range and the shared combinations (`error: --flag VALUE: why`, exit code
    2), before any model loads; `args.max_new_tokens` becomes the task's own length unless given."""
    check_flags(args)
    if args.task not in TASKS:
        raise FlagError("task", args.task, f"unknown task; choose one of: {', '.join(TASKS)}")
    args.max_new_tokens = args.max_new_tokens or TASKS[args.task].max_new_tokens
    if 0 < args.micro_batch_tokens <= args.max_new_tokens:
        raise FlagError("micro_batch_tokens", args.micro_batch_tokens, "smaller than one row: a "
                        f"prompt and up to {args.max_new_tokens} response tokens")
    if args.fsdp and args.rollout == "continuous":
        raise FlagError("rollout", args.rollout, "does not run on FSDP-sharded weights (--fsdp); "
                        "use generate or static")
    check_memory(args)  # a one-line warning on a GPU the run will not fit


def check_position_limit(model, args) -> int | None:
    """`args.max_prompt_length`, by default the model's position limit minus `args.max_new_tokens`
    (None: no limit); a budget over the model's limit is a FlagError before training."""
    limit = position_limit(model)
    if limit is not None and args.max_new_tokens >= limit:
        raise FlagError("max_new_tokens", args.max_new_tokens, "leaves no room for a prompt: the "
                        f"model's position limit is {limit} tokens")
    budget = (args.max_prompt_length or 0) + args.max_new_tokens
    if limit is not None and args.max_prompt_length and budget > limit:
        raise FlagError("max_prompt_length", args.max_prompt_length, f"+ --max-new-tokens "
                        f"{args.max_new_tokens} exceeds the model's position limit of {limit} "
                        "tokens")
    return args.max_prompt_length or (limit - args.max_new_tokens if limit is not None else None)


def memory_coefficients(c: dict) -> dict[str, int]:
    """Bytes per token (per decoder layer) of a Qwen2/Llama-style config, fitted to PyTorch's
    allocations (benchmarks/memory_model.py): saved for backward, with checkpointing, in
    `generate`'s KV cache; and the parameters."""
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    L = c["num_hidden_layers"]
    q = heads * (c.get("head_dim") or h // heads)
    kv = c["num_key_value_heads"] * q // heads
    layer = 26 * h + 4 * q + 4 * kv + 8 * i + 4 * heads + 8
    embeddings = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    params = embeddings + L * (2 * h * (q + kv) + 3 * h * i)
    return dict(layer=layer, checkpointed=4 * h, recompute=layer + 4 * i + 2 * q,
                other=24 * h + 2 * i, kv=12 * kv, params=params)


def estimate_peak_memory(c: dict, args, processes: int = 1, prompt: int = 256) -> dict[str, float]:
    """GPU bytes of a run: `static` (16 per policy parameter, sharded by --fsdp; decode copy,
    reference, PRM), the phases `training`, `generation`, `evaluation`, and `peak` = 1.15 x (static
    + largest phase): 15% for what counted allocations miss (fragmentation, CUDA/NCCL workspaces).
    """
    m, L, V = memory_coefficients(c), c["num_hidden_layers"], c["vocab_size"]
    autocast_fp32 = not args.fsdp
    P, width = m["params"], prompt + args.max_new_tokens
    prm = 2 if hasattr(args, "prm_learning_rate") else 1  # PRIME trains a PRM too
    static = 16 * P / (processes if args.fsdp else 1) * prm
    copies = ((args.rollout != "generate" and autocast_fp32) + (getattr(args, "beta", 0) > 0)
              + (getattr(args, "divergence", "") == "reverse-kl")
              + (getattr(args, "prm_ref", "") == "freeze"))
    static += 2 * P * copies
    tokens = min(args.micro_batch_size * width, args.micro_batch_tokens or math.inf)
    logits = 2 * V * tokens * args.max_new_tokens / width + 20 * LOGITS_CHUNK  # bf16, fp32 chunks
    if args.gradient_checkpointing:
        training = tokens * L * m["checkpointed"] + max(logits, tokens * m["recompute"])
    else:
        training = tokens * (L * m["layer"] + m["other"]) + logits
    kv_fp32 = args.rollout == "generate" and autocast_fp32
    kv = L * (m["kv"] if kv_fp32 else m["kv"] // 3)  # bf16 copy / FSDP: 2+2 bytes

    def decoding(rows):  # KV cache, a step's fp32 logits and probabilities, autocast's bf16 weights
        return rows * (width * kv + 8 * V) + 2 * P * autocast_fp32

    mine = -(-getattr(args, "eval_prompts", 0) // processes)  # each process evaluates its share
    n = max(getattr(args, "final_eval_samples", 0), getattr(args, "eval_samples", 0), 1)
    parts = dict(static=static, training=training + 2 * P * autocast_fp32,
                 generation=decoding(args.prompts_per_step // processes * args.group_size),
                 evaluation=decoding(max(min(1024, mine), min(1024 // n, mine) * n)))
    largest = max(parts["training"], parts["generation"], parts["evaluation"])
    return {**parts, "peak": 1.15 * (static + largest)}


def check_memory(args, device_bytes: int | None = None) -> None:
    """On a GPU, before any weights load (only the config is read): one stderr line if the estimate
    exceeds its memory; silent for a config without the sizes the estimate needs."""
    try:
        if device_bytes is None and not (args.cuda and torch.cuda.is_available()):
            return
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model_path(args.model_name)).to_dict()
        parts = estimate_peak_memory(config, args, world_size())
        if not device_bytes:
            gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
            device_bytes = gpu.total_memory
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, UserInputError):
        return
    phase = max(("training", "generation", "evaluation"), key=parts.get)
    hint = {"training": "try --micro-batch-tokens 8192, --gradient-checkpointing or --fsdp",
            "generation": "try fewer --prompts-per-step x --group-size per GPU (more GPUs)",
            "evaluation": "try fewer --eval-prompts or --final-eval-samples (up to 1024 rows a "
                          "batch)"}[phase]
    if parts["peak"] > device_bytes and is_main():
        gib = {k: f"{v / 2**30:.0f} GiB" for k, v in parts.items()}
        print(f"warning: estimated peak memory {gib['peak']} exceeds this GPU's "
              f"{device_bytes / 2**30:.0f} GiB (static {gib['static']}, {phase} {gib[phase]}); "
              f"{hint}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Several processes (torchrun): data-parallel rollouts and training with DDP or FSDP2
# --------------------------------------------------------------------------------------------------


def init_distributed(use_cuda: bool = True) -> tuple[int, int, torch.device]:
    """`(rank, world_size, device)`. A plain `python` run is rank 0 of 1. Under `torchrun`
    (WORLD_SIZE > 1) this joins the process group (NCCL on GPUs, gloo on CPUs) and takes GPU
    LOCAL_RANK; processes other than rank 0 print nothing to stdout (errors still reach stderr)."""
    cuda = use_cuda and torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    import torch.distributed as dist

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), dist.get_world_size(), device


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def is_main() -> bool:
    return rank() == 0


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a collective on x runs: the GPU under NCCL, x's own device under gloo."""
    nccl = torch.distributed.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else x.device


def _all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    """x reduced over all processes (a copy, on the device the backend needs), on x's device."""
    if world_size() == 1:
        return x
    y = x.to(_comm_device(x), copy=True)
    torch.distributed.all_reduce(y, op=getattr(torch.distributed.ReduceOp, op))
    return y.to(x.device)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, "SUM")


def all_max(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, "MAX")


def gather_lists(values: list) -> list:
    """The concatenation, in rank order, of every process's list."""
    if world_size() == 1:
        return list(values)
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, list(values))
    return [v for part in gathered for v in part]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of x (n_p, ...) concatenated in rank order: the global batch as one
    process would hold it, on every process. Other dimensions are zero-padded to the largest
    process's (each process pads responses to its own longest; a padded position has mask 0)."""
    if world_size() == 1:
        return x
    shapes = gather_lists([tuple(x.shape)])
    padded = x.new_zeros([max(sizes) for sizes in zip(*shapes)], device=_comm_device(x))
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in shapes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[: shape[0]] for part, shape in zip(parts, shapes)]).to(x.device)


def own_rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's rows of x, a result over the global batch `gather_rows(like)`, cut to like's
    shape. Example: per-token values of all processes (N, T') -> this process's (n, T)."""
    first = sum(gather_lists([len(like)])[: rank()])  # global number of this process's first row
    return x[(slice(first, first + len(like)), *(slice(0, n) for n in like.shape[1:]))]


def shard(items: list) -> list:
    """This process's contiguous share of a global batch (all processes draw the same batch)."""
    n, r = world_size(), rank()
    if len(items) % n:
        raise UserInputError(f"{len(items)} prompts per step cannot be split evenly over {n} "
                             "processes")
    share = len(items) // n
    return items[r * share:(r + 1) * share]


def padded_share(items: list) -> tuple[list, int, int]:
    """This process's contiguous share when the processes need not divide the items: every share has
    ceil(n / N) items, short last ones padded with items from the start (every process makes as many
    generate calls: FSDP's forwards are collective). Returns (share, how many of it are real, index
    of its first item); results of the padding are to be dropped."""
    size = math.ceil(len(items) / world_size())
    first = rank() * size
    mine = items[first:first + size]
    return mine + items[: size - len(mine)], len(mine), first


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 keeps the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_fsdp(model) -> bool:
    return _distributed() and type(model).__name__.startswith("FSDP")


def data_parallel(model, fsdp: bool = False):
    """A model wrapped for training over the processes: DDP (a full copy per process, gradients
    averaged), or with `fsdp` FSDP2 `fully_shard` per decoder layer and on the root (parameters,
    gradients and optimizer state sharded; with bf16, all-gathers in bf16, reductions in fp32).
    Unchanged in a single process. Create the optimizer after this call."""
    if world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = getattr(model, "autocast_dtype", None)
        precision = dict(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else {}
        policy = MixedPrecisionPolicy(**precision)
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def micro_batches(rows: torch.Tensor, widths: torch.Tensor, max_rows: int, max_tokens: int = 0,
                  even: bool = True) -> list[torch.Tensor]:
    """`rows` split into micro-batches (gradient accumulation: memory only, the loss is the same).
    `widths` (B, 2) holds each row's prompt and response tokens without padding: a micro-batch's
    trimmed forward is (longest prompt + longest response) wide. Without `max_tokens`: chunks of
    `max_rows`. With it: rows sorted by width are packed while rows x width <= max_tokens (at most
    `max_rows`), so short responses share a micro-batch; a row wider than the budget goes alone.
    With `even`, every process gets as many micro-batches (DDP and FSDP forwards are collective): a
    process with fewer splits its largest ones."""
    if not max_tokens:
        return list(rows.split(max_rows))
    order = rows[torch.argsort(widths[rows].sum(-1), descending=True, stable=True)]
    prompt, response = widths[order].T.tolist()
    batches, start = [], 0
    while start < len(order):
        end, longest = start + 1, [prompt[start], response[start]]
        while end < len(order) and end - start < max_rows:
            wider = [max(longest[0], prompt[end]), max(longest[1], response[end])]
            if (end - start + 1) * sum(wider) > max_tokens:
                break
            end, longest = end + 1, wider
        batches.append(order[start:end])
        start = end
    target = int(all_max(torch.tensor(len(batches)))) if even else len(batches)
    while len(batches) < target:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise RuntimeError("cannot split the micro-batches evenly over the processes")
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


def mini_batch_parts(rows: torch.Tensor, n_mini_batches: int,
                     seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's part of each mini-batch of one shuffle of every process's `rows`: `[(rows
    (m,), weights (m,))]`, so N processes train on the mini-batches one process would make.

    The global batch is numbered rank by rank; a permutation drawn from `seed` alone (None: no
    shuffle) orders it, cut into `n_mini_batches` contiguous mini-batches. Each part lists its rows
    in global order. Parts are padded to the largest process's with fillers (the first row, weight
    0: no loss), so that every process runs as many micro-batches."""
    counts = gather_lists([len(rows)])
    first = sum(counts[: rank()])  # global number of this process's first row
    n = sum(counts)
    if seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mine = [part[(part >= first) & (part < first + len(rows))].sort().values.to(rows.device) - first
            for part in order.tensor_split(n_mini_batches)]
    sizes = all_max(torch.tensor([len(part) for part in mine])).tolist()
    filler = rows[:1] if len(rows) else rows.new_zeros(1)
    return [(torch.cat([rows[part], filler.repeat(size - len(part))]),
             torch.cat([torch.ones(len(part)), torch.zeros(size - len(part))]).to(rows.device))
            for part, size in zip(mine, sizes)]


def sum_over_processes(sums: dict, *keys: str) -> None:
    """Replace `sums[key]` for each key by its sum over all processes (token sums and counts of a
    step's metrics, so that their ratios are global means)."""
    totals = all_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)).tolist()
    sums.update(zip(keys, totals))


def reduce_metrics(metrics: dict) -> dict:
    """Every process's metrics averaged over the processes (time/* take the slowest)."""
    if world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    means, maxima = all_sum(values) / world_size(), all_max(values)
    return {k: float(maxima[i] if k.startswith("time/") else means[i]) for i, k in enumerate(keys)}


# --------------------------------------------------------------------------------------------------
# Seeding, checkpoints and resume
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict:
    """Every random state a run uses: Python, NumPy, torch CPU (`generate`'s sampling) and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dicts(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded) CPU state dicts of a plain, DDP or FSDP2 model and its optimizer, keyed by
    parameter name. Every process must call it; under FSDP only rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizers = [optimizer] if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, optimizers, options=options)
    return model_sd, (optim_sd if optimizer is not None else None)


def load_full_state_dicts(model, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Load what `full_state_dicts` returned (every process reads the same checkpoint file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    optimizers = [optimizer] if optimizer is not None else []
    set_state_dict(model, optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd or {},
                   options=StateDictOptions(full_state_dict=True))


def _optimizer_key(name: str) -> str:
    return "optimizer" if name == "policy" else f"{name}_optimizer"  # checkpoint.pt's keys


def _shards(models: dict) -> dict:
    """This process's shards of `models`' ({name: (model, optimizer)}) state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return {name: dict(zip(("model", "optimizer"), get_state_dict(model, [optimizer])))
            for name, (model, optimizer) in models.items()}


def _script() -> str:
    """The running script's name (`grpo` for algorithms/grpo.py), checked against checkpoints."""
    return Path(sys.argv[0]).stem


def _digest(obj, h=None):
    """sha256 of a checkpoint's content, in order: every tensor's and array's bytes (read in place),
    the repr of any other value. A byte flipped in checkpoint.pt changes it, unless nothing loads
    it."""
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for key, value in obj.items():
            h.update(f"{key!r}:".encode())
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for value in obj:
            _digest(value, h)
    elif isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8))
    else:
        h.update(repr(obj).encode())
    return h


def save_checkpoint(run_dir: Path, step: int, state: dict, models: dict | None = None) -> Path:
    """Write `state` (sampler, method state), the step, every process's RNG states and `models`
    ({name: (model, optimizer)}) so that a run continues exactly. Every process calls it.

    Without FSDP rank 0 writes it all into `checkpoint.pt` (optimizers under `optimizer` for the
    policy, `<name>_optimizer` for others). Under FSDP each process writes its own shards with
    torch.distributed.checkpoint into a fresh folder `checkpoint-<step>/` (nothing is gathered), and
    checkpoint.pt keeps the rest and that folder's name. Atomic: checkpoint.pt is written beside the
    old one, flushed and renamed over it after every shard is on disk; a kill at any moment leaves
    the previous checkpoint.pt and its folder intact; older folders are deleted after the rename."""
    gathered = gather_lists([(rng_state(), str(run_dir))])
    states, run_dir = [rng for rng, _ in gathered], Path(gathered[0][1])  # rank 0's folder name
    state = dict(state)
    if any(is_fsdp(model) for model, _ in (models or {}).values()):
        import torch.distributed.checkpoint as dcp

        shards = run_dir / f"checkpoint-{step}"
        if is_main() and shards.exists():
            shutil.rmtree(shards)  # left by a save that was killed
        torch.distributed.barrier()
        with disk_errors(run_dir, shards):
            dcp.save(_shards(models), checkpoint_id=shards)  # returns when every file is written
        state["shards"] = shards.name
    else:
        for name, (model, optimizer) in (models or {}).items():
            state[name], state[_optimizer_key(name)] = full_state_dicts(model, optimizer)
    path = run_dir / CHECKPOINT_FILE
    if not is_main():
        RUN_STATE["checkpoint_step"] = step
        return path
    tmp = path.with_suffix(".tmp")
    content = {"script": _script(), "step": step, "rng": states[0], "rng_per_process": states,
               **state}
    with disk_errors(run_dir, tmp), open(tmp, "wb") as f:
        torch.save({**content, "sha256": _digest(content).hexdigest()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    RUN_STATE["checkpoint_step"] = step
    for folder in run_dir.glob("checkpoint-*"):
        if folder.is_dir() and folder.name != state.get("shards"):
            shutil.rmtree(folder)
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    """A run folder's checkpoint.pt (models go back with `load_models`). Each process restores its
    own RNG states here: resume with as many processes as wrote the checkpoint."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise UserInputError(f"no checkpoint to resume from: {path} does not exist")
    corrupt = f"checkpoint {path} is corrupt or incomplete"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        states = checkpoint.get("rng_per_process", [checkpoint["rng"]])
    except Exception as exc:
        raise UserInputError(f"{corrupt} ({type(exc).__name__}); it cannot be resumed") from None
    if "sha256" not in checkpoint or "script" not in checkpoint:
        raise UserInputError(f"checkpoint {path} carries no checksum (written by an older version "
                             "of this code); it cannot be verified or resumed")
    if checkpoint.pop("sha256") != _digest(checkpoint).hexdigest():
        raise UserInputError(f"checkpoint {path} is corrupt (its checksum does not match its "
                             "content); it cannot be resumed")
    if checkpoint["script"] != _script():
        raise UserInputError(f"checkpoint {path} was written by {checkpoint['script']}.py, not "
                             f"{_script()}.py; resume it with its own script")
    if len(states) != world_size():
        raise UserInputError(f"checkpoint {path} was written by {len(states)} process(es); resume "
                             f"it with as many (torchrun --nproc-per-node {len(states)}), not "
                             f"{world_size()}")
    try:
        set_rng_state(states[rank()])
    except Exception as exc:
        raise UserInputError(f"{corrupt} ({type(exc).__name__}); it cannot be resumed") from None
    if "shards" in checkpoint:
        checkpoint["shards"] = path.parent / checkpoint["shards"]
    return checkpoint


def load_models(checkpoint: dict, models: dict) -> None:
    """Restore `models` ({name: (model, optimizer)}) from `load_checkpoint`'s result: from a sharded
    (FSDP) checkpoint each process reads its own shards, from one file every process takes it all.
    """
    if "shards" not in checkpoint:
        for name, (model, optimizer) in models.items():
            optimizer_sd = checkpoint[_optimizer_key(name)]
            load_full_state_dicts(model, optimizer, checkpoint[name], optimizer_sd)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = _shards(models)
    try:
        dcp.load(shards, checkpoint_id=checkpoint["shards"])  # in place, into this process's shards
    except (Exception, dcp.CheckpointException) as exc:  # the latter: any process's failure, in all
        failed = isinstance(exc, dcp.CheckpointException)
        cause = next(iter(exc.failures.values()))[0] if failed else exc
        raise UserInputError(f"checkpoint {checkpoint['shards']} is corrupt or incomplete "
                             f"({type(cause).__name__}); it cannot be resumed") from None
    for name, (model, optimizer) in models.items():
        set_state_dict(model, [optimizer], model_state_dict=shards[name]["model"],
                       optim_state_dict=shards[name]["optimizer"])


def given_flags(args_class, argv: list[str] | None = None) -> set[str]:
    """The `args_class` fields named on the command line (`--num-steps 5`, `--num_steps=5`,
    `--no-bf16`)."""
    fields = {f.replace("_", "-"): f for f in args_class.__dataclass_fields__}
    tokens = sys.argv[1:] if argv is None else argv
    names = {token[2:].split("=")[0].replace("_", "-")
             for token in tokens if token.startswith("--")}
    names |= {name[3:] for name in names if name.startswith("no-")}  # a boolean's negative form
    return {fields[name] for name in names if name in fields}


def resume_config(args, args_class, argv: list[str] | None = None):
    """With `--resume RUN_DIR`, the run's saved config.json replaces the command line (the run goes
    on with its own settings); `--num-steps` sets the step the resumed run goes to. Any other flag
    given with another value than the saved one is refused, not ignored. Returns the args to use."""
    if not args.resume:
        return args
    config_file = Path(args.resume) / "config.json"
    if not config_file.is_file():
        raise UserInputError(f"cannot resume: {config_file} does not exist")
    try:
        saved = json.loads(config_file.read_text())
        restored = args_class(**{**saved, "resume": args.resume})
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserInputError(f"cannot resume: {config_file} is not this script's config "
                             f"({exc})") from None
    given = given_flags(args_class, argv) - {"resume", "num_steps"}
    changed = sorted(f for f in given if getattr(args, f) != getattr(restored, f))
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        given_value, saved_value = getattr(args, changed[0]), getattr(restored, changed[0])
        raise UserInputError(f"--resume keeps the run's own settings; {flag} was given "
                             f"({given_value!r}, the run has {saved_value!r}); only --num-steps "
                             "may change")
    if "num_steps" in given_flags(args_class, argv):  # the resumed run goes to this step
        restored.num_steps = args.num_steps
    return restored


def save_pretrained(model, tokenizer, path: Path, dtype: str = "auto") -> None:
    """A folder that `from_pretrained` loads: the weights in `dtype` ("auto": the compute dtype,
    bfloat16 with --bf16 on a GPU, else float32), the base model's own generation_config (not the
    stripped one sampling uses) and the tokenizer. Every process calls it; rank 0 writes. Under FSDP
    the weights are gathered one tensor at a time onto rank 0's CPU, so host memory holds them once.
    """
    hf = unwrap(model)
    if dtype == "auto":
        dtype = getattr(hf, "autocast_dtype", None) or torch.float32
    else:
        dtype = getattr(torch, dtype)
    copies, weights = {}, {}  # copies by source tensor: tied weights stay one tensor
    for name, tensor in hf.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            # FSDP: full_tensor() is a collective
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            cast = dtype if full.is_floating_point() else full.dtype
            copies[id(tensor)] = full.detach().to("cpu", cast) if is_main() else None
        weights[name] = copies[id(tensor)]
    if is_main():
        with disk_errors(path.parent, path):  # a partly written model folder is removed
            hf.save_pretrained(path, state_dict=weights)
            hf.config.dtype = dtype  # save_pretrained recorded the training weights' dtype
            hf.config.save_pretrained(path)
            getattr(hf, "base_generation_config", hf.generation_config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        print(f"model saved to {path}")


# --------------------------------------------------------------------------------------------------
# Training guards, run folder and logging
# --------------------------------------------------------------------------------------------------


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (under FSDP over all shards); returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """Skip optimizer steps whose gradient norm is not finite (a non-finite loss makes it so); after
    `patience` in a row, stop the run (the last checkpoint is the last good state). The weights of
    every watched optimizer are checked after each of its steps (finite gradients can still make
    them overflow): non-finite weights stop the run at once, before a checkpoint can save them."""

    def __init__(self, *optimizers, patience: int = 5):
        self.patience, self.in_a_row, self.skipped = patience, 0, 0
        for optimizer in optimizers:
            self.watch(optimizer)

    def watch(self, optimizer) -> None:
        optimizer.register_step_post_hook(lambda opt, *_: self.check_weights(opt))

    def check_weights(self, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in params]
        maxima = [p.abs().amax().float() for p in local if p.numel()]
        largest = torch.stack(maxima or [torch.zeros(())])
        bad = (~torch.isfinite(largest.amax())).float()  # nan stays nan through amax
        if not all_sum(bad).item():  # every process stops together (FSDP shards differ)
            return
        steps = [s["step"] for s in optimizer.state.values() if "step" in s]
        at = f"optimizer step {int(steps[0])}" if steps else "an optimizer step"
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingStopped(f"the weights are not finite after {at} (learning rate {lr} too "
                              f"large?); stopping before they are saved: {where_to_resume()}")

    def step_ok(self, grad_norm: torch.Tensor) -> bool:
        if torch.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            raise TrainingStopped(f"{self.in_a_row} optimizer steps in a row had a non-finite "
                                  f"loss or gradient; stopping: {where_to_resume()}")
        return False


class RunLogger:
    """Writes `runs/<run_name>/config.json`, `metrics.jsonl` and `completions.jsonl`; mirrors to W&B
    with `--track`. Under torchrun only rank 0 writes."""

    def __init__(self, args, run_name: str, resume_step: int | None = None):
        """A new run folder (rank 0 makes it, every process takes its name), or with `resume_step`
        the existing one: records after that step (written after the checkpoint, before a crash) are
        dropped, since the resumed run writes them again; the files are replaced atomically."""
        self.wandb, self.enabled = None, is_main()
        if resume_step is None:
            made = _new_run_dir(Path(args.output_dir), run_name) if self.enabled else None
            self.run_dir = Path(gather_lists([made] if self.enabled else [])[0])  # rank 0's
        else:
            self.run_dir = Path(args.resume)
            if args.num_steps < resume_step:
                raise UserInputError(f"--num-steps {args.num_steps} is below the run's checkpoint "
                                     f"(step {resume_step}); a resumed run can only go on")
        RUN_STATE.update(run_dir=self.run_dir, checkpoint_step=resume_step)
        self.args, self.metrics_file = args, None
        if self.enabled and resume_step is not None:
            for name in ("metrics.jsonl", "completions.jsonl"):
                path = self.run_dir / name
                if path.exists():
                    kept = [line for line in path.read_text().splitlines(keepends=True)
                            if line.strip() and _record_step(line) <= resume_step]
                    atomic_write(path, "".join(kept))

    def _start(self) -> None:
        """config.json and W&B, with the first record: after the method's set-up, so that the config
        holds what the set-up filled in (dph_rl's rehearsal set size)."""
        args, self.config = self.args, asdict(self.args)
        atomic_write(self.run_dir / "config.json", json.dumps(self.config, indent=2) + "\n")
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity,
                                    name=self.run_dir.name, config=self.config,
                                    dir=str(self.run_dir), save_code=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.metrics_file is None:
            self._start()
        numbers = (int, float, np.floating, torch.Tensor)
        values = {k: float(v) if isinstance(v, numbers) else v for k, v in metrics.items()}
        record = {"step": step, **values}
        with disk_errors(self.run_dir):  # a torn last line is dropped on resume (_record_step)
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with disk_errors(self.run_dir), open(self.run_dir / "completions.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        """The end of the run: under torchrun every process waits for the others, then leaves the
        process group (a process that tears gloo down while another still talks to it can abort)."""
        if self.enabled and self.metrics_file is not None:
            self.metrics_file.close()
            if self.wandb is not None:
                self.wandb.finish()
        if _distributed():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _new_run_dir(output_dir: Path, name: str) -> str:
    """Make `output_dir/name`, or `name-2`, `name-3`, ...: created exclusively, so two runs started
    in the same second (a parallel sweep) never share a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = output_dir / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return str(path)
        except FileExistsError:
            continue
    raise UserInputError(f"could not make a new run folder {output_dir / name}: 10000 folders of "
                         "that name exist")


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: a kill at any moment leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with disk_errors(path.parent, tmp), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line torn by a kill mid-write: drop it


SUMMARY_KEYS = {"charts/accuracy": "acc", "charts/response_length_mean": "len",
                "losses/policy_loss": "loss", "losses/entropy": "ent", "losses/cov": "cov",
                "losses/approx_kl": "kl~", "losses/clipfrac": "clip", "time/step": "s"}


def summary_line(step: int, num_steps: int, metrics: dict) -> str:
    """One line per step: a fixed set of headline metrics, in a fixed order."""
    parts = [f"step {step}/{num_steps}"]
    parts += [f"{short} {metrics[key]:.3g}"
              for key, short in SUMMARY_KEYS.items() if key in metrics]
    parts += [f"{key[len('eval/'):]} {value:.3f}" for key, value in metrics.items()
              if key.startswith("eval/") and key.count("/") == 1]  # the trained task's only
    if "eval/second_skill/greedy_acc" in metrics:
        parts.append(f"second_skill greedy_acc {metrics['eval/second_skill/greedy_acc']:.3f}")
    return " | ".join(parts)
