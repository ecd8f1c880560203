"""Shared test helpers: tiny random Hugging Face Qwen3 checkpoints built offline, and import paths.

`make_hf_qwen3(tmp_dir, **overrides)` builds a random `transformers.Qwen3ForCausalLM`, saves it with
save_pretrained and returns (folder, hf_model); use it wherever a test needs a real checkpoint folder.
"""

import sys
from pathlib import Path

import torch

try:
    import pytest
except ImportError:  # tests/gpu_check.py runs test_cuda.py without pytest on a GPU image that lacks it
    pytest = None

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the project's modules are top-level files (model.py, icrl.py, ...)

# A tiny Qwen3 with every feature that differs from a textbook transformer: GQA (4 heads, 2 kv heads),
# head_dim (16) != hidden / heads (48 / 4), per-head q/k norms, untied lm_head.
TINY_QWEN3 = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6)


def make_hf_qwen3(tmp_dir, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """Build a random transformers Qwen3ForCausalLM (TINY_QWEN3 + overrides), save it to tmp_dir.

    Norm weights are randomised too, so a bug in q_norm/k_norm/RMSNorm cannot hide behind weights of 1.
    Returns (folder as Path, the transformers model in eval mode)."""
    import transformers  # the reference implementation; only tests and benchmarks import it

    config = transformers.Qwen3Config(**{**TINY_QWEN3, **config_overrides})
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    hf = hf.to(dtype).eval()
    folder = Path(tmp_dir)
    hf.save_pretrained(folder)
    return folder, hf


def hf_qwen3(tmp_path):
    """The default tiny checkpoint: (folder, transformers model)."""
    return make_hf_qwen3(tmp_path)


if pytest is not None:
    hf_qwen3 = pytest.fixture(hf_qwen3)
