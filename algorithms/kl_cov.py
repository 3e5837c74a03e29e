# docs and experiment results can be found at README.md#clip-cov-and-kl-cov
"""KL-Cov: policy gradient with a KL penalty on the highest-covariance tokens, to keep entropy up.

Paper: "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", Cui et al.
2025, arXiv:2505.22617 (section 5; code PRIME-RL/Entropy-Mechanism-of-RL, verl's `kl_cov`).

For the N valid tokens i of one mini-batch (GRPO advantages A_i, d_i = logp_i - old_logp_i):
    cov_i = (A_i - mean_m A) (logp_i - mean_m logp)       (detached; the entropy change is ~ -Cov)
    I_KL = the k tokens of largest cov_i,  k = max(int(ratio N), 1)
    L_i = -A_i exp(d_i) + beta |d_i| [i in I_KL]          (no ratio clipping at all)
    loss = sum_i L_i / N

Implementation details:
1. Rewards, groups, advantages, mask, log-probs and aggregation are grpo.py's (std-normalised group
   advantages, old_logp frozen per rollout, token-mean by default), with no KL to a reference.
2. The penalty is zero on-policy: on a rollout's first mini-batch d = 0 and torch's gradient of |d|
   at 0 is 0, so that step is plain policy gradient. Its old log-probs come from the selection pass
   (same micro-batches, same padded width), so d is exactly 0, not float noise whose sign the |d|
   gradient would follow. The penalty acts from the second optimizer step on, hence 4 mini-batches
   by default (the paper: 8); with one mini-batch and one epoch the script says so and runs plain
   policy gradient (4x grpo.py's optimizer steps: compare with grpo.py --num-mini-batches 4).
3. Selection is over the whole mini-batch, so that the update does not depend on how the batch is
   cut into micro-batches or processes (the authors select per GPU micro-batch). One no-grad pass of
   the current policy, in the gradient pass's micro-batches (equal log-probs), gives the detached
   logp for the covariance and the top-k: one extra forward per mini-batch, memory bounded by
   micro_batch_size.
4. The covariance's means are over valid tokens; padding is never selected. Top-k is deterministic
   (torch.topk), with no covariance bounds. Under torchrun the means, N and the top-k are the whole
   mini-batch's (top-k of every process's covariances, in rank order); each keeps its own.
5. The KL estimate is the code's k1-abs |logp - old_logp|, beta = 1 (set explicitly: one framework's
   config default of 0.1 is wrong for this method). losses/clipfrac is 0 by construction;
   losses/approx_kl is the usual k3; losses/clip_cov_selected counts the penalised tokens per
   optimizer step (clip_cov.py's name, so both share a column); losses/kl_cov_penalty is the mean
   beta |d| over them. losses/cov is the rollout-level covariance over old_logp, as in every file.

Defaults (--kl-cov-ratio 0.2, 100x the paper's, tuned on the previous embedded task) and the paper's
settings: benchmarks/results/clip_kl_cov.md.
"""

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
    num_mini_batches: int = 4
    """optimizer steps per epoch over a rollout; the first (on-policy) has no penalty (paper: 8)"""
    num_epochs: int = 1
    """passes over each rollout"""
    micro_batch_size: int = 64
    """responses per forward/backward (gradient accumulation; memory only, the loss is unchanged)"""
    kl_cov_ratio: float = 0.2
    """share of the N valid tokens of a mini-batch penalised: k = max(int(ratio N), 1)
    (paper: 2e-3 for 7B, 2e-4 for 32B)"""
    kl_cov_coef: float = 1.0
    """weight beta of the |logp - old_logp| penalty on the top-k covariance tokens (paper: 1.0)"""
    scale_rewards: bool = True
    """divide group-centred rewards by the group std (--no-scale-rewards for Dr. GRPO)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean (DAPO), seq-mean-token-mean (original GRPO), seq-mean-token-sum-norm (Dr. GRPO)"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold"""

    # to be filled in runtime (not flags: hidden from the command line)
    batch_size: tyro.conf.Suppress[int] = 0
    """responses per rollout (prompts_per_step * group_size)"""
    mini_batch_size: tyro.conf.Suppress[int] = 0
    """responses per optimizer step (batch_size // num_mini_batches)"""


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


