"""Shared test set-up: offline flags before anything imports transformers/wandb, repository root on sys.path, and
loaders for the algorithm scripts (they are scripts, not a package)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import common  # noqa: E402


def run_python(args: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `python *args` (a script and its flags) with the offline settings above; the timeout is a hang guard, not a
    speed test (the machine may be shared)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def load_algorithm(name: str):
    """Import `algorithms/<name>.py` as a module (its `__main__` block does not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def embedded():
    """The committed tiny base model and its tokenizer, loaded the way every user loads them."""
    return common.load_model_and_tokenizer(common.EMBEDDED_MODEL)


@pytest.fixture
def random_model(embedded):
    """A freshly initialised 1-layer model over the embedded tokenizer's vocabulary (seeded)."""
    _, tokenizer = embedded
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sample_batch(model, tokenizer):
    """A seeded rollout of 2 prompts x 4 responses: (rollout, response mask as float (8, T), T)."""
    torch.manual_seed(0)
    ro = common.rollout(model, tokenizer, ["17 13 5>6:", "3 5 7>22:"], group_size=4, max_new_tokens=8)
    return ro, ro.response_mask.float(), ro.response_ids.shape[1]
