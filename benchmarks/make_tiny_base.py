"""Build the embedded base model: a tiny Llama-architecture causal LM with a character-level
tokenizer, trained by supervised fine-tuning on solver-generated countdown solutions, written step
by step.

    # writes benchmarks/tiny-countdown/ (its defaults rebuild the committed model)
    python benchmarks/make_tiny_base.py

It learns two skills from the `sft` splits of benchmarks/data/ (instances RL never sees): countdown
with two to four numbers, the task RL trains on, and `arith` (`--second-skill-frac` of the examples:
compute a three-number expression step by step), a skill no RL run trains, so that its accuracy
during RL shows forgetting. Every countdown example is a random one of the instance's distinct
solutions (up to commutation and associativity), in a random one of its step orders and operand
orders, so the base model knows several paths to an answer. Training stops well short of mastery,
which leaves headroom for RL.

The saved folder is then measured as every user loads it (`build_metrics.json`): greedy, mean@n and
pass@k up to k = 64 on both skills' test splits (n = 128 samples, so pass@64 has a low-variance
estimate); the share of correct/wrong response pairs (same prompt) that the base ranks right by mean
token log-prob and by negative mean token entropy (EM-RL's rewards need it above 0.5); the share of
train prompts it solves k/k (DPH-RL's rehearsal set, with dph_rl.py's defaults); and PRIME's
implicit-PRM ranking accuracy before update, from three short prime.py runs. `--measure-only`
repeats just the measurement on the folder already there (same numbers: both paths reseed first).
The tokenizer is saved beside a Llama config: with a Qwen2 config, AutoTokenizer would substitute
the Qwen2 tokenizer class, whose byte-level pre-tokenizer silently drops spaces.
"""

import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# common, countdown_data
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import common  # noqa: E402
from countdown_data import render_steps, solutions  # noqa: E402