def token_covariance(logp, advantages, mask):
    """Per-token covariance term cov_i = (A_i - mean A)(logp_i - mean logp) from detached tensors,
    all (B, T); the means are over the valid tokens only and padding gets 0. Its mean over the valid
    tokens is the batch covariance."""
    logp, advantages = logp.detach(), advantages.detach()
    centred_adv = advantages - common.masked_mean(advantages, mask)
    centred_logp = logp - common.masked_mean(logp, mask)
    return centred_adv * centred_logp * mask


def kl_cov_select(cov, mask, ratio: float):
    """Tokens that get the KL-Cov penalty: the k = max(int(ratio * N), 1) valid tokens of largest
    cov (deterministic top-k, no bounds), N = number of valid tokens. cov, mask: (B, T).
    Returns selected (B, T) bool."""
    valid = mask.bool()
    n_valid = int(valid.sum())
    k = min(max(int(ratio * n_valid), 1), n_valid)
    # (B * T,), on the CPU: ties break the same way whatever the device
    scores = cov.masked_fill(~valid, float("-inf")).flatten().cpu()
    top = scores.topk(k).indices.to(cov.device)  # (k,) positions in the flattened batch
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    selected[top] = True
    return selected.view_as(cov)


def kl_cov_loss(logp, old_logp, advantages, selected, beta: float):
    """Unclipped policy-gradient token loss -A exp(d) plus beta |d| on the selected tokens,
    d = logp - old_logp. All (B, T). Returns (loss, ratio, penalty); the penalty (beta |d| on
    selected tokens, else 0) is 0 with 0 gradient at d = 0, i.e. on the first, on-policy
    mini-batch."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    penalty = beta * log_ratio.abs() * selected
    return -advantages * ratio + penalty, ratio, penalty


def aggregate_loss(token_loss, mask, mode: str, total_tokens=None, total_seqs=None,
                   max_new_tokens=None):
    """Reduce a (b, T) token loss to a scalar. `total_tokens`/`total_seqs` are the counts of the
    whole optimizer step (the mini-batch) when this call sees one micro-batch of it; summing the
    calls over the micro-batches then gives the mini-batch loss exactly. Defaults: this batch is the
    whole step."""
    total_tokens = mask.sum() if total_tokens is None else total_tokens
    total_seqs = mask.shape[0] if total_seqs is None else total_seqs
    if mode == "token-mean":
        return (token_loss * mask).sum() / total_tokens
    if mode == "seq-mean-token-mean":
        seq_means = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (b,)
        return seq_means.sum() / total_seqs
    if mode == "seq-mean-token-sum-norm":
        max_new_tokens = mask.shape[1] if max_new_tokens is None else max_new_tokens
        return (token_loss * mask).sum() / (total_seqs * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}")


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
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: processes (torchrun) and seeding; each process samples with its own seed,
    # all draw the same prompts
    rank, world_size, device = common.init_distributed(args.cuda)
    if args.prompts_per_step % world_size or args.mini_batch_size % world_size:
        raise common.FlagError("prompts_per_step", args.prompts_per_step,
                               f"it and each mini-batch ({args.mini_batch_size} responses) "
                               f"must split over {world_size} processes")
    common.seed_everything(args.seed + rank, args.torch_deterministic)

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

    # ALGO LOGIC: the penalty acts from the second optimizer step on a rollout
    if args.num_mini_batches * args.num_epochs == 1:
        print("note: one optimizer step per rollout keeps the KL-Cov penalty at zero "
              "(plain policy gradient)")

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

        # ALGO LOGIC: advantages
        seq_advantages, zero_std = grpo_advantages(rewards, ro.prompt_index, args.scale_rewards)
        advantages = seq_advantages[:, None] * mask  # (B, T)

        # ALGO LOGIC: loss and updates (num_epochs x num_mini_batches optimizer steps,
        # micro-batched)
        train_start = time.time()
        sums = defaultdict(float)
        rows = torch.arange(len(rewards), device=device)  # this process's responses
        policy.train()
        on_policy = True  # until the rollout's first optimizer step
        for epoch in range(args.num_epochs):
            # one shuffle of the global batch, the same on every process; each process trains on its
            # rows of each mini-batch (fillers of weight 0 even out the processes' shares)
            shuffle_seed = hash((args.seed, step, epoch))
            parts = common.mini_batch_parts(rows, args.num_mini_batches, shuffle_seed)
            for mb, weights in parts:
                mb_mask = mask[mb] * weights[:, None]  # (m, T); a filler has no token
                mb_tokens = common.all_sum(mb_mask.sum())  # the whole mini-batch's, all processes
                positions = torch.arange(len(mb), device=device)  # into mb
                micro_batches = common.micro_batches(positions, ro.widths[mb],
                                                     args.micro_batch_size, args.micro_batch_tokens)
                # the selection sees the whole mini-batch: a no-grad pass of the current policy,
                # micro-batch by micro-batch so that its log-probs equal the gradient pass's exactly
                with torch.no_grad():
                    mb_logp = torch.zeros_like(mb_mask)  # (m, T)
                    for part in micro_batches:
                        idx = mb[part]
                        mb_logp[part] = common.response_logprobs(
                            policy, ro.input_ids[idx], ro.attention_mask[idx], response_len,
                            args.temperature).logp
                    # the policy is still the sampling one: these are its old log-probs, computed
                    # exactly as the gradient pass computes them (d = 0)
                    if on_policy:
                        old_logp[mb[weights > 0]] = mb_logp[weights > 0]
                        on_policy = False
                    # every process's rows of the mini-batch, (m, T) each to (M, T'), the same on
                    # all processes: the means, N and the top-k are the whole mini-batch's
                    mb_tensors = (mb_logp, advantages[mb], mb_mask)
                    all_logp, all_adv, all_mask = map(common.gather_rows, mb_tensors)
                    cov = token_covariance(all_logp, all_adv, all_mask)  # (M, T')
                    selected = kl_cov_select(cov, all_mask, args.kl_cov_ratio)  # (M, T')
                    mb_selected = common.own_rows(selected, mb_mask)  # (m, T), this process's rows
                    mb_cov = common.own_rows(cov, mb_mask)  # (m, T)
                    sums["selected"] += mb_selected.sum().item()
                    sums["selected_cov"] += mb_cov[mb_selected].sum().item()
                    sums["selected_entropy"] += entropy[mb][mb_selected].sum().item()
                optimizer.zero_grad()
                for part in micro_batches:
                    idx, idx_mask = mb[part], mb_mask[part]  # (b,), (b, T)
                    logp = common.response_logprobs(policy, ro.input_ids[idx],
                                                    ro.attention_mask[idx], response_len,
                                                    args.temperature).logp  # (b, T)
                    token_loss, ratio, penalty = kl_cov_loss(logp, old_logp[idx], advantages[idx],
                                                             mb_selected[part], args.kl_cov_coef)
                    # this process's share of the mini-batch loss, times the processes: DDP/FSDP
                    # average gradients
                    mb_loss = aggregate_loss(token_loss, idx_mask, args.loss_agg, mb_tokens,
                                             args.mini_batch_size, args.max_new_tokens)
                    loss = world_size * mb_loss
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = logp - old_logp[idx]
                        sums["approx_kl"] += (((ratio - 1) - log_ratio) * idx_mask).sum().item()
                        # no clipping: clipfrac stays 0
                        sums["penalty"] += (penalty * idx_mask).sum().item()
                        sums["tokens"] += idx_mask.sum().item()
                        sums["policy_loss"] += loss.item()
                grad_norm = common.clip_grad_norm(policy, args.max_grad_norm)
                if guard.step_ok(grad_norm):  # a non-finite loss or gradient skips the step
                    optimizer.step()
                    sums["grad_norm"] += grad_norm.item()
                    sums["applied_steps"] += 1
                sums["optimizer_steps"] += 1
        # global token means
        common.sum_over_processes(sums, "approx_kl", "clipfrac", "tokens")
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

        # ALGO LOGIC: KL-Cov metrics (count per optimizer step over the whole mini-batch, all
        # processes; means over the selected tokens)
        common.sum_over_processes(sums, "selected", "selected_cov", "selected_entropy", "penalty")
        n_selected = sums["selected"]
        metrics["losses/clip_cov_selected"] = n_selected / sums["optimizer_steps"]
        metrics["losses/clip_cov_selected_cov"] = sums["selected_cov"] / n_selected
        metrics["losses/clip_cov_selected_entropy"] = sums["selected_entropy"] / n_selected
        metrics["losses/kl_cov_penalty"] = sums["penalty"] / n_selected

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

        # TRY NOT TO MODIFY: checkpoint
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            state = {"sampler": sampler.state_dict(), "skipped_steps": guard.skipped}
            models = {"policy": (policy, optimizer)}
            common.save_checkpoint(logger.run_dir, step, state, models=models)

    # TRY NOT TO MODIFY: the trained policy
    if args.save_model:
        common.save_pretrained(policy, tokenizer, logger.run_dir / "model", args.save_dtype)
    logger.close()
