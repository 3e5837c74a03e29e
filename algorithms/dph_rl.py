# docs and experiment results can be found at README.md#dph-rl
"""DPH-RL: Diversity-Preserving Hybrid RL, f-divergence rehearsal of the base model's successes.

Paper: "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in Reinforcement
Learning with Verifiable Reward", Li et al. 2025, arXiv:2509.07430.
Before training the initial policy pi0 samples k responses per training prompt; prompts solved k/k
form the rehearsal set D_pef (correct responses y and their token log-probs logp0 are stored), the
others the exploration set D_exp. With u_t = exp(logp_theta(y_t) - logp0(y_t)):
    L = L_exp + eta L_pef,  L_exp = GRPO on D_exp prompts,  L_pef = token-mean over D_pef of f(u_t)
    js          f(u) = u log u - (u + 1) log((u + 1) / 2)                   eta 0.05-0.2
    forward-kl  f(u) = u - log u - 1,  D_f = KL(pi0 || pi)                  eta 0.01-0.05
    alpha       f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1)),  a in (0, 1)    eta 0.01-0.05
f is convex with f(1) = f'(1) = 0, so L_pef estimates D_f(pi || pi0) = E_pi0[f(u)] on pi0's own
samples: no online reference model is needed.

Implementation details:
1. Pre-pass: presample_k samples (the rollout's temperature / top_p / top_k) for each of the first
   --pool-prompts training prompts; >= rehearsal_threshold (default k) correct puts a prompt in
   D_pef, any other (all-wrong too) in D_exp, the only RL prompts. The paper regenerates 16 samples
   per D_pef prompt and keeps the correct ones; we store the pre-pass's own (same pi0).
2. Stored responses are re-padded to one layout and their logp0 computed once in it (no_grad), so
   u = 1 exactly before the first update. Every optimizer step adds rehearsal_batch_size of them, in
   a seeded shuffled cycle (the 128 sampled responses are all RL data). L_exp and L_pef are each a
   token-mean over their own tokens; the gradient flows only through logp_theta.
3. The log-ratio is clamped to +-20. forward-kl also caps f at 10, as the authors' code (verl's
   low_var_kl, arguments swapped) whose DPH-F results the paper reports: a token with u outside
   (1.67e-5, 13.6) gets no gradient, so one runaway token cannot dominate the token-mean, at the
   price of not being pulled back. js and alpha have no cap (nor in that code).
4. The GRPO part is grpo.py's with clip 0.2 / 0.28 (clip-higher), no KL, no dual-clip (the
   authors' c = 3); losses/entropy, cov, approx_kl and clipfrac are the RL batch's. An empty D_pef
   trains on L_exp alone, with a warning. Baseline --divergence reverse-kl: no pre-pass, RL prompts
   from the whole split, eta weighs a k3 KL(pi || pi0) per RL token (online reference, as --beta).
5. The checkpoint holds D_pef (with logp0), D_exp and the rehearsal order: --resume skips the
   pre-pass and continues exactly. Under torchrun the processes split the pre-pass (all hold the
   same D_pef and D_exp) and each step's RL and rehearsal rows; token counts are global.

Defaults (tuned on the previous embedded task; --eta 0.2 is js's), the paper's settings and the
alpha generator's limits: benchmarks/results/dph_rl_rover.md.
"""

import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

