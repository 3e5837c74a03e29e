"""Measured memory coefficients of the training and generation code paths, and a peak-memory model
built from them.

    # Qwen2.5-0.5B / 1.5B / 7B shapes, ~7 minutes on 2 CPU cores
    python benchmarks/memory_model.py
    # a smoke run
    python benchmarks/memory_model.py --sizes tiny --out /tmp/memory.md

No GPU is needed: every figure is a count of the bytes PyTorch allocates (`AllocationTracker`: each
new storage an op returns is added, and subtracted again when the storage is freed), which does not
depend on the device or its load. Models are built from the public configurations with FEW decoder
layers (1 and 2), random weights and a small vocabulary (512), and run on the CPU under
`torch.autocast("cpu", dtype=torch.bfloat16)` with fp32 weights: what `load_model_and_tokenizer` +
`common.autocast` do on a GPU with `--bf16`.

- Training: one forward + backward through `common.response_logprobs` (the code path of every file),
  with and without gradient checkpointing (`activation_checkpointing_enable`, as
  `load_model_and_tokenizer` sets it), at two token counts. Parameter gradients exist before the
  pass (fp32, 4 bytes a parameter: the static part), so the pass only adds to them. The tracker
  records the live bytes after every op; the two token counts run the same ops, so each moment t has
  an exact intercept a_t and per-token slope b_t, and the peak at a real micro-batch of N tokens is
  max_t (a_t + N b_t). The slope at that moment, at 1 and 2 layers, gives the bytes per token per
  decoder layer and the rest per token (embeddings, final norm). Rows have no padding (attention
  mask all ones), so the CPU runs scaled_dot_product_attention's flash kernel (no (T, T) attention
  matrix), as a GPU does.
- Logits: the same pass on a 2-wide-hidden model with the real 151,936-word vocabulary, at two
  response lengths: the bytes per response token of the (rows, T + 1, V) bf16 logits and of
  everything around them (fp32 chunks).
- Generation: `common.rollout` with `generate` (fp32 weights under autocast) on the tiny shape, 64
  rows, at 1 and 2 layers and two response lengths: the KV cache bytes per token per layer at the
  peak (keys and values come out of the layer in fp32 on the CPU). The real shapes' weights would
  hide the cache at a batch a CPU can decode; the bf16 decode copy (`static`/`continuous`) is not
  measured.

What this cannot see: the CUDA caching allocator's fragmentation and rounding, cuBLAS/cuDNN/NCCL
workspaces, the CUDA context (~0.5 GiB), kernels' internal scratch buffers, and FSDP's all-gather
buffers. The model in `common.py` (`estimate_peak_memory`) adds 15% on top for them. Under FSDP the
decoder runs in bf16 weights, whose activations are smaller than the fp32-weight path measured here
(the `bf16 weights` column), so the estimate is conservative there.

Writes the measurements to the .json twin of --out and prints the markdown tables that memory.md is
made of.
"""

import json
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