@dataclass
class Args:
    out: str = "benchmarks/tiny-countdown"
    """folder to write (config, safetensors, tokenizer, build_metrics.json)"""
    task: str = "countdown"
    """task from common.TASKS (its second skill is learned too)"""
    seed: int = 0
    """seed for initialisation and data order"""
    steps: int = 4500
    """SFT optimizer steps"""
    batch_size: int = 64
    """sequences per step"""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to a tenth)"""
    warmup_steps: int = 50
    """linear warm-up steps"""
    hidden_size: int = 128
    """model width"""
    num_layers: int = 2
    """transformer blocks"""
    second_skill_frac: float = 0.2
    """share of examples from the second skill"""
    eval_every: int = 500
    """greedy accuracy on 256 val prompts every this many steps"""
    eval_samples: int = 128
    """samples per test prompt for the final mean@n / pass@k (n > 64: a steadier pass@64)"""
    pool_prompts: int = 2000
    """train prompts for the rehearsal share (dph_rl.py's --pool-prompts)"""
    presample_k: int = 8
    """samples per pool prompt; k/k solved = rehearsal (dph_rl.py's --presample-k)"""
    pair_prompts: int = 512
    """train prompts for EM-RL's ranking check (8 samples each)"""
    prime_steps: int = 40
    """steps of each prime.py run (its defaults) from the saved model, for PRM accuracy (0: skip)"""
    prime_seeds: int = 3
    """prime.py runs (seeds 1..n) averaged: one run's ranking accuracy varies by run"""
    measure_only: bool = False
    """skip training: re-measure the model in --out (a full build reseeds: same numbers)"""


VOCAB = ["<eos>", "<unk>"] + list("0123456789+-*/() >:=,")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; <eos> doubles as the pad token (the pad == eos case the mask must
    handle)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def sft_batch(tokenizer, task, examples, rng):
    """Prompt ⊕ a random rendering of a random solution ⊕ <eos>, right-padded; labels only on
    the answer and <eos>. `examples` are (item, solution groups) pairs: one group of equivalent
    trees per distinct solution."""
    rows, labels = [], []
    for item, groups in examples:
        tree = rng.choice(rng.choice(groups))
        prompt_ids = tokenizer(task.prompt(item), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(render_steps(tree, rng), add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        labels.append([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, attention_mask, label_ids


def sft_examples(task_name: str) -> list[tuple[dict, list]]:
    """(item, solution groups) for every supervised instance of a task; an expression's only
    solution is its own tree."""
    items = common.get_task(task_name).items("sft")
    if "expression" in items[0]:
        return [(item, [[common.parse_countdown(item["expression"], steps=False)[1]]])
                for item in items]
    return [(item, list(solutions(item["nums"], item["target"]).values())) for item in items]


@torch.no_grad()
def ranking_and_rehearsal(model, tokenizer, task, args) -> dict:
    """EM-RL's precondition (pairs ranked right by each label-free reward) and DPH-RL's rehearsal
    share."""
    train = task.train_items()
    pairs = {"sequence": [], "token": []}
    for start in range(0, args.pair_prompts, 64):
        items = train[start:min(start + 64, args.pair_prompts)]
        ro = common.rollout(model, tokenizer, [task.prompt(item) for item in items], 8,
                            common.Sampling(task.max_new_tokens))
        stats = common.response_logprobs(model, ro.input_ids, ro.attention_mask,
                                         ro.response_ids.shape[1], with_entropy=True)
        mask = ro.response_mask.float()
        rewards = {
            # em_rl.py --reward-type sequence
            "sequence": (stats.logp * mask).sum(-1) / mask.sum(-1),
            # --reward-type token
            "token": -(stats.entropy * mask).sum(-1) / mask.sum(-1),
        }
        correct = [task.verify(items[i], text)[0]
                   for i, text in zip(ro.prompt_index.tolist(), ro.texts)]
        for p in range(len(items)):
            rows = range(8 * p, 8 * p + 8)
            for right, wrong in itertools.product(rows, rows):
                if correct[right] and not correct[wrong]:
                    for name, reward in rewards.items():
                        pairs[name].append(float(reward[right] > reward[wrong])
                                           + 0.5 * float(reward[right] == reward[wrong]))
    solved_all = 0
    pool = train[: args.pool_prompts]
    for start in range(0, len(pool), 128):
        items = pool[start:start + 128]
        ro = common.rollout(model, tokenizer, [task.prompt(item) for item in items],
                            args.presample_k, common.Sampling(task.max_new_tokens))
        correct = torch.tensor([task.verify(items[i], text)[0]
                                for i, text in zip(ro.prompt_index.tolist(), ro.texts)])
        solved_all += int(correct.view(len(items), args.presample_k).all(-1).sum())
    return {"em_rl/pairs": len(pairs["sequence"]),
            "em_rl/sequence_reward_ranks_right":
                round(sum(pairs["sequence"]) / max(1, len(pairs["sequence"])), 4),
            "em_rl/token_reward_ranks_right":
                round(sum(pairs["token"]) / max(1, len(pairs["token"])), 4),
            f"dph_rl/solved_{args.presample_k}_of_{args.presample_k}_share":
                round(solved_all / len(pool), 4)}


def prime_ranking(model_dir: str, steps: int, seeds: int) -> dict:
    """`charts/prm_acc_before` of short prime.py runs (its defaults, seeds 1..n) from the saved
    model, averaged over the steps after the tenth: how often the implicit PRM, before it trains on
    a batch, ranks a correct response above a wrong one to the same prompt. PRIME's process rewards
    carry information only if this is clearly above 0.5."""
    per_seed = []
    for seed in range(1, seeds + 1):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable,
                       str(Path(__file__).resolve().parents[1] / "algorithms" / "prime.py"),
                       "--model-name", model_dir, "--seed", str(seed), "--num-steps", str(steps),
                       "--eval-every", str(steps), "--eval-prompts", "16", "--eval-samples", "2",
                       "--final-eval-samples", "2", "--checkpoint-every", "0",
                       "--log-completions-every", "0", "--output-dir", out]
            subprocess.run(command, check=True, capture_output=True)
            rows = [json.loads(line)
                    for line in next(Path(out).glob("*/metrics.jsonl")).read_text().splitlines()]
        values = [row["charts/prm_acc_before"] for row in rows
                  if row["step"] > 10 and "charts/prm_acc_before" in row]
        per_seed.append(sum(values) / len(values))
        print(f"prime seed {seed}: prm_acc_before {per_seed[-1]:.3f} over {len(values)} steps",
              flush=True)
    return {"prime/prm_acc_before": round(sum(per_seed) / len(per_seed), 4),
            **{f"prime/prm_acc_before_seed{seed}": round(v, 4)
               for seed, v in enumerate(per_seed, 1)},
            "prime/steps_averaged": len(values)}


def train(args: Args, task) -> float:
    """Build the model and tokenizer by SFT and save them to args.out; returns the training
    seconds."""
    start_time = time.time()
    examples = {"main": sft_examples(args.task), "second": sft_examples(task.second_skill)}
    print(f"sft examples: {len(examples['main'])} {args.task}, "
          f"{len(examples['second'])} {task.second_skill}")
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=args.hidden_size,
                         intermediate_size=4 * args.hidden_size, num_hidden_layers=args.num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    def lr_factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(args.seed)
    val_items = task.eval_items("val", 256)
    for step in range(1, args.steps + 1):
        n_second = sum(rng.random() < args.second_skill_frac for _ in range(args.batch_size))
        batch = (rng.sample(examples["main"], args.batch_size - n_second)
                 + rng.sample(examples["second"], n_second))
        input_ids, attention_mask, labels = sft_batch(tokenizer, task, batch, rng)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            greedy = common.evaluate(model, tokenizer, task, val_items, 0,
                                     common.Sampling(task.max_new_tokens))
            print(f"step {step}/{args.steps} | loss {loss.item():.3f}"
                  f" | greedy acc (256 val) {greedy['eval/greedy_acc']:.3f}"
                  f" | second skill {greedy['eval/second_skill/greedy_acc']:.3f}"
                  f" | {time.time() - start_time:.0f}s",
                  flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    return time.time() - start_time


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = common.get_task(args.task)
    metrics_path = Path(args.out) / "build_metrics.json"
    if args.measure_only:
        train_seconds = json.loads(metrics_path.read_text())["train_seconds"]
    else:
        common.seed_everything(args.seed)
        train_seconds = train(args, task)
    # Measure the saved folder as every user will load it, so a tokenizer that does not survive the
    # round trip shows.
    common.seed_everything(args.seed)
    model, tokenizer = common.load_model_and_tokenizer(args.out)
    test_items = task.eval_items("test", len(task.items("test")))
    metrics = common.evaluate(model, tokenizer, task, test_items, args.eval_samples,
                              common.Sampling(task.max_new_tokens))
    metrics.update(ranking_and_rehearsal(model, tokenizer, task, args))
    if args.prime_steps:
        metrics.update(prime_ranking(args.out, args.prime_steps, args.prime_seeds))
    metrics = {"train_seconds": round(train_seconds, 1),
               **{k: round(v, 4) for k, v in metrics.items()}}
    print(json.dumps(metrics, indent=2))
    # the build's settings, not how it ran
    recorded = {k: v for k, v in asdict(args).items() if k != "measure_only"}
    metrics_path.write_text(json.dumps({"args": recorded, **metrics}, indent=2) + "\n")
