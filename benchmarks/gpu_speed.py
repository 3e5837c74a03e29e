"""Rollout and training speed of a Qwen2.5-0.5B-sized model through the code paths the algorithm
files use.

    # on a GPU: 256 prompts x 512 new tokens, bf16
    python benchmarks/gpu_speed.py
    # a CPU smoke run
    python benchmarks/gpu_speed.py --size tiny --batch-size 8 --new-tokens 16 --train-rows 8

The model is built from Qwen2.5-0.5B's configuration with random weights (speed does not depend on
the weights) and a word-level tokenizer over its 151,936 ids, so nothing is downloaded. EOS is an id
the random model almost never samples, so nearly every response runs to --new-tokens; tokens/s
counts the tokens actually generated.

- Rollout: `common.rollout` with each `--rollout` backend (policy weights fp32 under bf16 autocast,
  as in training; `static` and `continuous` decode in a bf16 copy), and plain `generate` on bf16
  weights for reference. The first call of each backend is a warm-up (compilation, CUDA graphs,
  allocator) and is not timed.
- Training: forward + backward of a policy-gradient loss through `common.response_logprobs` on
  `--train-rows` rows of prompt + response tokens, micro-batched as the files do, then an AdamW
  step; MFU = 6 x parameters x tokens/s / peak bf16 dense FLOP/s (attention FLOPs are not counted,
  so MFU is a slight underestimate).

Writes a JSON record (figures, device, versions, the command) to --out and prints a markdown table.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM
QWEN2_5_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)
TINY = dict(QWEN2_5_0_5B, vocab_size=1000, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@dataclass
class Args:
    size: Literal["qwen2.5-0.5b", "tiny"] = "qwen2.5-0.5b"
    """model configuration (tiny: a CPU smoke run of the same code)"""
    batch_size: int = 256
    """responses per rollout (prompts x group size)"""
    group_size: int = 8
    """responses per prompt"""
    prompt_len: int = 128
    """prompt tokens"""
    new_tokens: int = 512
    """new tokens per response"""
    backends: list[str] = field(default_factory=lambda: ["generate", "static", "continuous"])
    """rollout backends to time (common.ROLLOUT_BACKENDS)"""
    train_rows: int = 64
    """rows (prompt + response) per training step"""
    micro_batch_size: int = 8
    """rows per forward/backward"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass"""
    repeats: int = 2
    """timed repetitions after the warm-up (the best is kept)"""
    out: str = "benchmarks/results/gpu.json"
    """where the JSON record goes"""


def word_tokenizer(vocab_size: int):
    """A tokenizer whose token i is the word `t<i>` (whitespace-separated); the last id is EOS and
    pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{vocab_size - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                   padding_side="left")


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(args: Args) -> dict:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Qwen2Config(**(QWEN2_5_0_5B if args.size == "qwen2.5-0.5b" else TINY))
    tokenizer = word_tokenizer(config.vocab_size)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).to(device)
    policy.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    # what load_model_and_tokenizer sets
    policy.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in policy.parameters())
    gen = torch.Generator().manual_seed(0)
    n_prompts = args.batch_size // args.group_size
    prompts = [" ".join(f"t{i}" for i in torch.randint(1, config.vocab_size - 1,
                                                       (args.prompt_len,), generator=gen).tolist())
               for _ in range(n_prompts)]

    record = {"command": "python " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "parameters": n_params, "args": asdict(args),
              "rollout": {}}
    import transformers

    record["transformers"] = transformers.__version__

    def rollout_with(backend, model):
        return lambda: common.rollout(model, tokenizer, prompts, args.group_size,
                                      common.Sampling(args.new_tokens, backend=backend))

    runs = [(backend, policy) for backend in args.backends]
    if device.type == "cuda":
        bf16_policy = Qwen2ForCausalLM(config).to(device, torch.bfloat16)
        bf16_policy.generation_config = policy.generation_config
        runs.append(("generate, bf16 weights", bf16_policy))
    for name, model in runs:
        backend = name.split(",")[0]
        seconds, ro = best_time(rollout_with(backend, model), args.repeats, device)
        tokens = int(ro.response_mask.sum())
        record["rollout"][name] = {"seconds": seconds, "new_tokens": tokens,
                                   "tokens_per_s": tokens / seconds}
        print(f"rollout {name}: {tokens} tokens in {seconds:.2f} s = "
              f"{tokens / seconds:,.0f} tokens/s", flush=True)
        del ro
    if "generate" in record["rollout"]:
        base = record["rollout"]["generate"]["tokens_per_s"]
        for entry in record["rollout"].values():
            entry["speedup_vs_generate"] = entry["tokens_per_s"] / base

    ids = torch.randint(1, config.vocab_size - 1,
                        (args.train_rows, args.prompt_len + args.new_tokens), generator=gen)
    ids, attention = ids.to(device), torch.ones_like(ids, device=device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    policy.train()

    def train_step():
        optimizer.zero_grad()
        for rows in torch.arange(args.train_rows).split(args.micro_batch_size):
            logp = common.response_logprobs(policy, ids[rows], attention[rows],
                                            args.new_tokens).logp
            (-logp.mean() * len(rows) / args.train_rows).backward()
        common.clip_grad_norm(policy, 1.0)
        optimizer.step()

    seconds, _ = best_time(train_step, args.repeats, device)
    tokens = ids.numel()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in record["device"]), None)
    record["train"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                       "mfu": 6 * n_params * tokens / seconds / (peak * 1e12) if peak else None,
                       "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                           if device.type == "cuda" else None)}
    print(f"train: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s"
          + (f", MFU {record['train']['mfu']:.1%}" if peak else ""), flush=True)

    print(f"\n| {record['device']} | tokens/s | vs generate |\n|---|---|---|")
    for name, entry in record["rollout"].items():
        print(f"| rollout: {name} | {entry['tokens_per_s']:,.0f} | "
              f"{entry.get('speedup_vs_generate', 1):.2f}x |")
    print(f"| training (fwd+bwd+AdamW) | {record['train']['tokens_per_s']:,.0f} | |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main(tyro.cli(Args))
