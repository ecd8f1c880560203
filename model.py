"""Qwen3 (dense) in plain PyTorch: the forward pass the trainer differentiates, and a fast KV-cached sampler.

Checkpoints are Hugging Face folders (config.json + model.safetensors, or a sharded
model.safetensors.index.json). Module names equal the Hugging Face keys, so loading is a lookup with shape
checks. `transformers` is only the reference in tests/test_model.py; this file never imports it.

    import torch
    from model import Qwen3, generate
    model = Qwen3.from_pretrained("path/to/Qwen3-0.6B", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                          # (B, T, vocab): causal, positions 0..T-1, no cache
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=1.0, top_p=0.95,
                    stop_ids=(eos_id,), seed=0)        # outs[i].tokens, .logprobs, .finished
    model.save_pretrained("runs/icrl/final")           # transformers.AutoModelForCausalLM loads it back

Tests: .venv/bin/python -m pytest -q tests/test_model.py     Benchmark: .venv/bin/python tests/bench_model.py
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- config
@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int                           # may differ from hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0             # transformers' default; Qwen3 releases set 1e6 in config.json
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        """Read a Hugging Face config.json; stop with one line on anything dense Qwen3 here does not do."""
        def reject(why):
            raise ValueError(f"config.json: {why}; model.py implements dense Qwen3 only")
        if d.get("model_type") != "qwen3":
            reject(f"model_type is {d.get('model_type')!r}, not 'qwen3'")
        if (d.get("num_experts") or 0) > 0:
            reject(f"num_experts={d['num_experts']} (mixture of experts)")
        if d.get("use_sliding_window"):
            reject("use_sliding_window is true (sliding-window attention)")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            reject(f"layer_types {sorted(set(d['layer_types']))} (only full_attention)")
        if d.get("hidden_act", "silu") != "silu":
            reject(f"hidden_act is {d['hidden_act']!r}, not 'silu'")
        if d.get("attention_dropout", 0.0):
            reject(f"attention_dropout={d['attention_dropout']} (no dropout here)")
        # transformers 5 stores RoPE as rope_parameters (theta inside); 4.x as rope_scaling + rope_theta. Both
        # are read: a YaRN rope_scaling added beside a default rope_parameters (as Qwen's cards suggest for long
        # context) is merged by transformers, and must be refused here, not run as plain RoPE.
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key) or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                reject(f"{key} has rope_type {rope_type!r} ({rope}); only plain RoPE (rope_type 'default')")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(d.get("head_dim", 128), int):
            reject(f"head_dim is {d.get('head_dim')!r}, not an integer")
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        if missing := [k for k in sizes if k not in d]:
            raise ValueError(f"config.json: missing {missing}")
        return cls(**{k: d[k] for k in sizes},
                   num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   head_dim=d.get("head_dim", 128),  # transformers' Qwen3Config default, not hidden // heads
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                   **{k: d[k] for k in ("tie_word_embeddings", "attention_bias", "max_position_embeddings",
                                        "bos_token_id", "eos_token_id", "pad_token_id") if k in d})

    def to_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json that transformers reads as this same model."""
        d = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **self.__dict__,
             "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0,
             "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
             "dtype": str(dtype).removeprefix("torch.")}
        return d


# ----------------------------------------------------------------------------- model
def rms_norm(x, weight, eps: float):
    # Statistics in fp32, cast back, then scale: transformers' order, which matters in bfloat16.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sign-folded sin for `apply_rope`, each (..., 1, D), from positions (...)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device)
                                / head_dim))
    freqs = positions[..., None].float() * inv_freq                    # (..., D/2)
    cos = torch.cat((freqs, freqs), -1).cos()                          # (..., D)
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1)                   # rotate_half's minus sign folded in
    return cos.to(dtype)[..., None, :], sin.to(dtype)[..., None, :]