QWEN = {  # public configurations (config.json on the hub)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
SMALL_VOCAB = 512


@dataclass
class Args:
    sizes: list[str] = field(default_factory=lambda: ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
    """configurations to measure (keys of QWEN)"""
    rows: int = 16
    """rows of every training pass (16: _LogitStats runs 16 chunks at both lengths)"""
    lengths: tuple[int, int] = (8, 16)
    """prompt = response tokens per row of the two training passes"""
    logits_lengths: tuple[int, int] = (255, 511)
    """response tokens per row of the logits measurement's two passes (8 rows each)"""
    out: str = "benchmarks/results/memory.md"
    """where the markdown goes (the JSON next to it)"""


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages the ops under it create (an in-place op's output is its input: not
    new), a trace of the live bytes after every op, the peak, and the names of the ops that ran."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.trace, self.ops, self.alive = [], set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) in self.alive or (storage.nbytes() and storage.data_ptr() in inputs):
                continue
            self.alive.add(id(storage))
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        self.trace.append(self.live)
        self.ops.add(str(func))
        return out

    def _free(self, key, nbytes):
        self.alive.discard(key)
        self.live -= nbytes


def build(size: str, layers: int, vocab: int | None = None, hidden: int | None = None):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = dict(QWEN[size], num_hidden_layers=layers, vocab_size=vocab or QWEN[size]["vocab_size"])
    if hidden:  # the logits measurement: a negligible decoder in front of the real vocabulary
        shape.update(hidden_size=hidden, intermediate_size=hidden, num_attention_heads=1,
                     num_key_value_heads=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=4096))
    # the random model almost never samples it: responses run to their full length
    eos = shape["vocab_size"] - 1
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    model.autocast_dtype = torch.bfloat16  # what load_model_and_tokenizer sets with --bf16 on a GPU
    return model


def training_trace(model, rows: int, prompt: int, response: int) -> AllocationTracker:
    """The tracker of one forward + backward of a policy-gradient-shaped loss through
    response_logprobs."""
    model.train()
    # fp32 gradients exist already (a later micro-batch): the pass adds to them
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 1, (rows, prompt + response),
                        generator=torch.Generator().manual_seed(0))
    with AllocationTracker() as tracker:
        logp = common.response_logprobs(model, ids, torch.ones_like(ids), response).logp
        logp.sum().backward()
        del logp
    return tracker


def peak_slope(small: AllocationTracker, large: AllocationTracker, n_small: int, n_large: int,
               n_at: int):
    """(bytes per token, constant bytes) at the moment of the peak for a pass of `n_at` tokens, from
    two traces of the same ops at `n_small` and `n_large` tokens."""
    if len(small.trace) != len(large.trace):
        raise RuntimeError("the two passes ran different ops; "
                           "choose rows and lengths that align them")
    slopes = [(b - a) / (n_large - n_small) for a, b in zip(small.trace, large.trace)]
    consts = [a - s * n_small for a, s in zip(small.trace, slopes)]
    t = max(range(len(slopes)), key=lambda i: consts[i] + slopes[i] * n_at)
    return slopes[t], consts[t]


def measure_training(size: str, args: Args, checkpointing: bool, weights: torch.dtype) -> dict:
    """Bytes per token per decoder layer, and the rest per token, at the peak of a 16k-token
    micro-batch."""
    per_token = {}
    for layers in (1, 2):
        model = build(size, layers, SMALL_VOCAB).to(weights)
        if checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        tokens = [args.rows * 2 * n for n in args.lengths]
        trackers = [training_trace(model, args.rows, n, n) for n in args.lengths]
        per_token[layers], _ = peak_slope(*trackers, *tokens, n_at=16384)
        flash = any("flash_attention" in op for op in trackers[0].ops)
        del model, trackers
    return {"per_layer": per_token[2] - per_token[1], "other": 2 * per_token[1] - per_token[2],
            "flash": flash}


def measure_logits(args: Args) -> dict:
    """Bytes per response token of the logits pass with the real vocabulary (the LOGITS_CHUNK cap
    reached)."""
    model = build("qwen2.5-0.5b", 1, hidden=2)
    rows, peaks = 8, []
    for response in args.logits_lengths:
        peaks.append(training_trace(model, rows, 1, response).peak)
    n = [rows * (t + 1) for t in args.logits_lengths]
    slope = (peaks[1] - peaks[0]) / (n[1] - n[0])
    return {"vocab": model.config.vocab_size, "per_response_token": slope,
            "constant": peaks[0] - slope * n[0]}


