"""Build the embedded base model: a tiny Llama-architecture causal LM with a character-level tokenizer, trained by
supervised fine-tuning on solver-generated countdown solutions.

    python benchmarks/make_tiny_base.py                      # writes benchmarks/tiny-countdown/

Every training example is a random train-split instance with a *random* one of its correct solutions (all operand
orders and bracketings the solver finds), so the base model knows several paths to an answer and leaves room for RL
and for diversity. The tokenizer is saved beside a Llama config: with a Qwen2 config, transformers' AutoTokenizer
would substitute the Qwen2 tokenizer class, whose byte-level pre-tokenizer silently drops spaces.
"""

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@dataclass
class Args:
    out: str = "benchmarks/tiny-countdown"
    """folder to write (config, safetensors, tokenizer)"""
    task: str = "countdown"
    """task from common.TASKS"""
    seed: int = 0
    """seed for initialisation and data order"""
    steps: int = 3000
    """SFT optimizer steps"""
    batch_size: int = 64
    """sequences per step"""
    learning_rate: float = 1e-3
    """AdamW learning rate after a linear warm-up"""
    warmup_steps: int = 50
    """linear warm-up steps"""
    hidden_size: int = 128
    """model width"""
    num_layers: int = 2
    """transformer blocks"""
    eval_every: int = 500
    """greedy accuracy on 256 test prompts every this many steps"""
    eval_samples: int = 8
    """samples per test prompt for the final mean@n / pass@k"""


VOCAB = ["<eos>", "<unk>"] + list("0123456789+-*/() >:")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; <eos> doubles as the pad token (the pad == eos case the mask must handle)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def sft_batch(tokenizer, task, items, solutions, rng, batch_size):
    """Prompt ⊕ random solution ⊕ <eos>, right-padded; labels only on the answer and <eos>."""
    rows, labels = [], []
    for item_index in rng.sample(range(len(items)), batch_size):
        prompt_ids = tokenizer(task.prompt(items[item_index]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(rng.choice(solutions[item_index]), add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        labels.append([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, attention_mask, label_ids


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.seed_everything(args.seed)
    start_time = time.time()
    task = common.get_task(args.task)
    train_items, test_items = task.train_items(), task.test_items()
    solutions = [common.solve_countdown(item["nums"], item["target"]) for item in train_items]
    print(f"{len(train_items)} train instances, {sum(map(len, solutions)) / len(solutions):.1f} solutions each on average")

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    rng = random.Random(args.seed)
    for step in range(1, args.steps + 1):
        input_ids, attention_mask, labels = sft_batch(tokenizer, task, train_items, solutions, rng, args.batch_size)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            greedy = common.evaluate(model, tokenizer, task, test_items[:256], 0, 1.0, task.max_new_tokens)
            print(f"step {step}/{args.steps} | loss {loss.item():.3f} | greedy acc (256 test) {greedy['eval/greedy_acc']:.3f}"
                  f" | {time.time() - start_time:.0f}s", flush=True)
    train_seconds = time.time() - start_time

    Path(args.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Evaluate the saved folder as every user will load it, so a tokenizer that does not survive the round trip shows.
    model, tokenizer = common.load_model_and_tokenizer(args.out)
    metrics = common.evaluate(model, tokenizer, task, test_items, args.eval_samples, 1.0, task.max_new_tokens)
    metrics = {"train_seconds": round(train_seconds, 1), **{k: round(v, 4) for k, v in metrics.items()}}
    print(json.dumps(metrics, indent=2))
    (Path(args.out) / "build_metrics.json").write_text(json.dumps({"args": vars(args), **metrics}, indent=2) + "\n")
