# docs and experiment results can be found at README.md#rover
"""ROVER: Random Policy Valuation, a minimalist RL for LLM reasoning.

Paper: "Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards", He et al.
2025, arXiv:2509.24981. In the deterministic, tree-shaped MDP of RLVR (binary terminal reward),
acting on the Q-values of the uniform random policy is optimal; ROVER parameterises Q by the
policy's own log-probs and regresses it on the centred reward plus the uniform-policy value of the
next state. For response i of group g and its valid tokens t:
    Q_t = rho (logp_t - old_logp_t)
    M(s) = mean_v log_softmax(z(s)/tau)_v = mean(z/tau) - logsumexp(z/tau)
    Qbar_{t+1} = rho (M_theta(s_{t+1}) - M_old(s_{t+1})),  0 after the last valid token
    target_t = sg[ r_i - mean_g r + beta Qbar_{t+1} ],      loss = token-mean_t (Q_t - target_t)^2

Implementation details:
1. Rewards are 1/0 from the task's verifier, centred within the group (prompt index, never
   position), no std (the paper and its countdown code); --std-norm divides by the unbiased group
   std + 1e-6 (the released math recipe). The centred reward goes to every valid token.
2. M_old is a (B, T) tensor from old_logp's no-grad pass (common.response_logprobs with
   with_vocab_mean=True: full vocabulary, fp32, chunked over rows); M_theta comes from the training
   forward. M at position t is the state before response token t, so token t's next state is t + 1;
   after the last valid token (EOS or the max_new_tokens-th) comes a terminal state of value 0.
3. The whole target is stop-gradient (M detached by construction, r constant): gradients flow only
   through logp in Q. No reference model, critic, ratio clipping or KL (losses/clipfrac logs 0).
4. Several optimizer steps per rollout (num_mini_batches 4: the paper's 128-prompt batch in
   32-prompt mini-batches). On the first, theta = old, so Q = Qbar = 0 and the gradient is
   -2 rho r~ grad logp: plain REINFORCE on the centred reward (tested); later mini-batches see
   Q != 0 and a moving target.
5. losses/cov uses the centred reward broadcast to tokens (the first mini-batch's advantage). The
   vocabulary mean is over the model's full (padded) vocabulary, as the authors' code.
6. Gradient clipping at max_grad_norm; AdamW, constant learning rate, no weight decay; token-mean
   over the whole mini-batch (micro-batches only bound memory).
7. Under torchrun each process holds whole groups (centred rewards, Q and targets are local); the
   mini-batches are one shuffle of the global batch; the denominator counts all processes (tested).

Defaults (learning rate 2.5e-5, tuned on the previous embedded task) and the paper's settings:
benchmarks/results/dph_rl_rover.md.
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
    learning_rate: float = 2.5e-5
    """AdamW learning rate (constant; tuned: GRPO's 1e-4 spread over 4 mini-batches; paper: 1e-6)"""
    num_mini_batches: int = 4
    """optimizer steps per epoch over a rollout (paper: 4; 1: REINFORCE on the centred reward)"""
    num_epochs: int = 1
    """passes over each rollout"""
    micro_batch_size: int = 64
    """responses per forward/backward (gradient accumulation; memory only, the loss is unchanged)"""
    rho: float = 1.0
    """temperature rho of Q = rho (logp - old_logp) (paper: 1; 0.01 and 4 were worse)"""
    beta: float = 1.0
    """weight of the next state's uniform-policy value in the target (paper: 1; 0.2-1 stable,
    0 collapses the entropy)"""
    std_norm: bool = False
    """divide the group-centred reward by the group std (released math recipe; the paper centres)"""
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


def next_state_value(vocab_mean, old_vocab_mean, mask, rho: float):
    """Uniform-policy value of the state after each response token,
    Qbar_{t+1} = rho (M_theta - M_old)(s_{t+1}). All (B, T); M at position t is the state before
    token t. The state after the last valid token is terminal: 0."""
    value = rho * (vocab_mean - old_vocab_mean) * mask  # (B, T), value of the state before token t
    terminal = torch.zeros_like(value[:, :1])  # (B, 1)
    return torch.cat([value[:, 1:], terminal], dim=1)  # (B, T), shifted to the next state


def rover_loss(logp, old_logp, vocab_mean, old_vocab_mean, centred_rewards, mask, rho: float,
               beta: float):
    """Per-token squared error (Q_t - sg[r~ + beta Qbar_{t+1}])^2. logp etc. (B, T),
    centred_rewards (B,). Returns (loss, q, next_value), each (B, T); only q carries gradient
    (through logp)."""
    q = rho * (logp - old_logp)  # (B, T)
    next_value = next_state_value(vocab_mean, old_vocab_mean, mask, rho)  # (B, T)
    target = (centred_rewards[:, None] + beta * next_value).detach()  # (B, T), stop-gradient
    return (q - target) ** 2, q, next_value


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

        # ALGO LOGIC: log-probs of the sampling policy, frozen for the whole rollout; and from the
        # same pass its vocabulary mean M_old
        logprob_start = time.time()
        with torch.no_grad():
            old = common.response_logprobs(policy, ro.input_ids, ro.attention_mask, response_len,
                                           args.temperature, with_entropy=True,
                                           with_vocab_mean=True, **micro)
            old_logp, entropy, old_vocab_mean = old.logp, old.entropy, old.vocab_mean  # (B, T) each
        time_logprobs = time.time() - logprob_start

        # ALGO LOGIC: group-centred rewards (r - mean_g r, or divided by the group std with
        # --std-norm)
        centred_rewards, zero_std = grpo_advantages(rewards, ro.prompt_index, args.std_norm)  # (B,)
        # (B, T), the first mini-batch's REINFORCE weight (for losses/cov)
        advantages = centred_rewards[:, None] * mask

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
                    current = common.response_logprobs(policy, ro.input_ids[idx],
                                                       ro.attention_mask[idx], response_len,
                                                       args.temperature, with_vocab_mean=True)
                    token_loss, q, next_value = rover_loss(current.logp, old_logp[idx],
                                                           current.vocab_mean, old_vocab_mean[idx],
                                                           centred_rewards[idx], idx_mask, args.rho,
                                                           args.beta)  # (b, T) each
                    # token-mean over the whole mini-batch, times the processes: DDP/FSDP average
                    # gradients
                    loss = world_size * (token_loss * idx_mask).sum() / mb_tokens
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = current.logp - old_logp[idx]
                        k3 = log_ratio.exp() - 1 - log_ratio
                        sums["approx_kl"] += (k3 * idx_mask).sum().item()
                        sums["q"] += (q * idx_mask).sum().item()
                        sums["next_value"] += (next_value * idx_mask).sum().item()
                        sums["tokens"] += idx_mask.sum().item()
                        sums["policy_loss"] += loss.item()
                grad_norm = common.clip_grad_norm(policy, args.max_grad_norm)
                if guard.step_ok(grad_norm):  # a non-finite loss or gradient skips the step
                    optimizer.step()
                    sums["grad_norm"] += grad_norm.item()
                    sums["applied_steps"] += 1
                sums["optimizer_steps"] += 1
        # global token means
        common.sum_over_processes(sums, "approx_kl", "clipfrac", "q", "next_value", "tokens")
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

        # ALGO LOGIC: method metrics (ROVER has no clipping: losses/clipfrac above stays 0)
        metrics["losses/q_loss"] = metrics["losses/policy_loss"]
        metrics["losses/q_mean"] = sums["q"] / sums["tokens"]
        metrics["losses/next_value_mean"] = sums["next_value"] / sums["tokens"]

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