def measure_kv(backend: str, rows: int = 64) -> float:
    """KV-cache bytes per token per decoder layer of common.rollout on the tiny configuration, from
    the peaks at 1 and 2 layers and two response lengths (a double difference: what grows with both
    layers and tokens). The weights of the real sizes would hide the cache at the batch a CPU can
    decode, so those use the formula this checks."""
    from gpu_speed import word_tokenizer

    prompt, lengths, peaks = 8, (16, 32), {}
    tokenizer = word_tokenizer(SMALL_VOCAB)
    prompts = [" ".join(f"t{i}" for i in range(1 + r % 400, 1 + r % 400 + prompt))
               for r in range(rows)]
    for layers in (1, 2):
        model = build("tiny", layers, SMALL_VOCAB)
        for new in lengths:
            with AllocationTracker() as tracker:
                common.rollout(model, tokenizer, prompts, 1, common.Sampling(new, backend=backend),
                               greedy=True)
            peaks[layers, new] = tracker.peak
        common._LOW_PRECISION_COPIES.pop(model, None)
    growth = [peaks[layers, lengths[1]] - peaks[layers, lengths[0]] for layers in (1, 2)]
    return (growth[1] - growth[0]) / (rows * (lengths[1] - lengths[0]))


def estimates(shape: dict) -> list[str]:
    """Markdown rows: the estimate of common.estimate_peak_memory for GRPO runs of this shape on one
    80 GB GPU."""
    from types import SimpleNamespace

    rows = []
    for new, micro, ckpt in ((512, 16384, False), (512, 16384, True), (1024, 16384, True)):
        args = SimpleNamespace(max_new_tokens=new, micro_batch_size=64, micro_batch_tokens=micro,
                               fsdp=False, gradient_checkpointing=ckpt, rollout="generate",
                               prompts_per_step=64, group_size=8, eval_prompts=512, eval_samples=8,
                               final_eval_samples=8, beta=0.0)
        parts = common.estimate_peak_memory(shape, args)
        rows.append(f"| {new} | {micro} | {'yes' if ckpt else 'no'} | " + " | ".join(
            f"{parts[k] / 2**30:.1f}"
            for k in ("static", "training", "generation", "evaluation", "peak")) + " |")
    return rows


def main(args: Args) -> dict:
    start = time.time()
    record = {"command": "python " + " ".join(sys.argv),
              "machine": "2-core CPU, counted PyTorch allocations, bf16 autocast on CPU",
              "torch": torch.__version__, "args": asdict(args), "sizes": {}}
    lines = ["| size | variant | measured B/token/layer | formula | "
             "measured other B/token | formula |",
             "|---|---|---|---|---|---|"]
    for size in dict.fromkeys([*args.sizes, "tiny"]):
        shape, entry = QWEN[size], {}
        formula = common.memory_coefficients(shape)
        entry["formula"] = formula
        for name, ckpt, weights in (
            ("plain", False, torch.float32),
            ("checkpointed", True, torch.float32),
            ("bf16 weights", False, torch.bfloat16),
        )[: 3 if size == "tiny" else 2]:
            entry[name] = m = measure_training(size, args, ckpt, weights)
            f_layer, f_other = ((formula["checkpointed"], formula["recompute"]) if ckpt else
                                (formula["layer"], formula["other"]) if weights == torch.float32
                                else ("", ""))
            lines.append(f"| {size} | {name} | {m['per_layer']:,.0f} | {f_layer:,} | "
                         f"{m['other']:,.0f} | {f_other:,} |"
                         if f_layer != "" else
                         f"| {size} | {name} | {m['per_layer']:,.0f} | | {m['other']:,.0f} | |")
            print(lines[-1], f"({time.time() - start:.0f} s)", flush=True)
        record["sizes"][size] = entry
    tiny = common.memory_coefficients(QWEN["tiny"])
    record["kv_generate"] = measure_kv("generate")
    print(f"KV generate (tiny): {record['kv_generate']:,.0f} B/token/layer, formula {tiny['kv']}",
          flush=True)
    record["logits"] = measure_logits(args)
    print(f"logits: {record['logits']['per_response_token']:,.0f} B/response token", flush=True)
    record["seconds"] = time.time() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    table = ["| size | new tokens | --micro-batch-tokens | ckpt | static GiB | training | "
             "generation | evaluation | peak (x1.15) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        table += [f"| {size} " + row for row in estimates(QWEN[size])]
    print("\n".join(lines + [""] + table))
    return record


if __name__ == "__main__":
    main(tyro.cli(Args))
