# docs and experiment results can be found at README.md#prime
"""PRIME: Process Reinforcement through Implicit Rewards (implicit PRM + leave-one-out + PPO).

Paper: "Process Reinforcement through Implicit Rewards", Cui et al. 2025, arXiv:2502.01456 (code:
PRIME-RL/PRIME and verl's `recipe/prime`).

For response i of a kept group (n responses to one prompt), outcome acc_i in {0, 1}, valid tokens t:
    q_t = log pi_phi(y_t) - log pi_ref(y_t);   L_PRM = BCE(sigmoid(beta sum_t q_t), acc_i)
    r_t = beta q_t / max_{i,t} |sum_{s>=t} beta q_s|                     (one batch-wide scale)
    a_t = r_t n/(n-1) - sum_j mean_s(r_j,s)/(n-1) + [t = last] (acc_i - mean_{j!=i} acc_j)
    A_t = whiten(sum_{s>=t} gamma^(s-t) a_s),   rho_t = exp(logp_t - old_logp_t)
    L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))

Implementation details:
1. Three models from the base: the policy, the implicit PRM pi_phi (trained) and its frozen
   reference pi_ref. `--prm-ref policy` takes the policy's old log-probs as pi_ref (verl's
   `ref_type: policy`), two copies. Checkpoints hold the PRM and its optimizer too.
2. 32 prompts x 4 = 128 responses (GRPO's budget); a prompt is kept iff acc_low <= its accuracy <=
   acc_high (1-3 of 4 correct) and, with --filter-truncated, none is truncated (charts/kept_frac).
   The budget is fixed and the batch varies (the original code samples until enough prompts pass,
   verl oversamples 4x and keeps a quarter). No kept prompt: no update (charts/empty_steps).
3. q_t uses temperature-scaled fp32 log-probs, 0 after EOS. The PRM takes one epoch over the kept
   responses in num_mini_batches steps (AdamW, no weight decay, clip prm_max_grad_norm).
   --prm-update after (default, the original code): rewards from the loss's own forward, the PRM
   before its step; before (verl's default): step, then re-score.
4. One scale for the kept batch's process rewards (prime_norm batch_norm): |process return| <= 1,
   and beta only sets the PRM loss's sharpness.
5. Leave-one-out per source in the code's form (m_i: row i's mean reward; for process rewards this
   adds (r_t - m_i)/(n-1) to the paper's r_t - mean_{j!=i} m_j, summing to 0 over a response). The
   two sources add 1:1, become returns with gamma and are whitened over the kept valid tokens
   (unbiased variance), as both codes do (the paper uses the returns). Groups: by prompt index.
6. Policy: PPO clip 0.2, token-mean over kept tokens, no KL or entropy bonus; old_logp as grpo.py's.
7. Under torchrun each process filters its own prompts; everything over the kept batch is global
   (scale, whitening, denominators, mini-batches), and zero-weight rows pad each process's part of a
   mini-batch to the largest, so all make the same forward/backward calls.

Defaults (tuned on the previous embedded task), the paper's settings, metrics and memory notes:
benchmarks/results/prime.md.
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
import torch.nn.functional as F
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
    prompts_per_step: int = 32
    """prompts sampled per rollout, before the accuracy filter (32 x 4 = GRPO's 128; paper: 256)"""
    group_size: int = 4
    """responses sampled per prompt (n; the leave-one-out baselines need n >= 2)"""
    learning_rate: float = 1e-4
    """policy AdamW learning rate (constant; the paper: 5e-7 for 7B models)"""
    num_mini_batches: int = 1
    """optimizer steps per epoch over the kept responses (policy and PRM alike)"""
    num_epochs: int = 1
    """passes of the policy over each rollout (the PRM always makes one)"""
    micro_batch_size: int = 64
    """responses per forward/backward (gradient accumulation; memory only, the loss is unchanged)"""
    clip_eps_low: float = 0.2
    """PPO clip range below 1"""
    clip_eps_high: float = 0.2
    """PPO clip range above 1 (DAPO clip-higher: 0.28)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean (PRIME, DAPO), seq-mean-token-mean (original GRPO) or seq-mean-token-sum-norm
    (Dr. GRPO)"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold of the policy"""
    prm_beta: float = 0.05
    """beta of the process reward beta * (log pi_phi - log pi_ref) and of the PRM's cross-entropy"""
    prm_learning_rate: float = 1e-4
    """implicit PRM AdamW learning rate (constant; the paper: 1e-6 for 7B; 0 freezes
    pi_phi = pi_ref: q = 0, outcome rewards only)"""
    prm_max_grad_norm: float = 10.0
    """gradient clipping threshold of the implicit PRM"""
    prm_update: Literal["after", "before"] = "after"
    """after: rewards from the PRM before its update (one forward pass, the original code);
    before: update, then re-score"""
    prm_ref: Literal["freeze", "policy"] = "freeze"
    """the PRM's reference: a frozen copy of the base model, or the policy's old log-probs"""
    acc_low: float = 0.2
    """keep a prompt only if the accuracy of its responses is at least this"""
    acc_high: float = 0.8
    """keep a prompt only if the accuracy of its responses is at most this"""
    filter_truncated: bool = True
    """drop every prompt with a truncated response (no EOS within max_new_tokens)"""
    gamma: float = 1.0
    """discount of the returns built from the token-level advantages"""

    # to be filled in runtime (not flags: hidden from the command line)
    batch_size: tyro.conf.Suppress[int] = 0
    """responses sampled per rollout (prompts_per_step * group_size); the kept ones train"""


def keep_prompts(acc, truncated, prompt_index, acc_low: float, acc_high: float,
                 filter_truncated: bool):
    """PRIME's accuracy filter. acc, truncated, prompt_index: (B,).
    Returns (keep (n_prompts,) bool, group_acc (n_prompts,)).

    Example with n = 4, bounds [0.2, 0.8]: a prompt with 0 or 4 correct responses is dropped, 1 to 3
    correct is kept unless one of its responses is truncated (with filter_truncated)."""
    n_prompts = int(prompt_index.max()) + 1
    counts = torch.bincount(prompt_index, minlength=n_prompts).to(acc.dtype)  # (n_prompts,)
    group_acc = acc.new_zeros(n_prompts).index_add_(0, prompt_index, acc) / counts  # (n_prompts,)
    keep = (group_acc >= acc_low) & (group_acc <= acc_high)
    if filter_truncated:
        n_truncated = torch.zeros_like(group_acc)
        n_truncated.index_add_(0, prompt_index, truncated.to(acc.dtype))  # (n_prompts,)
        keep &= n_truncated == 0
    return keep, group_acc


@torch.no_grad()
def prm_reference_logprobs(prm_ref, old_logp, input_ids, attention_mask, response_len: int,
                           temperature: float, **micro):
    """log pi_ref of the response tokens (B, T), never differentiable: from the frozen copy, or with
    `prm_ref` None (--prm-ref policy) the policy's old log-probs."""
    if prm_ref is None:
        return old_logp.detach()
    return common.response_logprobs(prm_ref, input_ids, attention_mask, response_len, temperature,
                                    **micro).logp


def prm_ce_loss(q, mask, acc, beta: float, total_seqs=None, weight=None):
    """Cross-entropy of the implicit PRM on outcome labels, BCE(sigmoid(beta * sum_t q_t), acc),
    summed over this batch and divided by `total_seqs` (the whole optimizer step's count when this
    is one micro-batch of it; default: this batch). q, mask: (b, T); acc, weight: (b,), weight 0
    leaves a row out. Gradient flows through q, i.e. through log pi_phi only."""
    total_seqs = acc.shape[0] if total_seqs is None else total_seqs
    logits = beta * (q * mask).sum(-1)  # (b,)
    bce = F.binary_cross_entropy_with_logits(logits, acc, weight=weight, reduction="sum")
    return bce / total_seqs


def pairwise_ranking_accuracy(seq_scores, acc, prompt_index) -> float:
    """Share of the pairs (correct, wrong) within one group where the correct response has the
    higher score; a tie counts one half; 0.5 when no group has such a pair. All (B,)."""
    same_group = prompt_index[:, None] == prompt_index[None, :]  # (B, B)
    # (B, B): the row's response is correct, the column's wrong, in one group
    correct_over_wrong = same_group & (acc[:, None] > acc[None, :])
    pairs = correct_over_wrong.sum()
    if not pairs:
        return 0.5
    diff = seq_scores[:, None] - seq_scores[None, :]  # (B, B) score of row minus score of column
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    return (wins[correct_over_wrong].sum() / pairs).item()


def discounted_returns(rewards, mask, gamma: float):
    """returns_t = sum_{s >= t} gamma^(s - t) rewards_s over the valid tokens, 0 after them.
    (B, T) -> (B, T).
    With gamma = 1 a reverse cumulative sum: rewards [1, 2, 3] -> [6, 5, 3]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def normalise_process_rewards(rewards, mask, eps: float = 1e-6):
    """Divide token rewards (B, T) by one batch scalar, the largest |reverse cumulative sum|, so
    that every process return lies in [-1, 1]. Returns (normalised rewards (B, T), the scalar)."""
    returns = discounted_returns(rewards, mask, 1.0).abs()
    largest = returns.max() if returns.numel() else returns.new_zeros(())  # an empty batch: 0
    scale = largest + eps
    return rewards * mask / scale, scale


def last_token_mask(mask):
    """(B, T) -> (B, T) with a 1 at the last valid token of each row (the EOS, or the last token of
    a truncated one)."""
    return mask * (mask.cumsum(-1) == mask.sum(-1, keepdim=True)).to(mask.dtype)


def leave_one_out(scores, score_mask, prompt_index):
    """Leave-one-out baseline of one reward source, PRIME's code form. scores, score_mask: (B, T);
    prompt_index: (B,).

    With m_i the mean of row i over its masked positions and n the size of its group:
    scores * n / (n - 1) - sum_{j in group} m_j / (n - 1) at the masked positions, 0
    elsewhere. For the outcome source (acc at the last token only) this is
    acc_i - mean_{j != i} acc_j: acc [1, 0, 0, 1] -> [2/3, -2/3, -2/3, 2/3]."""
    n_groups = int(prompt_index.max()) + 1 if len(prompt_index) else 0  # an empty batch: none
    sizes = torch.bincount(prompt_index, minlength=n_groups)  # (n_groups,)
    if (sizes[prompt_index] < 2).any():
        raise ValueError("leave-one-out baselines need at least 2 responses in every group")
    row_means = (scores * score_mask).sum(-1) / score_mask.sum(-1).clamp(min=1)  # (B,)
    group_sums = scores.new_zeros(n_groups).index_add_(0, prompt_index, row_means)  # (n_groups,)
    n = sizes[prompt_index].to(scores.dtype)[:, None]  # (B, 1)
    return (scores * n / (n - 1) - group_sums[prompt_index][:, None] / (n - 1)) * score_mask


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch (unbiased variance);
    0 at padding. (B, T)."""
    n_tokens = mask.sum()
    mean = (x * mask).sum() / n_tokens.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / (n_tokens - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def prime_advantages(q, mask, acc, prompt_index, beta: float, gamma: float):
    """Advantages of the kept responses from the PRM's q and mask (K, T), outcomes acc and groups
    prompt_index (K,): process rewards beta q scaled by the batch's largest return, leave-one-out
    per source, summed, discounted into returns and whitened over the batch.
    Returns (advantages (K, T), the process-reward scale)."""
    process_rewards, process_scale = normalise_process_rewards(beta * q, mask)  # (K, T), ()
    last_token = last_token_mask(mask)  # (K, T)
    outcome_advantages = leave_one_out(acc[:, None] * last_token, last_token, prompt_index)
    process_advantages = leave_one_out(process_rewards, mask, prompt_index)
    returns = discounted_returns(outcome_advantages + process_advantages, mask, gamma)
    return masked_whiten(returns, mask), process_scale


def ppo_clip_loss(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """Per-token PPO clipped surrogate. All (B, T). Returns (loss, ratio, clipped) where clipped
    marks the tokens whose clipped term is the active (larger) one."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


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
    if args.group_size < 2:  # a violation is one line `error: --flag VALUE: why`, exit code 2
        raise common.FlagError("group_size", args.group_size,
                               "must be >= 2: leave-one-out baselines")
    if args.acc_low > args.acc_high:
        raise common.FlagError("acc_low", args.acc_low, f"must be <= --acc-high {args.acc_high}")
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # ALGO LOGIC: processes (torchrun) and seeding; as grpo.py's, but PRIME's mini-batches are cut
    # from the kept responses, of no fixed size: only the prompts must split evenly
    rank, world_size, device = common.init_distributed(args.cuda)
    if args.prompts_per_step % world_size:
        raise common.FlagError("prompts_per_step", args.prompts_per_step,
                               f"must be a multiple of the {world_size} processes")
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

    # ALGO LOGIC: the implicit PRM (trained) and its frozen reference (with --prm-ref policy: the
    # policy's old log-probs)
    prm, _ = common.load_model_and_tokenizer(args.model_name, device, args.bf16,
                                             args.gradient_checkpointing)
    prm = common.data_parallel(prm, args.fsdp)
    prm_optimizer = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, weight_decay=0.0)
    guard.watch(prm_optimizer)
    prm_ref = None
    if args.prm_ref == "freeze":
        prm_ref, _ = common.load_model_and_tokenizer(args.model_name, device, args.bf16,
                                                     frozen=True)
        prm_ref.eval().requires_grad_(False)
    empty_steps = 0
    if args.resume:
        common.load_models(checkpoint, {"prm": (prm, prm_optimizer)})
        empty_steps = checkpoint["empty_steps"]

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

        # ALGO LOGIC: accuracy filter (sample, then keep the prompts with 1 to n-1 correct and no
        # truncated response)
        keep_prompt, group_acc = keep_prompts(rewards, ro.truncated, ro.prompt_index, args.acc_low,
                                              args.acc_high, args.filter_truncated)  # (n_prompts,)
        # rewards are 0/1: all-equal groups, logged as in grpo.py
        zero_std = (group_acc == 0) | (group_acc == 1)
        # (K,) the responses of the kept prompts
        kept_rows = keep_prompt[ro.prompt_index].nonzero().squeeze(-1)
        kept_counts = common.gather_lists([len(kept_rows)])  # every process's K
        n_kept = sum(kept_counts)
        # 0: nothing to train on, no update this step
        n_mini_batches = min(args.num_mini_batches, n_kept)
        empty_steps += int(n_mini_batches == 0)
        prime_metrics = {"charts/kept_frac": keep_prompt.float().mean().item(),
                         "charts/empty_steps": empty_steps}

        # ALGO LOGIC: implicit PRM, its process rewards q_t and its cross-entropy update on the
        # outcome labels
        prm_start = time.time()
        if n_mini_batches:
            kept_mask = mask[kept_rows]  # (K, T)
            kept_acc, kept_index = rewards[kept_rows], ro.prompt_index[kept_rows]  # (K,) each
            ref_logp = torch.zeros_like(mask)  # (B, T) log pi_ref, at the kept rows
            if len(kept_rows):  # the frozen reference is no collective: this process alone
                ref_logp[kept_rows] = prm_reference_logprobs(
                    prm_ref, old_logp[kept_rows], ro.input_ids[kept_rows],
                    ro.attention_mask[kept_rows], response_len, args.temperature, **micro)
            # (B, T) q of the loss's forward pass, before the PRM's step
            q_before = torch.zeros_like(mask)
            prm_sums = defaultdict(float)
            prm.train()
            # in sampling order
            for rows, weights in common.mini_batch_parts(kept_rows, n_mini_batches, seed=None):
                n_seqs = common.all_sum(weights.sum())  # the whole mini-batch's, all processes
                prm_optimizer.zero_grad()
                positions = torch.arange(len(rows), device=device)  # into rows
                for part in common.micro_batches(positions, ro.widths[rows], args.micro_batch_size,
                                                 args.micro_batch_tokens):
                    idx, weight = rows[part], weights[part]  # weight 0: a filler
                    prm_logp = common.response_logprobs(prm, ro.input_ids[idx],
                                                        ro.attention_mask[idx], response_len,
                                                        args.temperature).logp  # (b, T)
                    q = (prm_logp - ref_logp[idx]) * mask[idx]  # (b, T)
                    # this process's share of the mini-batch loss, times the processes: DDP/FSDP
                    # average gradients
                    prm_loss = world_size * prm_ce_loss(q, mask[idx], rewards[idx], args.prm_beta,
                                                        n_seqs, weight)
                    prm_loss.backward()
                    q_before[idx[weight > 0]] = q.detach()[weight > 0]
                    prm_sums["loss"] += prm_loss.item()
                prm_grad_norm = common.clip_grad_norm(prm, args.prm_max_grad_norm)
                if guard.step_ok(prm_grad_norm):  # a non-finite PRM loss or gradient skips it too
                    prm_optimizer.step()
                    prm_sums["grad_norm"] += prm_grad_norm.item()
                    prm_sums["applied_steps"] += 1
            # every process makes as many forward passes (DDP and FSDP ones are collective)
            padding = kept_rows.new_zeros(max(kept_counts) - len(kept_rows))
            padded = torch.cat([kept_rows, padding])
            with torch.no_grad():
                prm_logp = common.response_logprobs(prm, ro.input_ids[padded],
                                                    ro.attention_mask[padded], response_len,
                                                    args.temperature, **micro).logp
                q_after = (prm_logp[: len(kept_rows)] - ref_logp[kept_rows]) * kept_mask  # (K, T)
            q = q_before[kept_rows] if args.prm_update == "after" else q_after  # (K, T)
            # every process's kept responses, (K_all, T') and (K_all,), the same on every process:
            # the PRM's ranking accuracy, the process-reward scale and the whitening are the whole
            # batch's; prompts are numbered over the global batch
            all_q, all_mask, all_acc = map(common.gather_rows, (q, kept_mask, kept_acc))
            all_index = common.gather_rows(kept_index + rank * len(items))
            seq_q_before = common.gather_rows(q_before[kept_rows].sum(-1))  # (K_all,)
            seq_q_after = common.gather_rows(q_after.sum(-1))  # (K_all,)
            prm_acc_before = pairwise_ranking_accuracy(seq_q_before, all_acc, all_index)
            prm_acc_after = pairwise_ranking_accuracy(seq_q_after, all_acc, all_index)
            prime_metrics.update({
                "losses/prm_loss": prm_sums["loss"] / n_mini_batches,
                "losses/prm_grad_norm": prm_sums["grad_norm"] / max(1, prm_sums["applied_steps"]),
                "charts/prm_acc_before": prm_acc_before,
                "charts/prm_acc_after": prm_acc_after,
                "charts/prm_q_sum_mean": (common.all_sum(q.sum(-1).sum()) / n_kept).item(),
            })
        prime_metrics["time/prm"] = time.time() - prm_start

        # ALGO LOGIC: advantages (leave-one-out per reward source, summed, returns, whitened over
        # the kept tokens)
        advantages = torch.zeros_like(mask)  # (B, T); the filtered-out responses keep A = 0
        if n_mini_batches:
            all_advantages, process_scale = prime_advantages(all_q, all_mask, all_acc, all_index,
                                                             args.prm_beta, args.gamma)
            advantages[kept_rows] = common.own_rows(all_advantages, q)  # this process's (K, T)
            prime_metrics["charts/process_reward_scale"] = process_scale.item()

        # ALGO LOGIC: loss and updates (num_epochs x num_mini_batches optimizer steps over the kept
        # responses, micro-batched)
        train_start = time.time()
        sums = defaultdict(float)
        policy.train()
        for epoch in range(args.num_epochs if n_mini_batches else 0):
            # one shuffle of the global kept batch, the same on every process; each process trains
            # on its rows of each mini-batch (fillers of weight 0 even out the processes' shares)
            shuffle_seed = hash((args.seed, step, epoch))
            for rows, weights in common.mini_batch_parts(kept_rows, n_mini_batches, shuffle_seed):
                train_mask = mask[rows] * weights[:, None]  # (m, T); a filler has no token
                # the whole mini-batch's tokens and responses, over all processes
                mb_tokens, n_seqs = common.all_sum(train_mask.sum()), common.all_sum(weights.sum())
                optimizer.zero_grad()
                positions = torch.arange(len(rows), device=device)  # into rows
                for part in common.micro_batches(positions, ro.widths[rows], args.micro_batch_size,
                                                 args.micro_batch_tokens):
                    idx, idx_mask = rows[part], train_mask[part]  # (b,), (b, T)
                    logp = common.response_logprobs(policy, ro.input_ids[idx],
                                                    ro.attention_mask[idx], response_len,
                                                    args.temperature).logp  # (b, T)
                    token_loss, ratio, clipped = ppo_clip_loss(
                        logp, old_logp[idx], advantages[idx], args.clip_eps_low, args.clip_eps_high)
                    # this process's share of the mini-batch loss, times the processes: DDP/FSDP
                    # average gradients
                    mb_loss = aggregate_loss(token_loss, idx_mask, args.loss_agg, mb_tokens, n_seqs,
                                             args.max_new_tokens)
                    loss = world_size * mb_loss
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = logp - old_logp[idx]
                        sums["approx_kl"] += (((ratio - 1) - log_ratio) * idx_mask).sum().item()
                        sums["clipfrac"] += (clipped.float() * idx_mask).sum().item()
                        sums["tokens"] += idx_mask.sum().item()
                        sums["policy_loss"] += loss.item()
                grad_norm = common.clip_grad_norm(policy, args.max_grad_norm)
                if guard.step_ok(grad_norm):  # a non-finite loss or gradient skips the step
                    optimizer.step()
                    sums["grad_norm"] += grad_norm.item()
                    sums["applied_steps"] += 1
                sums["optimizer_steps"] += 1
        if not n_mini_batches:
            # a step with no kept prompt trains nothing: its loss metrics are logged as NaN, not 0
            sums.update(optimizer_steps=math.nan, tokens=math.nan)
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

        # ALGO LOGIC: method metrics
        metrics.update(prime_metrics)

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

        # ALGO LOGIC: checkpoint; with the PRM and the count of empty steps
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            state = {"sampler": sampler.state_dict(), "skipped_steps": guard.skipped,
                     "empty_steps": empty_steps}
            models = {"policy": (policy, optimizer), "prm": (prm, prm_optimizer)}
            common.save_checkpoint(logger.run_dir, step, state, models=models)

    # TRY NOT TO MODIFY: the trained policy
    if args.save_model:
        common.save_pretrained(policy, tokenizer, logger.run_dir / "model", args.save_dtype)
    logger.close()