# find common.py from any working directory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@dataclass
class Args:
    # Experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (data order, sampling, initialisation of everything random)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use CUDA when available"""
    track: bool = False
    """if toggled, log to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rlvr-clean"
    """the W&B project name"""
    wandb_entity: str | None = None
    """the W&B entity (team)"""
    output_dir: str = "runs"
    """every run writes to `<output_dir>/<run_name>/`"""
    save_model: bool = False
    """if toggled, save the trained policy as a `save_pretrained` folder in the run folder"""
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of --save-model weights (auto: bfloat16 after --bf16 training on a GPU, else fp32)"""
    log_completions_every: int = 50
    """write a few sampled completions to completions.jsonl every this many steps (0: never)"""
    checkpoint_every: int = 50
    """save what it takes to continue exactly (over the last) every this many steps (0: never)"""
    resume: str = ""
    """a run folder to continue from its last checkpoint and flags (only --num-steps may change)"""

    # Model & data
    model_name: str = common.EMBEDDED_MODEL
    """local folder or hub id of the base model (default: the tiny model shipped in the repo)"""
    task: str = "countdown"
    """common.TASKS: countdown (step answers), countdown-expr (an expression), arith, gsm8k, math"""
    dataset: str = ""
    """gsm8k / math only: hub id or local folder of train and test files (default: the task's)"""
    max_new_tokens: int | None = None
    """maximum response length in tokens (default: countdown 32, gsm8k 512, math 1024)"""
    max_prompt_length: int | None = None
    """longer prompts are left out, with a count (default: position limit - response length)"""
    temperature: float = 1.0
    """sampling temperature of rollouts and sampled evaluation; log-probs divide the logits by it"""
    top_p: float = 1.0
    """nucleus sampling threshold (1.0 = off)"""
    top_k: int = 0
    """top-k sampling (0 = off)"""
    eval_every: int = 50
    """evaluate every this many steps, and before the first and after the last (0: only these)"""
    eval_prompts: int = 512
    """number of prompts to evaluate on (countdown adds half as many of its second skill)"""
    eval_split: Literal["test", "val"] = "test"
    """split to evaluate on: val (carved from train) for tuning, test only for reported numbers"""
    eval_samples: int = 8
    """samples per prompt for mean@n and pass@k during training"""
    final_eval_samples: int = 64
    """samples per prompt in the evaluations before and after training (pass@k up to this k)"""
    eval_base: bool = True
    """evaluate the base model before training (benchmarks/run.py evaluates it once per suite)"""
    probe_every: int = 0
    """every this many steps: entropy and accuracy on fixed training prompts (0: never)"""
    probe_prompts: int = 64
    """training prompts in that probe set, 8 samples each drawn with a fixed seed"""

    # Scale (GPU and several processes; see README.md#real-models-and-several-gpus)
    bf16: bool = True
    """on a GPU, bfloat16 autocast (weights, gradients and AdamW stay fp32); CPUs run fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, about a third more compute)"""
    micro_batch_tokens: int = 0
    """token budget per forward pass: rows x (longest prompt + longest response) <= it (0: off)"""
    rollout: Literal["generate", "static", "continuous"] = "generate"
    """generation: HF generate (dynamic KV cache), static-cache generate, or continuous batching"""
    fsdp: bool = False
    """under torchrun: FSDP2-shard weights, gradients, optimizer state (default: DDP, full copy)"""

    # Algorithm specific
    num_steps: int = 200
    """number of rollouts (training steps)"""
    prompts_per_step: int = 16
    """prompts sampled per rollout"""
    group_size: int = 8
    """responses sampled per prompt (G)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant)"""
    num_mini_batches: int = 1
    """optimizer steps per epoch over a rollout"""
    num_epochs: int = 1
    """passes over each rollout"""
    micro_batch_size: int = 64
    """responses per forward/backward (gradient accumulation; memory only, the loss is unchanged)"""
    clip_eps_low: float = 0.2
    """PPO clip range below 1"""
    clip_eps_high: float = 0.28
    """PPO clip range above 1 (clip-higher, as the paper)"""
    divergence: Literal["js", "forward-kl", "alpha", "reverse-kl"] = "js"
    """js / forward-kl / alpha: rehearsal f-divergence on stored base-model successes;
    reverse-kl: k3 KL to an online reference"""
    eta: float = 0.2
    """weight of the divergence term (authors: js 0.05-0.2, forward-kl and alpha 0.01-0.05)"""
    alpha: float = 0.2
    """the alpha of --divergence alpha, in (0, 1) (near 0: reverse KL, near 1: forward KL)"""
    presample_k: int = 8
    """responses sampled per pool prompt by the initial model before training"""
    rehearsal_threshold: int = 8
    """a pool prompt with at least this many of its presample_k samples correct joins D_pef"""
    pool_prompts: int = 2000
    """training prompts pre-sampled and split (the rest go unused; countdown's split has 10,000)"""
    rehearsal_batch_size: int = 32
    """stored rehearsal responses per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold"""

    # to be filled in runtime (not flags: hidden from the command line)
    batch_size: tyro.conf.Suppress[int] = 0
    """responses per rollout (prompts_per_step * group_size)"""
    mini_batch_size: tyro.conf.Suppress[int] = 0
    """responses per optimizer step (batch_size // num_mini_batches)"""
    rehearsal_prompts: tyro.conf.Suppress[int] = 0
    """size of D_pef (pool prompts the initial model solves rehearsal_threshold times or more)"""
    exploration_prompts: tyro.conf.Suppress[int] = 0
    """size of D_exp (the prompts RL samples from)"""