def apply_rope(x, cos, sin, out=None):
    # == x * cos + rotate_half(x) * sin, bit for bit: roll swaps the halves, sin carries the sign.
    return torch.add(x * cos, x.roll(x.shape[-1] // 2, -1) * sin, out=out)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)     # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), cos, sin)  # (B, T, H, D)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)), cos, sin)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)                                     # (B, T, H_kv, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)                # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# Rows of one chunk in token_logprobs: 2**26 float32 logits (256 MB; 441 positions of Qwen3's 151,936 words).
LOGPROB_CHUNK_ELEMENTS = 1 << 26


def _chunk_logprobs(h, weight, targets, temperature: float):
    """log softmax(h @ weight.T / temperature)[targets] for one chunk, in float32 (float64 for a float64
    model) whatever the autocast."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        logits = torch.mm(h.to(dtype), weight.to(dtype).t())                 # (n, V) float32
        if temperature != 1.0:
            logits.div_(temperature)        # in place: mm keeps its inputs for backward, not its output
        # log_softmax, then the target: in float32 bit for bit what log_softmax over all positions at once
        # gave (the tiny default's measured runs depend on it); autograd keeps its output, not `logits`
        return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]


def token_logprobs(h, weight, targets, temperature: float = 1.0, chunk_rows: int | None = None):
    """Log-probs (N,) float32 of `targets` (N,) under softmax(h @ weight.T / temperature): h (N, C) final
    hidden states (after the norm), weight (V, C) the lm_head. The chosen token's log_softmax (its logit
    minus logsumexp), `chunk_rows` positions at a time (default: LOGPROB_CHUNK_ELEMENTS / V), the head in float32 (a bfloat16
    logit of 16-32 has a step of 0.125: noise in rho and in the calibration weight).

    Memory, N positions, vocabulary V, n = chunk_rows. log_softmax(logits.float() / t) over (N, V) held the
    bfloat16 logits (2NV bytes), float32 copies of them (4NV each: the cast, the division, the log_softmax),
    and as much again in backward: with --micro_batch 64 of 2k response tokens and V = 151,936, 80 GB per
    float32 copy. Here a chunk holds about three (n, V) float32 buffers (logits, their log_softmax, in
    backward its gradient: 3 x 256 MB at the default n) and, where the head is bfloat16 (FSDP2's
    param_dtype), its float32 copy (4VC bytes: 2.5 GB for Qwen3-8B, 1.6 GB for 4B) and that copy's gradient,
    all freed between chunks. With autograd each chunk is checkpointed (its logits recomputed in backward, one
    more head matmul per chunk), so nothing of size (N, V) is ever kept: what stays is h (N, C) and the
    output (N,). The head's FLOPs run in float32 (2NVC forward, 6NVC with the backward)."""
    N, V = targets.shape[0], weight.shape[0]
    n = chunk_rows or max(1, LOGPROB_CHUNK_ELEMENTS // V)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if N <= n:  # one chunk: autograd keeps its (N, V) logits, at most one chunk's worth
        return _chunk_logprobs(h, weight, targets, temperature)
    parts = []
    for i in range(0, N, n):
        args = (h[i:i + n], weight, targets[i:i + n], temperature)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(parts)


class Qwen3Model(nn.Module):
    """Container only, so that parameter names read `model.embed_tokens...` as in Hugging Face."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3(nn.Module):
    """Qwen3ForCausalLM. forward(input_ids) is what the trainer differentiates; `generate` samples."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.grad_checkpointing = False   # the trainer sets it; applies in training mode with grad enabled
        self.reset_parameters()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self):
        """Random init: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.tie_weights()

    def forward(self, input_ids, logits_at=None, targets=None, temperature: float = 1.0):
        """input_ids (B, T) -> logits (B, T, vocab): causal attention, positions 0..T-1. Right padding is
        exact for the real tokens, since no real token attends to a later one. `logits_at` (B, T'): only
        the logits at those positions, (B, T', vocab); a trainer needs them at response tokens alone, and
        a 151,936-wide lm_head over whole prompts would dominate its memory.

        `targets` (B, T'), with `logits_at`: instead of logits, float32 log-probs (B, T') of each target
        token under softmax(logits / temperature), computed by `token_logprobs` in chunks of positions, the
        head in float32, never holding (B, T', vocab). Inside forward, so FSDP2 has the head gathered and
        DDP sees every use of it."""
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)                                    # (B, T, C)
        positions = torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)  # (T, 1, D)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device)[:, None], logits_at]    # (B, T', C)
        if targets is None:
            return self.lm_head(self.model.norm(x))
        if logits_at is None or targets.shape != logits_at.shape:
            raise ValueError("targets needs logits_at of the same shape (B, T')")
        h = self.model.norm(x)
        logp = token_logprobs(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), temperature)
        return logp.view(targets.shape).clone()  # (B, T') floats: no view out of FSDP2's root (it warns of one)

    @torch.no_grad()
    def cast_copy(self, dtype: torch.dtype) -> "Qwen3":
        """A frozen copy of this model in `dtype` on the same device, for sampling: built on the meta device and
        filled parameter by parameter, so no float32 intermediate of the whole model is made. Sampling from a
        bfloat16 copy (weights and KV cache in bfloat16) replaces autocast, which re-casts every weight on
        every decode step."""
        with torch.device("meta"):
            copy = type(self)(self.config)
        copy = copy.to(dtype).to_empty(device=self.lm_head.weight.device)
        copy.tie_weights()                                                        # to_empty made new tensors
        source = dict(self.named_parameters())
        for name, param in copy.named_parameters():
            param.copy_(source[name])
        return copy.eval().requires_grad_(False)

    # ------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "Qwen3":
        """Load a Hugging Face Qwen3 folder; any missing, unexpected or misshapen tensor stops the load.
        Tied models: an `lm_head.weight` in the file must equal the embedding (it is then ignored)."""
        path = Path(path)
        config, found, model = _checked_folder(cls, path)
        tied_head = config.tie_word_embeddings and "lm_head.weight" in found
        model.to(dtype).to_empty(device=device)
        model.tie_weights()                                                       # to_empty made new tensors
        params = dict(model.named_parameters())
        with torch.no_grad():
            for file in sorted({file for file, _ in found.values()}):
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name in params:
                            params[name].copy_(f.get_tensor(name))
            if tied_head:
                file = found["lm_head.weight"][0]
                with safe_open(file, framework="pt", device="cpu") as f:
                    head = f.get_tensor("lm_head.weight").to(device, dtype)
                if not torch.equal(head, model.lm_head.weight):
                    raise ValueError(f"{file.name}: lm_head.weight differs from model.embed_tokens.weight, "
                                     "but config.json says tie_word_embeddings=true")
        return model

    def save_pretrained(self, path, state_dict: dict | None = None):
        """Write config.json + model.safetensors. `state_dict`: a full (gathered) state dict to write instead
        of self.state_dict(), e.g. from FSDP. Tied models store no lm_head.weight, as transformers does."""
        path = Path(path)
        state_dict = self.state_dict() if state_dict is None else state_dict
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in skip}
        expected = {k for k, _ in self.named_parameters(remove_duplicate=False)} - skip
        if set(tensors) != expected:
            raise ValueError(f"save_pretrained: state dict keys differ from the model's: missing "
                             f"{_few(expected - set(tensors))}, unexpected {_few(set(tensors) - expected)}")
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path / "model.safetensors", 0o666 & ~umask)   # safetensors writes 0600; 0644 like the rest
        dtype = tensors["model.embed_tokens.weight"].dtype
        (path / "config.json").write_text(json.dumps(self.config.to_dict(dtype), indent=2) + "\n")


def read_config(path) -> Qwen3Config:
    """The Qwen3Config of a Hugging Face folder's config.json; errors name the file."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    return Qwen3Config.from_dict(config)


def check_pretrained(path) -> Qwen3Config:
    """Everything Qwen3.from_pretrained checks, without reading a weight: config.json, the safetensors
    headers (a truncated or damaged file fails here), every tensor's name and shape. Returns the config."""
    return _checked_folder(Qwen3, Path(path))[0]


def _checked_folder(cls, path: Path):
    """(config, name -> (file, shape), the model on the meta device) of a checked checkpoint folder."""
    config = read_config(path)
    found = _tensor_shapes(path)                                  # name -> (file, shape)
    with torch.device("meta"):
        model = cls(config)
    params = dict(model.named_parameters())          # a tied lm_head is listed once, as the embedding
    tied_head = config.tie_word_embeddings and "lm_head.weight" in found
    expected = {**params, "lm_head.weight": model.lm_head.weight} if tied_head else params
    if missing := set(params) - set(found):
        raise ValueError(f"{path}: missing tensor(s) {_few(missing)}")
    if unexpected := set(found) - set(expected):
        raise ValueError(f"{path}: unexpected tensor(s) {_few(unexpected)} (not in this dense Qwen3)")
    for name, (file, shape) in found.items():
        if shape != tuple(expected[name].shape):
            raise ValueError(f"{file.name}: tensor {name} has shape {shape}, config.json implies "
                             f"{tuple(expected[name].shape)}")
    return config, found, model


def _few(names) -> str:
    names = sorted(names)
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def _tensor_shapes(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """tensor name -> (the safetensors file holding it, its shape), from a single file or a sharded index."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    elif single.is_file():
        files = [single]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    found = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index}: shard {file.name} not found")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as e:  # safetensors' SafetensorError: a truncated or damaged file
            raise ValueError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from None
        for name, shape in shapes.items():
            if name in found:
                raise ValueError(f"tensor {name} is in both {found[name][0].name} and {file.name}")
            found[name] = (file, shape)
    return found


# ----------------------------------------------------------------------------- KV-cached decoding
def _mm(x, weight, bias):
    """x (N, in) @ weight (in, out) [+ bias]: F.linear's math in one call instead of its chain of four."""
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


@dataclass
class _LayerWeights:
    """One decoder layer's weights for decoding; q|k|v fused into one matmul (gate|up is not: copying the
    MLP's weights on every generate call costs more than the one matmul it would save). The matrices are
    (in, out), for torch.mm: transposed views, or on CPU, for a batch, contiguous copies (Decoder.__init__)."""
    input_norm: torch.Tensor
    qkv: torch.Tensor                    # (C, H*D + 2*H_kv*D)
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor                # (H + H_kv, D): q_norm for each query head, then k_norm per kv head
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class _KVCache:
    """One layer's KV cache: k and v are indexed (B, H_kv, T_max, D); kv is their joint storage
    (B, T_max, 2 * H_kv, D) where they have one (see Decoder._new_cache)."""
    k: torch.Tensor
    v: torch.Tensor
    kv: torch.Tensor | None


class Decoder:
    """The model's forward for sampling: fused weights and a static, preallocated KV cache, per layer a key
    and a value tensor indexed (B, H_kv, T_max, D). `prefill` writes slots 0..T-1; then each `step` token
    goes to the slot of its row's explicit position and attends to slots 0..position, so ragged rows need no
    left padding. Same math as Qwen3.forward (tested).

    The fused q|k|v weights are copies (a quarter of a Qwen3 layer's weights), made once per generate call.
    `decode_rows`, `decode_steps`: how many rows will decode (after take_rows) and for how many steps, where
    known (default: `batch` and `max_len`); on CPU they pick the weights' layout and the decode attention.

    `static`: steps of fixed shapes, so that a CUDA graph can replay them (see step): positions always a
    tensor, the slots read rounded up to a multiple of `graph_kv_slots`, the cache never reallocated by a
    compaction. On CUDA each step is then one graph replay instead of ~15 kernel launches per layer; on CPU
    the same shapes run eagerly (how tests check them without a GPU)."""

    prefill_tokens = 512   # on CPU, prefill in chunks of rows of about this many tokens (see prefill)
    prefill_tokens_gpu = 32768  # on GPU: bounds the activations (Qwen3-8B: ~2.4 GB of MLP intermediates)
    graph_kv_slots = 64    # static steps read slots in multiples of this: one graph serves 64 steps

    def __init__(self, model: "Qwen3", batch: int, max_len: int, decode_rows: int | None = None,
                 decode_steps: int | None = None, static: bool = False, compile: bool = False):
        params = list(model.parameters())
        if any(type(p.data) is not torch.Tensor for p in params):
            raise ValueError("generate needs the full weights as plain tensors (got a sharded/DTensor "
                             "parameter): gather them first, e.g. FSDP2's model.unshard()")
        cfg = self.config = model.config
        weight = model.model.embed_tokens.weight
        H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.embed, self.norm, self.lm_head = weight, model.model.norm.weight, model.lm_head.weight
        self.cpu = weight.device.type == "cpu"
        # On CPU, MKL multiplies 8-64 rows by a column-major ((in, out) contiguous) weight up to 1.6x faster
        # than by the stored (out, in) one; one row gains nothing. The transposed copies cost a few steps'
        # worth, so they pay off on longer decodes: measured 1.1x on the tiny default model (8-64 rows, 64
        # steps), 1.06x on a 100M one at 8 rows x 64 steps, but 0.96x at 8 x 16. On GPU the layout is as fast.
        column_major = self.cpu and (decode_rows or batch) >= 8 and (decode_steps or max_len) >= 32
        layout = (lambda w: w.t().contiguous()) if column_major else (lambda w: w.t())
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.layers.append(_LayerWeights(
                input_norm=layer.input_layernorm.weight,
                qkv=layout(torch.cat([p.weight for p in projections])),
                qkv_bias=torch.cat([p.bias for p in projections]) if cfg.attention_bias else None,
                qk_norm=torch.cat([attn.q_norm.weight.expand(H, D), attn.k_norm.weight.expand(H_kv, D)]),
                o=layout(attn.o_proj.weight), o_bias=attn.o_proj.bias,
                post_norm=layer.post_attention_layernorm.weight, gate=layout(mlp.gate_proj.weight),
                up=layout(mlp.up_proj.weight), down=layout(mlp.down_proj.weight)))
        # See _attend: below ~64 (row, kv head) pairs CPU SDPA is as fast or faster.
        self.matmul_attention = self.cpu and (decode_rows or batch) * H_kv >= 64 and not compile
        self.max_len = max_len
        self.cache = [self._new_cache(batch) for _ in self.layers]
        self.slots = torch.arange(max_len, device=weight.device)
        self.rope = torch.cat(rope_cos_sin(self.slots, D, cfg.rope_theta, weight.dtype), -1)  # (T_max, 1, 2D)
        self.eps = torch.tensor(cfg.rms_norm_eps, device=weight.device) if self.cpu else None   # see _rms_norm
        # SDPA's default scale, for matmul attention; a tensor, as a Python float is wrapped anew on every call
        self.scale = torch.tensor(D ** -0.5, dtype=weight.dtype, device=weight.device)
        self.static = static
        self.graph = None   # (rows, slots, graph, its input tokens, positions, output logits): the one in use
        self.graph_pool = None
        # `compile`: the layers of steps with per-row positions (every static step) go through torch.compile,
        # one compiled layer for every layer, batch and slot count (dynamic shapes after a few compiles), so
        # norms, RoPE, the cache write and the adds fuse into fewer kernels (README: 1.07-1.17x on an H100).
        self.step_layer = (torch.compile(self._step_layer, dynamic=True, fullgraph=True) if compile
                           else self._step_layer)

    def _new_cache(self, batch: int) -> "_KVCache":
        """One layer's zeroed cache for `batch` rows, laid out for the decode attention (see _attend): for
        SDPA, keys then values in one tensor, as the qkv projection outputs them, so a step writes both in one
        copy; for matmul attention, the keys transposed. Zeros, not empty: a masked slot still enters
        attention as 0 * value, and 0 * NaN garbage is NaN."""
        cfg = self.config
        B, T, H_kv, D = batch, self.max_len, cfg.num_key_value_heads, cfg.head_dim
        if not self.matmul_attention:
            kv = self.embed.new_zeros((B, T, 2 * H_kv, D))
            return _KVCache(kv[:, :, :H_kv].transpose(1, 2), kv[:, :, H_kv:].transpose(1, 2), kv)
        return _KVCache(self.embed.new_zeros((B, H_kv, D, T)).transpose(2, 3),
                        self.embed.new_zeros((B, H_kv, T, D)), None)

    def take_rows(self, rows: torch.Tensor, upto: int):
        """Keep cache rows `rows` (in that order; repeats allowed) as rows 0..len(rows)-1, copying only the
        slots < upto: in place where they fit (a compaction: a captured graph's pointers stay valid), into a
        new cache where they do not (prefill's distinct prompts fanned out to their rows)."""
        n = len(rows)
        for i, old in enumerate(self.cache):
            new = old if n <= old.k.shape[0] else self._new_cache(n)
            # the right-hand side is gathered into a new tensor first, so writing over `old` is safe
            new.k[:n, :, :upto], new.v[:n, :, :upto] = old.k[rows, :, :upto], old.v[rows, :, :upto]
            self.cache[i] = new

    def prefill(self, tokens, logits_index, start=None):
        """Fill cache slots 0..T-1 from right-padded prompts (B, T); returns the logits (B, vocab) at
        `logits_index` (B,), each row's last prompt token. Causal attention is exact for the real tokens;
        the padding's slots are masked later and overwritten by decoding. With `start` (B,), row b's tokens
        go to slots start[b]..start[b]+T-1 after the ones already cached (a multi-turn episode's new turn,
        see Session), attending to those too.

        The rows go through in chunks of about `prefill_tokens` tokens on CPU: small activations stay in
        cache and skip the page faults of fresh large buffers (measured 5% of a generate call at batch 64).
        On GPU, chunks of `prefill_tokens_gpu`: 64 contexts of 16k tokens at once would need ~100 GB of
        activations for Qwen3-8B."""
        B, T = tokens.shape
        n = max(1, (self.prefill_tokens if self.cpu else self.prefill_tokens_gpu) // T)
        positions, S = None, T
        if start is not None:
            positions = start[:, None] + torch.arange(T, device=start.device)          # (B, T)
            S = int(start.max()) + T
        x = torch.cat([self._forward(tokens[i:i + n], None if positions is None else positions[i:i + n], S,
                                     logits_index[i:i + n], slice(i, i + n))
                       for i in range(0, B, n)])                                   # (B, C)
        return self._logits(x)

    def grow(self, max_len: int):
        """Room for max_len slots per row, the cached ones kept (a Session's history outgrew the cache)."""
        if max_len <= self.max_len:
            return
        old_len, self.max_len = self.max_len, max_len
        for i, old in enumerate(self.cache):
            new = self.cache[i] = self._new_cache(old.k.shape[0])
            new.k[:, :, :old_len], new.v[:, :, :old_len] = old.k, old.v
        self.slots = torch.arange(max_len, device=self.embed.device)
        self.rope = torch.cat(rope_cos_sin(self.slots, self.config.head_dim, self.config.rope_theta,
                                           self.embed.dtype), -1)
        self.graph = self.graph_pool = None  # captured over the old cache: a new graph, in a new pool

    def step(self, tokens, positions, kv_len: int):
        """One token per row: tokens, positions (B,) -> logits (B, vocab), for cache rows 0..B-1. The token's
        keys and values go to slot `position` of its row, and it attends to slots 0..position; kv_len bounds
        the slots read. `positions` may be an int, every row's position (then kv_len is positions + 1): no
        mask to build or apply, and slice writes (measured 5-9% of a generate call); not when `static`."""
        if not self.static:
            return self._step(tokens, positions, kv_len)
        slots = min(self.max_len, -(-kv_len // self.graph_kv_slots) * self.graph_kv_slots)
        if self.cpu:
            return self._step(tokens, positions, slots)
        return self._graph_step(tokens, positions, slots)

    def _step(self, tokens, positions, kv_len: int):
        positions = positions if isinstance(positions, int) else positions[:, None]
        return self._logits(self._forward(tokens[:, None], positions, kv_len, None))

    def _graph_step(self, tokens, positions, slots: int):
        """The step as a CUDA graph replay, captured on the first step of each (rows, slots). Within a
        generate call rows only shrink and slots only grow, so a shape never comes back: one graph is
        kept, and the next one reuses its memory pool."""
        if self.graph is None or self.graph[:2] != (len(tokens), slots):
            static_tokens, static_positions = tokens.clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()  # capture needs a stream other than the default one
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # Warm-up before capture (cuBLAS and friends initialise outside the graph). It is this very
                # step: the slots it writes get their right values, and the replay writes the same again.
                self._step(static_tokens, static_positions, slots)
                # capture_begin rather than `with torch.cuda.graph`, which also runs gc.collect() and
                # empty_cache() on every capture. The graph in use stays alive until this capture ends: a
                # shared pool whose last graph is gone cannot be captured into again.
                graph.capture_begin(pool=self.graph_pool)
                try:
                    logits = self._step(static_tokens, static_positions, slots)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(side)
            self.graph_pool = graph.pool()
            self.graph = (len(tokens), slots, graph, static_tokens, static_positions, logits)
        _, _, graph, static_tokens, static_positions, logits = self.graph
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    def _logits(self, x):
        return torch.mm(self._rms_norm(x, self.norm), self.lm_head.t())

    def _rms_norm(self, x, weight):
        """rms_norm. On CPU F.rms_norm is an unfused composite: rms = sqrt(|x|² / C + eps) from the vector
        norm is the same math in fewer kernels, 1.6x (decode step) to 6x (prefill) faster. On GPU F.rms_norm
        is one kernel."""
        if not self.cpu:  # the fused kernel upcasts inside: rms_norm's math (and rounding) in 2 kernels, not 4
            return F.rms_norm(x, (x.shape[-1],), eps=self.config.rms_norm_eps) * weight
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        return (xf * torch.addcmul(self.eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()).to(x.dtype) * weight

    def _attend(self, q, k, v, mask):
        """Attention of one query token per row: q (B, 1, H, D); k, v (B, H_kv, S, D); mask None or additive
        (B, 1, 1, S) -> (B, H * D). On CPU the `rep` query heads that share a kv head go on the query axis (no K/V
        copies); on GPU SDPA's enable_gqa pairs them. Either way head h uses kv head h // rep, as transformers'
        repeat_kv.

        On CPU, SDPA spends ~1.5 us per (row, kv head) on problems this small. Matmul attention is two batched
        matmuls, over the transposed key cache, (D, S) per head, and the values, (S, D): both MKL's untransposed
        case. The softmax between them is in float32, as in transformers' eager attention. Measured on generate
        calls of the tiny default model (2 kv heads): 1.06x faster at 64 rows, 1.04x at 32, but 0.97x at 8 and
        0.92x at 1."""
        B, _, H, D = q.shape
        H_kv = k.shape[1]
        if not self.cpu:  # one query per head with enable_gqa: 25 us per layer on an H100 at 64 rows, not 34
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
            return out.reshape(B, H * D)                                          # from (B, H, 1, D)
        if not self.matmul_attention:
            out = F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=mask)
            return out.reshape(B, H * D)                                          # from (B, H_kv, rep, D)
        q = torch.mul(q, self.scale).view(B * H_kv, H // H_kv, D)                 # a contiguous copy
        scores = torch.bmm(q, k.transpose(2, 3).flatten(0, 1))                    # (B * H_kv, rep, S)
        if mask is not None:
            scores.view(B, H_kv, -1, scores.shape[-1]).add_(mask)
        weights = scores.softmax(-1, dtype=torch.float).to(q.dtype)
        return torch.bmm(weights, v.flatten(0, 1)).view(B, H * D)

    def _qkv(self, x, w: _LayerWeights, cos, sin, B: int, T: int):
        """A layer's attention inputs from x (B * T, C): q (B, T, H, D) and k|v (B, T, 2 * H_kv, D), q and k
        normed per head and rotated."""
        H, H_kv, D = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        qkv = _mm(self._rms_norm(x, w.input_norm), w.qkv, w.qkv_bias).view(B, T, H + 2 * H_kv, D)
        qk = qkv[:, :, :H + H_kv]
        normed = self._rms_norm(qk, w.qk_norm)
        if torch.compiler.is_compiling():  # dynamo takes no strided out=; inductor fuses the copy anyway
            qk.copy_(apply_rope(normed, cos, sin))
        else:
            apply_rope(normed, cos, sin, out=qk)                                  # back into qkv
        return qkv[:, :, :H], qkv[:, :, H:]

    def _attention_out_and_mlp(self, x, out, w: _LayerWeights):
        """The rest of a layer after attention's output `out`: the o projection and the MLP, each added to x.
        In place: x is this call's own, and prefill has fewer large temporaries."""
        x += _mm(out, w.o, w.o_bias)
        h = self._rms_norm(x, w.post_norm)
        x += torch.mm(F.silu(torch.mm(h, w.gate), inplace=True).mul_(torch.mm(h, w.up)), w.down)
        return x

    def _step_layer(self, x, w: _LayerWeights, kv_cache, cos, sin, rows, positions, mask):
        """One layer of a step of one token per row at its own position (B, 1), as every static step is, with
        keys and values in one cache tensor (B, T_max, 2 * H_kv, D) and the slots read given by the mask
        (B, 1, 1, S): the unit `compile` hands to torch.compile (see __init__). S comes from a tensor's shape:
        an int argument would be compiled in as a constant first."""
        B, S, H_kv = x.shape[0], mask.shape[-1], self.config.num_key_value_heads
        q, kv = self._qkv(x, w, cos, sin, B, 1)
        kv_cache[rows, positions] = kv.to(kv_cache.dtype)                         # autocast: bfloat16
        k, v = kv_cache[:B, :S, :H_kv].transpose(1, 2), kv_cache[:B, :S, H_kv:].transpose(1, 2)
        return self._attention_out_and_mlp(x, self._attend(q, k, v, mask), w)

    def _forward(self, tokens, positions, kv_len: int, logits_index, cache_rows=slice(None)):
        """The layers, without the final norm: (B, T) -> (B * T, C), or (B, C) at `logits_index` (B,).
        positions: None (prefill from slot 0), an int (a step, every row at that slot), or (B, T), each
        token's slot (a step: T == 1; a new turn after a cached history: T > 1)."""
        cfg = self.config
        B, T = tokens.shape
        H, H_kv, D, S = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, kv_len
        r0 = cache_rows.start or 0                                                # this chunk's first cache row
        x = F.embedding(tokens, self.embed).flatten(0, 1)                         # (B * T, C): a row per token
        if positions is None:                                                     # prefill
            cos, sin = self.rope[:T].chunk(2, -1)                                 # (T, 1, D)
        elif isinstance(positions, int):                          # one-token step, every row at this slot
            cos, sin = self.rope[positions].chunk(2, -1)                          # (1, D)
            rows, mask, S = slice(None, B), None, positions + 1                   # all slots visible
        else:
            cos, sin = self.rope[positions].chunk(2, -1)                          # (B, T, 1, D)
            visible = self.slots[:S] <= positions[..., None]                      # (B, T, S)
            mask = torch.where(visible, 0.0, -math.inf).to(x.dtype)[:, None]      # (B, 1, T, S), all layers
            rows = torch.arange(r0, r0 + B, device=x.device)[:, None]
        for w, cache in zip(self.layers, self.cache):
            # every static step among them; the step's layer reads cache rows 0..B-1: a later chunk of a
            # prefill (r0 > 0) of one token per row takes the general path below
            if T == 1 and cache.kv is not None and torch.is_tensor(positions) and r0 == 0:
                x = self.step_layer(x, w, cache.kv, cos, sin, rows, positions, mask)
                continue
            q, kv = self._qkv(x, w, cos, sin, B, T)
            if positions is None:
                k, v = kv[:, :, :H_kv].transpose(1, 2), kv[:, :, H_kv:].transpose(1, 2)  # (B, H_kv, T, D)
                cache.k[cache_rows, :, :T], cache.v[cache_rows, :, :T] = k, v
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
                out = out.transpose(1, 2).reshape(B * T, H * D)                   # from (B, H, T, D)
            else:
                kv = kv.to(cache.v.dtype)                         # (B, T, 2 * H_kv, D); autocast: bfloat16
                if isinstance(positions, int):
                    kv = kv[:, 0]
                if cache.kv is not None:
                    cache.kv[rows, positions] = kv
                else:
                    cache.k[rows, :, positions], cache.v[rows, :, positions] = kv[..., :H_kv, :], kv[..., H_kv:, :]
                k, v = cache.k[r0:r0 + B, :, :S], cache.v[r0:r0 + B, :, :S]
                if T == 1:
                    out = self._attend(q, k, v, mask)                                      # (B, H * D)
                else:
                    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
                    out = out.transpose(1, 2).reshape(B * T, H * D)               # from (B, H, T, D)
            if logits_index is not None and w is self.layers[-1]:  # only these positions reach the logits
                picked = torch.arange(B, device=x.device), logits_index
                x, out = x.view(B, T, -1)[picked], out.view(B, T, -1)[picked]      # (B, C), (B, H * D)
            x = self._attention_out_and_mlp(x, out, w)
        return x


# ----------------------------------------------------------------------------- sampling
@dataclass
class Generation:
    tokens: list[int]     # completion ids, ending with the stop id when one was hit
    logprobs: list[float] # log-prob of each token under the sampling distribution
    finished: bool        # a stop id was hit (False: cut off at max_new_tokens)
    # log-prob of each token under the full softmax(logits / temperature), before top-k / top-p truncation:
    # what a trainer's log-probs are (icrl.py, SPEC §2.8). The same list as `logprobs` when nothing is truncated.
    full_logprobs: list[float] | None = None

    def __post_init__(self):
        if self.full_logprobs is None:
            self.full_logprobs = self.logprobs


def keep_top_k_top_p(logits, top_k: int, top_p: float):
    """Set logits (B, V) outside the top-k, then outside the top-p nucleus, to -inf, in place (as
    transformers' TopKLogitsWarper and TopPLogitsWarper: ties with the k-th logit stay; the nucleus is the
    smallest set whose probability reaches top_p, and always holds the top token). 0 and 1 are off."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p < 1.0:
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits.masked_fill_(drop.scatter(1, order, drop), -math.inf)
    return logits


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator, full: bool = False):
    """Draw one token per row from logits (B, V), which this overwrites (scratch space: with Qwen3's
    151,936-token vocabulary every B x V temporary costs as much as the lm_head matmul on CPU).

    Returns token ids (B,) and their log-probs (B,) under the distribution sampled from: softmax(logits /
    temperature) restricted to the top-k / top-p set and renormalised. temperature 0 is greedy, with the
    log-prob under softmax(logits). With `full`, also the log-probs (B,) under the untruncated
    softmax(logits / temperature) (one more pass over (B, V) where a truncation is on; else the same tensor)."""
    logits = logits.float()
    full_normaliser = None
    if temperature > 0:
        logits.div_(temperature)
        if full and (top_k > 0 or top_p < 1.0):
            full_normaliser = torch.logsumexp(logits, -1)
        keep_top_k_top_p(logits, top_k, top_p)
    top, token = logits.max(-1)
    if temperature > 0:
        # Gumbel-max: argmax(logits - log E), E ~ Exp(1), is a draw from softmax(logits), with no host
        # sync. The floor keeps a zero draw from making -inf - (-inf) = NaN on an excluded token.
        noise = torch.empty_like(logits).exponential_(generator=generator)
        noise = noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_()
        token = torch.sub(logits, noise, out=noise).argmax(-1)
    chosen = logits.gather(1, token[:, None])[:, 0]
    log_normaliser = top + logits.sub_(top[:, None]).exp_().sum(-1).log_()   # logsumexp, in place
    logp = chosen - log_normaliser
    if not full:
        return token, logp
    return token, logp, logp if full_normaliser is None else chosen - full_normaliser


class Session:
    """The KV cache of one batch of rows kept from one generate call to the next, so that the turns of
    multi-turn episodes prefill only what was appended since the last call (the end of the last action and
    the observation), not the whole history. Pass it to every call, each prompt the whole sequence so far,
    and from the second call on `continues`: for each prompt, the index of the previous call's prompt it
    extends (previous rows not named are dropped)."""

    def __init__(self):
        self.decoder = None
        self.cached: list[list[int]] = []   # per previous prompt: the tokens whose keys and values are cached
        self.row_of: list[int] = []         # per previous prompt: its row in the decoder's cache

    def resume(self, prompts, continues, max_new_tokens):
        """Rows in the order of `prompts`, each cache holding its prefix; returns (tokens to prefill (B, T)
        right-padded, their first slots (B,), each row's last new token (B,))."""
        if continues is None or len(continues) != len(prompts):
            raise ValueError("a Session's later calls need `continues`, one previous prompt index per prompt")
        cached = [self.cached[c] for c in continues]
        for i, (prompt, prefix) in enumerate(zip(prompts, cached)):
            if len(prompt) <= len(prefix) or prompt[:len(prefix)] != prefix:
                raise ValueError(f"prompt {i} does not extend the sequence of previous prompt {continues[i]}")
        decoder, device = self.decoder, self.decoder.embed.device
        decoder.take_rows(torch.tensor([self.row_of[c] for c in continues], device=device),
                          max(len(p) for p in cached))
        new = [p[len(c):] for p, c in zip(prompts, cached)]
        T = max(map(len, new))
        # room for the decode steps and for every row's padded new tokens; in steps of 256, so growths are rare
        need = max(max(map(len, prompts)) + max_new_tokens, max(map(len, cached)) + T)
        decoder.grow(-(-need // 256) * 256)
        tokens = torch.tensor([n + [0] * (T - len(n)) for n in new], device=device)
        return tokens, torch.tensor(list(map(len, cached)), device=device), torch.tensor([len(n) - 1 for n in new],
                                                                                        device=device)


@torch.inference_mode()
def generate(model: Qwen3, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, stop_ids=(), seed: int | None = None,
             check_every: int = 8, graphs: bool | None = None, session: Session | None = None,
             continues: list[int] | None = None, compile: bool = False) -> list[Generation]:
    """Sample a completion for each prompt (token-id lists, ragged allowed), in order.

    Identical prompts (group sampling) are prefilled once and their cache rows copied. Every `check_every`
    steps the host looks for stop ids: it ends the call when all rows stopped, and moves stopped rows out
    of the batch once they are a quarter of it. `seed` seeds this call's own torch.Generator.

    `graphs`: decode steps of fixed shapes (Decoder's `static`), replayed as CUDA graphs; None: on CUDA.
    True on CPU runs the same shapes eagerly (tests); False on CUDA launches every kernel (the peer in
    tests/bench_gpu.py). `compile`: each layer of a step through torch.compile (Decoder). `session`, `continues`:
    keep the KV cache for the next call (Session)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}, "
                         f"max_new_tokens={max_new_tokens}")
    if max_new_tokens == 0:
        return [Generation([], [], False) for _ in prompts]
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    N, L = len(prompts), max(map(len, prompts))
    if session is not None and session.decoder is not None:   # a later turn: prefill what is new only
        decoder = session.decoder
        ids, start, last = session.resume(prompts, continues, max_new_tokens)
        logits = decoder.prefill(ids, last, start)                                # (N, V)
        uniform, position = False, start + last + 1
    else:
        # Prefill each distinct prompt once, right-padded; padding slots are masked, then overwritten.
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]  # row -> distinct prompt
        lengths = [len(p) for p in distinct]
        ids = torch.tensor([list(p) + [0] * (L - len(p)) for p in distinct], device=device)  # (U, L)
        last = torch.tensor(lengths, device=device) - 1
        U = len(distinct)
        static = device.type == "cuda" if graphs is None else graphs
        decoder = Decoder(model, U, L + max_new_tokens, decode_rows=N, decode_steps=max_new_tokens, static=static,
                          compile=compile)
        logits = decoder.prefill(ids, last)                                       # (U, V)
        if U < N:
            source_t = torch.tensor(source, device=device)
            decoder.take_rows(source_t, L)
            logits, last = logits[source_t], last[source_t]
        uniform = min(lengths) == L and not static  # then every row is at one position, given to step as an int
        position = last + 1                      # (B,) where each row's next token goes
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)    # active row -> prompt index
    done = torch.zeros(N, dtype=torch.bool, device=device)
    segments, tokens, logps, first_step = [], [], [], 0   # segment: (rows, first step, tokens, logprobs)
    parked = torch.zeros(0, dtype=torch.long, device=device)  # with a Session: the prompt of each stopped row
    truncated = temperature > 0 and (top_k > 0 or top_p < 1.0)  # then log-probs under both distributions
    for step in range(max_new_tokens):
        if truncated:
            token, logp, full_logp = sample_next(logits, temperature, top_k, top_p, generator, full=True)
            logp = torch.stack((logp, full_logp), -1)                           # (B, 2)
        else:
            token, logp = sample_next(logits, temperature, top_k, top_p, generator)
        tokens.append(token)
        logps.append(logp)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % check_every == 0:
            segments.append((rows, first_step, torch.stack(tokens, 1), torch.stack(logps, 1)))
            tokens, logps, first_step = [], [], step + 1
            if len(stops):
                done |= torch.isin(segments[-1][2], stops).any(1)
                n_done = int(done.sum())                                         # the host sync
                if n_done == len(rows):
                    break
                if 4 * n_done >= len(rows):  # compact: stopped rows cost nothing from here on
                    keep = (~done).nonzero()[:, 0]
                    if session is None:
                        decoder.take_rows(keep, L + step)
                    else:  # a Session keeps the stopped rows' caches too, after the live ones
                        stopped = done.nonzero()[:, 0]
                        decoder.take_rows(torch.cat([keep, stopped, torch.arange(len(rows), N, device=device)]),
                                          L + step)
                        parked = torch.cat([rows[stopped], parked])
                    token, position, rows, done = token[keep], position[keep], rows[keep], done[keep]
        logits = decoder.step(token, L + step if uniform else position, L + step + 1)
        position = position + 1
    if tokens:
        segments.append((rows, first_step, torch.stack(tokens, 1), torch.stack(logps, 1)))

    all_tokens = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=device)
    all_logps = torch.zeros((N, max_new_tokens, 2) if truncated else (N, max_new_tokens), dtype=torch.float,
                            device=device)
    for seg_rows, start, seg_tokens, seg_logps in segments:
        all_tokens[seg_rows, start:start + seg_tokens.shape[1]] = seg_tokens
        all_logps[seg_rows, start:start + seg_tokens.shape[1]] = seg_logps
    hit = torch.isin(all_tokens, stops)
    finished = hit.any(1)
    n_tokens = torch.where(finished, hit.int().argmax(1) + 1, max_new_tokens).tolist()
    token_lists, finished = all_tokens.tolist(), finished.tolist()
    if session is not None:
        # The keys and values of every token but each row's last sampled one were written by a later step.
        session.decoder, session.row_of = decoder, [0] * N
        for row, prompt in enumerate(torch.cat([rows, parked]).tolist()):
            session.row_of[prompt] = row
        session.cached = [list(p) + token_lists[i][:n - 1] for i, (p, n) in enumerate(zip(prompts, n_tokens))]
    if not truncated:
        logp_lists = all_logps.tolist()
        return [Generation(token_lists[i][:n], logp_lists[i][:n], finished[i]) for i, n in enumerate(n_tokens)]
    logp_lists, full_lists = all_logps[..., 0].tolist(), all_logps[..., 1].tolist()
    return [Generation(token_lists[i][:n], logp_lists[i][:n], finished[i], full_lists[i][:n])
            for i, n in enumerate(n_tokens)]