def grpo_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor, scale_rewards: bool,
                    eps: float = 1e-6):
    """Group-relative advantage per response. rewards, prompt_index: (B,).
    Returns (advantages (B,), zero_std (n_groups,)).

    Example: rewards [1, 0, 0, 0] in one group -> [1.5, -0.5, -0.5, -0.5] (unbiased std 0.5), or
    [0.75, -0.25, -0.25, -0.25] without scaling."""
    n_groups = int(prompt_index.max()) + 1
    counts = torch.bincount(prompt_index, minlength=n_groups).to(rewards.dtype)  # (n_groups,)
    means = rewards.new_zeros(n_groups).index_add_(0, prompt_index, rewards) / counts  # (n_groups,)
    centred = rewards - means[prompt_index]  # (B,)
    sq = torch.zeros_like(means).index_add_(0, prompt_index, centred**2)
    stds = (sq / (counts - 1).clamp(min=1)).sqrt()  # unbiased
    advantages = centred / (stds[prompt_index] + eps) if scale_rewards else centred
    return advantages, stds < 1e-8


def ppo_clip_loss(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """Per-token PPO clipped surrogate. All (B, T). Returns (loss, ratio, clipped) where clipped
    marks the tokens whose clipped term is the active (larger) one."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = ref_logp - logp; >= 0,
    gradient through logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def f_divergence(log_ratio, divergence: str, alpha: float = 0.2):
    """Per-token generator f(u) at u = exp(log_ratio), log_ratio = logp - logp0 clamped to +-20.
    (B, T) -> (B, T).

    js: u log u - (u + 1) log((u + 1) / 2); forward-kl: u - log u - 1, capped at 10 as the authors'
    code (no gradient for u outside (1.67e-5, 13.6)); alpha: (u^(1-alpha) - (1-alpha) u - alpha) /
    (alpha (alpha - 1)), alpha in (0, 1). All are convex and >= 0 with f(1) = f'(1) = 0."""
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    u = log_ratio.exp()
    if divergence == "js":
        # log((u + 1) / 2), stable for large u
        log_half_u_plus_one = torch.nn.functional.softplus(log_ratio) - math.log(2.0)
        return u * log_ratio - (u + 1) * log_half_u_plus_one
    if divergence == "forward-kl":
        return (u - log_ratio - 1).clamp(max=10.0)
    if divergence == "alpha":
        # the same numerator as (u^(1-alpha) - 1) - (1-alpha)(u - 1): exactly 0 at u = 1, precise
        # near it
        numerator = torch.expm1((1 - alpha) * log_ratio) - (1 - alpha) * torch.expm1(log_ratio)
        return numerator / (alpha * (alpha - 1))
    raise ValueError(f"no rehearsal generator for divergence {divergence!r}")


def rehearsal_token_loss(logp, logp0, divergence: str, alpha: float = 0.2):
    """f(u_t) per stored rehearsal token and u_t, both (B, T). logp0 is the stored initial-model
    log-prob (a constant)."""
    log_ratio = logp - logp0.detach()
    u = log_ratio.detach().clamp(-20.0, 20.0).exp()  # for the metric only
    return f_divergence(log_ratio, divergence, alpha), u


def split_pool(correct, prompt_index, n_prompts: int, threshold: int):
    """correct, prompt_index: (N,), the pre-pass verdicts and the pool prompt each response answers.
    Returns (n_prompts,) bool: True for the rehearsal set (at least `threshold` correct), False for
    the exploration set."""
    n_correct = torch.zeros(n_prompts, dtype=torch.long)
    n_correct.index_add_(0, prompt_index, correct.long())  # (n_prompts,)
    return n_correct >= threshold


@dataclass
class RehearsalSet:
    """Stored initial-model successes, padded to one layout. Response token t of row n is
    `input_ids[n, -T + t]`."""

    # (N, P + T): the left-padded prompt, then the response right-padded to T = max_new_tokens
    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # (N, P + T)
    mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    logp0: torch.Tensor  # (N, T) initial-model log-probs of the response tokens (with temperature)

    @property
    def widths(self) -> torch.Tensor:
        """(N, 2) real prompt and response tokens per row, for token-budget micro-batches."""
        prompt_tokens = self.attention_mask[:, : -self.mask.shape[1]].sum(-1)  # (N,)
        return torch.stack([prompt_tokens, self.mask.sum(-1).long()], -1)


def presample_pool(policy, tokenizer, task, items: list[dict], presample_k: int,
                   sampling: common.Sampling) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Sample presample_k responses per item with the initial policy, printing progress. Returns the
    verdicts (N,) bool, the item index of each response (N,), and (item index, prompt ids, response
    ids) for every correct response, in item order. Under torchrun each process samples its share of
    the items and every process gets all the results."""
    # equal shares, padded: every process makes as many generate calls
    mine, n_mine, first = common.padded_share(items)
    share = len(mine)
    prompts_per_chunk = max(1, 1024 // presample_k)
    correct, item_index, kept, start_time = [], [], [], time.time()
    for start in range(0, share, prompts_per_chunk):
        chunk = mine[start : start + prompts_per_chunk]
        prompts = [task.prompt(item) for item in chunk]
        ro = common.rollout(policy, tokenizer, prompts, presample_k, sampling=sampling)
        for b, i in enumerate(ro.prompt_index.tolist()):
            if start + i >= n_mine:  # padding
                continue
            ok = task.verify(chunk[i], ro.texts[b])[0]
            correct.append(ok)
            item_index.append(first + start + i)
            if ok:
                prompt_mask = ro.attention_mask[b, : ro.prompt_len].bool()
                prompt_ids = ro.input_ids[b, : ro.prompt_len][prompt_mask]
                response_ids = ro.response_ids[b][ro.response_mask[b].bool()]
                kept.append((first + start + i, prompt_ids.cpu(), response_ids.cpu()))
        done = start + len(chunk)
        if done == share or (start // prompts_per_chunk) % 5 == 4:
            pool_done = min(done * common.world_size(), len(items))  # this process's, pool-scaled
            correct_frac, seconds = sum(correct) / max(1, len(correct)), time.time() - start_time
            print(f"pre-sampling with the initial model: {pool_done}/{len(items)} prompts, "
                  f"{correct_frac:.3f} correct, {seconds:.0f} s", flush=True)
    correct, item_index, kept = (common.gather_lists(x) for x in (correct, item_index, kept))
    return torch.tensor(correct, dtype=torch.bool), torch.tensor(item_index, dtype=torch.long), kept


def build_rehearsal_set(policy, responses: list[tuple], pad_id: int, args, device) -> RehearsalSet:
    """Pad (prompt ids, response ids) pairs to one layout and compute their initial-model log-probs
    once."""
    max_prompt, T = max(len(p) for p, _ in responses), args.max_new_tokens
    input_ids = torch.full((len(responses), max_prompt + T), pad_id, dtype=torch.long,
                           device=device)  # (N, P + T)
    attention_mask = torch.zeros_like(input_ids)
    mask = torch.zeros(len(responses), T, device=device)
    for n, (prompt_ids, response_ids) in enumerate(responses):
        input_ids[n, max_prompt - len(prompt_ids) : max_prompt] = prompt_ids
        input_ids[n, max_prompt : max_prompt + len(response_ids)] = response_ids
        # the response block is attended in full, as in rollout
        attention_mask[n, max_prompt - len(prompt_ids) :] = 1
        mask[n, : len(response_ids)] = 1
    with torch.no_grad():
        logp0 = common.response_logprobs(policy, input_ids, attention_mask, T, args.temperature,
                                         micro_batch_size=args.micro_batch_size,
                                         micro_batch_tokens=args.micro_batch_tokens).logp
    return RehearsalSet(input_ids, attention_mask, mask, logp0 * mask)


def rehearsal_backward(policy, rehearsal: RehearsalSet, rows: torch.Tensor, total_tokens,
                       loss_scale: float, args, sums: dict) -> None:
    """Backward of eta * L_pef on `rows` of the step's rehearsal batch, micro-batched; adds its
    metrics to `sums`. L_pef is the token-mean over the whole batch of `total_tokens` tokens, of
    which `rows` may be a part; the loss is multiplied by `loss_scale` (the number of processes when
    each holds a part: DDP/FSDP average the gradients)."""
    for idx in common.micro_batches(rows, rehearsal.widths, args.micro_batch_size,
                                    args.micro_batch_tokens):
        logp = common.response_logprobs(policy, rehearsal.input_ids[idx],
                                        rehearsal.attention_mask[idx], args.max_new_tokens,
                                        args.temperature).logp  # (b, T)
        f_u, u = rehearsal_token_loss(logp, rehearsal.logp0[idx], args.divergence,
                                      args.alpha)  # (b, T) each
        rehearsal_loss = loss_scale * (f_u * rehearsal.mask[idx]).sum() / total_tokens
        (args.eta * rehearsal_loss).backward()
        sums["rehearsal_loss"] += rehearsal_loss.item()
        sums["rehearsal_u"] += (u * rehearsal.mask[idx]).sum().item()
        sums["rehearsal_tokens"] += rehearsal.mask[idx].sum().item()


if __name__ == "__main__":
    args = common.resume_config(tyro.cli(Args), Args)
    # every flag in range (else exit 2) before a model loads; fills in the task's max_new_tokens
    common.check_shared_args(args)
    args.batch_size = args.prompts_per_step * args.group_size
    args.mini_batch_size = args.batch_size // args.num_mini_batches
    if args.group_size < 2:  # a violation is one line `error: --flag VALUE: why`, exit code 2
        raise common.FlagError("group_size", args.group_size,
                               "must be >= 2: the group is the baseline")
    if args.batch_size % args.num_mini_batches:
        raise common.FlagError("num_mini_batches", args.num_mini_batches,
                               f"must divide prompts_per_step x group_size = {args.batch_size}")
    if args.rehearsal_threshold > args.presample_k:
        raise common.FlagError("rehearsal_threshold", args.rehearsal_threshold,
                               f"must be <= --presample-k {args.presample_k}")
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: processes (torchrun) and seeding; each process samples with its own seed,
    # all draw the same prompts
    rank, world_size, device = common.init_distributed(args.cuda)
    if args.prompts_per_step % world_size or args.mini_batch_size % world_size:
        raise common.FlagError("prompts_per_step", args.prompts_per_step,
                               f"it and each mini-batch ({args.mini_batch_size} responses) "
                               f"must split over {world_size} processes")
    common.seed_everything(args.seed + rank, args.torch_deterministic)

    # ALGO LOGIC: every process takes an equal share of each rehearsal batch
    if args.divergence != "reverse-kl" and args.rehearsal_batch_size % world_size:
        raise common.FlagError("rehearsal_batch_size", args.rehearsal_batch_size,
                               f"must be a multiple of the {world_size} processes")

    # TRY NOT TO MODIFY: model, data, logging
    policy, tokenizer = common.load_model_and_tokenizer(args.model_name, device, args.bf16,
                                                        args.gradient_checkpointing)
    policy = common.data_parallel(policy, args.fsdp)
    # prompt + response fit the model's positions
    args.max_prompt_length = common.check_position_limit(policy, args)
    task = common.get_task(args.task, args.dataset, tokenizer, args.max_prompt_length)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    train_items = task.train_items()
    eval_items = task.eval_items(args.eval_split, args.eval_prompts)
    probe_items = train_items[: args.probe_prompts]  # fixed prompts for the entropy probe
    sampler = common.PromptSampler(train_items, args.prompts_per_step, args.seed)
    guard = common.NonFiniteGuard(optimizer)  # also checks the weights after each step
    start_step = 1
    if args.resume:
        checkpoint = common.load_checkpoint(args.resume)
        common.load_models(checkpoint, {"policy": (policy, optimizer)})
        sampler.load_state_dict(checkpoint["sampler"])
        guard.skipped, start_step = checkpoint["skipped_steps"], checkpoint["step"] + 1
    logger = common.RunLogger(args, run_name, resume_step=start_step - 1 if args.resume else None)
    sampling = common.Sampling.from_args(args)  # for rollouts, evaluations and any pre-pass
    # memory bounds of the no-grad passes
    micro = dict(micro_batch_size=args.micro_batch_size, micro_batch_tokens=args.micro_batch_tokens)
    print(f"run folder: {logger.run_dir}")
    print(f"max new tokens: {args.max_new_tokens}")

    # ALGO LOGIC: split the pool with the initial model (f-divergences) or load the online
    # reference (reverse-kl)
    ref_model, rehearsal, rehearsal_order = None, None, None
    if args.divergence == "reverse-kl":
        ref_model, _ = common.load_model_and_tokenizer(args.model_name, device, args.bf16,
                                                       frozen=True)
        ref_model.eval().requires_grad_(False)
        args.exploration_prompts = len(train_items)
    elif args.resume:
        # the split, the stored successes and both data orders come from the checkpoint, not a new
        # pre-pass
        exploration_items = checkpoint["exploration_items"]
        args.rehearsal_prompts, args.exploration_prompts = checkpoint["set_sizes"]
        sampler = common.PromptSampler(exploration_items, args.prompts_per_step, args.seed)
        sampler.load_state_dict(checkpoint["sampler"])
        if checkpoint["rehearsal"] is not None:
            stored = {k: v.to(device) for k, v in checkpoint["rehearsal"].items()}
            rehearsal = RehearsalSet(**stored)
            rehearsal_order = common.PromptSampler(list(range(len(rehearsal.mask))),
                                                   args.rehearsal_batch_size, args.seed)
            rehearsal_order.load_state_dict(checkpoint["rehearsal_order"])
    else:
        pool = train_items[: args.pool_prompts]
        # (N,), (N,) over the whole pool
        correct, pool_index, correct_responses = presample_pool(
            policy, tokenizer, task, pool, args.presample_k, sampling=sampling)
        in_rehearsal = split_pool(correct, pool_index, len(pool),
                                  args.rehearsal_threshold)  # (n_pool,)
        exploration_items = [item for item, keep in zip(pool, in_rehearsal.tolist()) if not keep]
        if not exploration_items:
            raise common.UserInputError("every pool prompt is in the rehearsal set: "
                                        "raise --rehearsal-threshold or --pool-prompts")
        rehearsal_responses = [(prompt, response) for i, prompt, response in correct_responses
                               if in_rehearsal[i]]
        if rehearsal_responses:
            rehearsal = build_rehearsal_set(policy, rehearsal_responses, tokenizer.pad_token_id,
                                            args, device)
            rehearsal_order = common.PromptSampler(list(range(len(rehearsal_responses))),
                                                   args.rehearsal_batch_size, args.seed)
        else:
            print("warning: no pool prompt reached the rehearsal threshold; training on the "
                  "exploration loss alone")
        sampler = common.PromptSampler(exploration_items, args.prompts_per_step, args.seed)
        args.rehearsal_prompts = int(in_rehearsal.sum())
        args.exploration_prompts = len(exploration_items)
        print(f"rehearsal set: {args.rehearsal_prompts} prompts, {len(rehearsal_responses)} "
              f"responses; exploration set: {args.exploration_prompts} prompts")

    # TRY NOT TO MODIFY: evaluate the base model, then train
    if start_step == 1 and (args.eval_base or args.probe_every):
        metrics = {}
        if args.eval_base:
            metrics.update(common.evaluate(policy, tokenizer, task, eval_items,
                                           args.final_eval_samples, sampling=sampling))
        if args.probe_every:
            metrics.update(common.probe(policy, tokenizer, task, probe_items, sampling, **micro))
        logger.log(0, metrics)
        print(common.summary_line(0, args.num_steps, metrics), flush=True)
    for step in range(start_step, args.num_steps + 1):
        step_start = time.time()

        # TRY NOT TO MODIFY: rollout and rewards
        items = common.shard(sampler.next_batch())  # this process's prompts
        prompts = [task.prompt(item) for item in items]
        ro = common.rollout(policy, tokenizer, prompts, args.group_size, sampling=sampling)
        response_items = [items[i] for i in ro.prompt_index.tolist()]  # each response's prompt item
        verdicts = [task.verify(item, text) for item, text in zip(response_items, ro.texts)]
        rewards = torch.tensor([float(correct) for correct, _ in verdicts], device=device)  # (B,)
        mask = ro.response_mask.float()  # (B, T)
        response_len = ro.response_ids.shape[1]  # T
        time_generate = time.time() - step_start

        # TRY NOT TO MODIFY: log-probs of the sampling policy, frozen for the whole rollout
        logprob_start = time.time()
        with torch.no_grad():
            old = common.response_logprobs(policy, ro.input_ids, ro.attention_mask, response_len,
                                           args.temperature, with_entropy=True, **micro)
            old_logp, entropy = old.logp, old.entropy  # (B, T) each
        time_logprobs = time.time() - logprob_start

        # ALGO LOGIC: reference log-probs for the KL term
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = common.response_logprobs(ref_model, ro.input_ids, ro.attention_mask,
                                                    response_len, args.temperature, **micro).logp
            time_logprobs = time.time() - logprob_start  # the reference pass is log-prob time too

        # ALGO LOGIC: advantages
        seq_advantages, zero_std = grpo_advantages(rewards, ro.prompt_index, scale_rewards=True)
        advantages = seq_advantages[:, None] * mask  # (B, T)

        # ALGO LOGIC: loss and updates (num_epochs x num_mini_batches optimizer steps,
        # micro-batched)
        train_start = time.time()
        sums = defaultdict(float)
        rows = torch.arange(len(rewards), device=device)  # this process's responses
        policy.train()
        for epoch in range(args.num_epochs):
            # one shuffle of the global batch, the same on every process; each process trains on its
            # rows of each mini-batch (fillers of weight 0 even out the processes' shares)
            shuffle_seed = hash((args.seed, step, epoch))
            for mb, weights in common.mini_batch_parts(rows, args.num_mini_batches, shuffle_seed):
                mb_mask = mask[mb] * weights[:, None]  # (m, T); a filler has no token
                mb_tokens = common.all_sum(mb_mask.sum())  # the whole mini-batch's, all processes
                optimizer.zero_grad()
                positions = torch.arange(len(mb), device=device)  # into mb
                for part in common.micro_batches(positions, ro.widths[mb], args.micro_batch_size,
                                                 args.micro_batch_tokens):
                    idx, idx_mask = mb[part], mb_mask[part]  # (b,), (b, T)
                    logp = common.response_logprobs(policy, ro.input_ids[idx],
                                                    ro.attention_mask[idx], response_len,
                                                    args.temperature).logp  # (b, T)
                    token_loss, ratio, clipped = ppo_clip_loss(
                        logp, old_logp[idx], advantages[idx], args.clip_eps_low, args.clip_eps_high)
                    if ref_logp is not None:
                        kl = k3_kl(logp, ref_logp[idx])
                        token_loss = token_loss + args.eta * kl
                        sums["kl"] += (kl.detach() * idx_mask).sum().item()
                    # L_exp: token-mean over the mini-batch; this process's share, times the
                    # processes (DDP/FSDP average the gradients)
                    loss = world_size * (token_loss * idx_mask).sum() / mb_tokens
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = logp - old_logp[idx]
                        sums["approx_kl"] += (((ratio - 1) - log_ratio) * idx_mask).sum().item()
                        sums["clipfrac"] += (clipped.float() * idx_mask).sum().item()
                        sums["tokens"] += idx_mask.sum().item()
                        sums["policy_loss"] += loss.item()
                # eta * L_pef: token-mean over a batch of stored base-model successes
                if rehearsal is not None:
                    # the same global batch on every process (same seeded order), this process's
                    # share of it
                    rehearsal_rows = common.shard(rehearsal_order.next_batch())
                    rehearsal_rows = torch.tensor(rehearsal_rows, device=device)
                    # the whole batch's token count, over all processes
                    rehearsal_tokens = common.all_sum(rehearsal.mask[rehearsal_rows].sum())
                    rehearsal_backward(policy, rehearsal, rehearsal_rows, rehearsal_tokens,
                                       world_size, args, sums)
                grad_norm = common.clip_grad_norm(policy, args.max_grad_norm)
                if guard.step_ok(grad_norm):  # a non-finite loss or gradient skips the step
                    optimizer.step()
                    sums["grad_norm"] += grad_norm.item()
                    sums["applied_steps"] += 1
                sums["optimizer_steps"] += 1
        common.sum_over_processes(sums, "approx_kl", "clipfrac", "kl", "tokens", "rehearsal_u",
                                  "rehearsal_tokens")
        time_train = time.time() - train_start

        # TRY NOT TO MODIFY: metrics
        with torch.no_grad():  # the covariance of old log-probs and advantages, over all processes
            mean_logp = common.masked_mean(old_logp, mask, all_processes=True)
            mean_adv = common.masked_mean(advantages, mask, all_processes=True)
            centred_logp = (old_logp - mean_logp) * mask
            centred_adv = (advantages - mean_adv) * mask
            cov = common.masked_mean(centred_logp * centred_adv, mask, all_processes=True).item()
        time_step = time.time() - step_start
        metrics = {
            "charts/reward_mean": rewards.mean().item(),
            "charts/accuracy": rewards.mean().item(),
            "charts/unparseable_frac": sum(not parsed for _, parsed in verdicts) / len(verdicts),
            "charts/response_length_mean": mask.sum(-1).mean().item(),
            "charts/truncated_frac": ro.truncated.float().mean().item(),
            "charts/frac_zero_std_groups": zero_std.float().mean().item(),
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/tokens_per_sec": mask.sum().item() / time_step,
            "charts/skipped_steps": guard.skipped,
            "losses/policy_loss": sums["policy_loss"] / sums["optimizer_steps"],
            "losses/entropy": common.masked_mean(entropy, mask, all_processes=True).item(),
            "losses/cov": cov,
            "losses/approx_kl": sums["approx_kl"] / sums["tokens"],
            "losses/clipfrac": sums["clipfrac"] / sums["tokens"],
            "losses/grad_norm": sums["grad_norm"] / max(1, sums["applied_steps"]),
            "time/generate": time_generate,
            "time/logprobs": time_logprobs,
            "time/train": time_train,
            "time/step": time_step,
        }

        # ALGO LOGIC: method metrics
        if ref_model is not None:
            metrics["losses/kl"] = sums["kl"] / sums["tokens"]
        metrics["charts/rehearsal_prompts"] = args.rehearsal_prompts
        metrics["charts/exploration_prompts"] = args.exploration_prompts
        if rehearsal is not None:
            metrics["losses/rehearsal_loss"] = sums["rehearsal_loss"] / sums["optimizer_steps"]
            metrics["losses/rehearsal_u_mean"] = sums["rehearsal_u"] / sums["rehearsal_tokens"]

        # TRY NOT TO MODIFY: mean over processes, evaluation, logging
        metrics = common.reduce_metrics(metrics)  # mean over processes
        last_step = step == args.num_steps
        if args.probe_every and (step % args.probe_every == 0 or last_step):
            metrics.update(common.probe(policy, tokenizer, task, probe_items, sampling, **micro))
        if args.eval_every and step % args.eval_every == 0 and not last_step:
            metrics.update(common.evaluate(policy, tokenizer, task, eval_items, args.eval_samples,
                                           sampling=sampling))
        if last_step:
            metrics.update(common.evaluate(policy, tokenizer, task, eval_items,
                                           args.final_eval_samples, sampling=sampling))
        logger.log(step, metrics)
        print(common.summary_line(step, args.num_steps, metrics), flush=True)

        # TRY NOT TO MODIFY: a few sampled completions
        if args.log_completions_every and step % args.log_completions_every == 0:
            samples = [{"prompt": prompts[i], "response": ro.texts[b], "reward": rewards[b].item()}
                       for b, i in enumerate(ro.prompt_index.tolist()[: args.group_size * 2])]
            logger.log_completions(step, samples)

        # ALGO LOGIC: checkpoint; with the pool's split, the stored successes and their order
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            state = {"sampler": sampler.state_dict(), "skipped_steps": guard.skipped,
                     "exploration_items": sampler.items,
                     "set_sizes": (args.rehearsal_prompts, args.exploration_prompts),
                     "rehearsal": vars(rehearsal) if rehearsal else None,
                     "rehearsal_order": rehearsal_order and rehearsal_order.state_dict()}
            models = {"policy": (policy, optimizer)}
            common.save_checkpoint(logger.run_dir, step, state, models=models)

    # TRY NOT TO MODIFY: the trained policy
    if args.save_model:
        common.save_pretrained(policy, tokenizer, logger.run_dir / "model", args.save_dtype)
    logger.close()
