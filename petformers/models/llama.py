"""The Llama family in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

Mistral, Qwen2/Qwen2.5 and Qwen3 are this model with a few config switches (models/config.py):
`qkv_has_bias` / `attn_proj_has_bias` (biases of wq/wk/wv and of wo), `qk_norm` (Qwen3's RMSNorm over
each head of q and k, before rope), an explicit `head_dim`, and `sliding_window` (a query sees only its
last `sliding_window` keys, on layers from `max_window_layers` on).

Parameter names are Meta's / MindFormers' (`tok_embeddings`, `layers.N.attention.wq`, ...,
`layers.N.feed_forward.w1`, `norm`, `lm_head`), so MindFormers' `target_modules: '.*wq|.*wk|.*wv|.*wo'`
works unchanged. The q/k weight layout is Hugging Face's ("rotate half"); loaders convert Meta's
interleaved layout and undo llama.cpp's permutation. The model knows nothing of LoRA. Attention's wq/wk/wv
and SwiGLU's w1/w3 all multiply one input, through `project` (`separate`: one matmul each), which
pet/fused.py replaces by one matmul over the weights stacked (fused_projections).

Attention takes three optional descriptions of which keys a query may see, all through
`scaled_dot_product_attention`:
- nothing: plain causal attention (training on padded rows, prefill);
- `segment_ids` [B, T]: packed rows, block-diagonal causal attention (a sample never sees another),
  computed sample by sample (`segment_attention`): causal attention over each sample's own columns does
  sum(L^2)/2 work instead of the T^2 of a masked row, and needs no [T, T] mask; a sample whose positions
  start at p > 0 also sees the row's first p columns, a prefix shared by the row's samples;
- `attention_mask` [B, S]: 1 for real tokens, 0 for (left) padding, with a KV cache of S keys.
A sliding window, when some query could see further back than it, is one more condition on the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from petformers.models.config import LlamaConfig
from petformers.models.lean_ops import rms_norm, swiglu


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as Meta and transformers do); its backward
    keeps only x and 1/rms (models/lean_ops.py)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], float32, with Llama-3 or linear rope scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, 1, T, head_dim] for integer positions [B, T]."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_heads, max_len, head_dim] each."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far (shared by all layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def build_attention_mask(
    q_len: int,
    past: int,
    segment_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    device,
    window: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean [B|1, 1, q_len, past+q_len] mask (True = may attend), or None for plain causal.
    `window`: a query at cache index i sees keys i - window < j <= i only (transformers' rule); on packed
    rows (`segment_ids` and `position_ids`) the distance is counted in positions, and a sample after a
    shared prefix also sees the prefix's columns (data/packing.py)."""
    if segment_ids is None and attention_mask is None and past == 0 and window is None:
        return None
    k_len = past + q_len
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    packed_positions = segment_ids is not None and position_ids is not None and past == 0
    if window is not None:
        if packed_positions:
            mask = mask & (position_ids[:, None, :, None] - position_ids[:, None, None, :] < window)
        else:
            mask = mask & (q_pos - k_pos < window)[None, None]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if packed_positions:
            same = same | (k_pos[None, None] < segment_first_position(segment_ids, position_ids)[:, None, :, None])
        mask = mask & same
    if attention_mask is not None:
        keys_ok = attention_mask[:, None, None, :k_len].bool()
        # A padding query sees at least itself, so no row is all-False (which would give NaN).
        mask = (mask & keys_ok) | (k_pos == q_pos)[None, None]
    return mask


def segment_first_position(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the position at which each token's segment starts (> 0 after a shared prefix)."""
    t = segment_ids.shape[1]
    columns = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_column = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values
    return position_ids.gather(1, start_column)


def segment_layout(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """Per row, (length, prefix) for each run of equal segment ids. Packed samples (and the trailing
    padding) are contiguous runs (data/packing.py), so each run is one sample; `prefix` is the run's
    first position: 0, or the length of the shared prefix (the row's first run) the sample also sees."""
    ids = segment_ids.cpu()
    positions = position_ids.cpu() if position_ids is not None else None
    rows = []
    for r, row in enumerate(ids):
        cuts = [0] + (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist() + [ids.shape[1]]
        firsts = positions[r, cuts[:-1]].tolist() if positions is not None else [0] * (len(cuts) - 1)
        layout = [(end - start, first) for start, end, first in zip(cuts[:-1], cuts[1:], firsts)]
        for j, (_, first) in enumerate(layout):
            if first and (j == 0 or layout[0] != (first, 0)):
                raise ValueError(f"packed row {r}: sample {j} starts at position {first} but the row does not start "
                                 f"with a shared prefix of {first} tokens (data/packing.py's layout)")
        rows.append(layout)
    return rows


# torch's CPU flash-attention backward in bf16/fp16 keeps ~6 MiB for every sequence length it has seen and
# never frees it (torch 2.13, AVX512-BF16: 76 lengths -> +457 MiB; forward-only and float32 keep nothing).
# Packed samples bring a new length nearly every time, so a bf16 run's RSS grew ~45 MiB per step until it
# had seen them all (1530 -> 2432 MiB over the bench). Zeros after the last position change nothing under
# causal attention, so training pads each attention's length up to a multiple of 64: at most
# seq_length / 64 lengths, measured at the same speed. tests/test_attention_lengths.py.
PAD_LENGTH_TO = 64


def causal_attention(q, k, v, **sdpa_kwargs) -> torch.Tensor:
    """Causal SDPA over q, k, v [B, heads, T, head_dim]; see PAD_LENGTH_TO for the padding."""
    t = q.shape[2]
    extra = -t % PAD_LENGTH_TO
    if extra == 0 or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) \
            or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa_kwargs)
    q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa_kwargs)[:, :, :t]


def segment_attention(q, k, v, layout: list[list[tuple[int, int]]], **sdpa_kwargs) -> torch.Tensor:
    """Causal attention within each segment of each row; q, k, v [B, heads, T, head_dim]. A segment after a
    shared prefix (prefix > 0) attends over the prefix's keys and its own: its queries are computed with the
    prefix's in front (a causal square, so the same kernel and padding rule), and the prefix rows of that
    result dropped. `split` (not indexing) so that backward concatenates the segments' gradients instead of
    zero-filling a full-size tensor per segment."""
    rows = []
    for i, row in enumerate(layout):
        qkv = (q, k, v) if len(layout) == 1 else (q[i:i + 1], k[i:i + 1], v[i:i + 1])
        parts = list(zip(*(t.split([n for n, _ in row], dim=2) for t in qkv)))
        outs = []
        for (a, b, c), (_, prefix) in zip(parts, row):
            if prefix:
                a, b, c = (torch.cat((shared, own), dim=2) for shared, own in zip(parts[0], (a, b, c)))
                outs.append(causal_attention(a, b, c, **sdpa_kwargs)[:, :, prefix:])
            else:
                outs.append(causal_attention(a, b, c, **sdpa_kwargs))
        rows.append(torch.cat(outs, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


# torch >= 2.5: SDPA shares each key/value head among its query heads itself (enable_gqa). Used on CPU
# for training rows (no cache, no mask), where its flash kernel supports it; it saves repeating k and v
# (two copies per layer, kept for backward). Elsewhere k and v are repeated, which every kernel takes.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def separate(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """Each projection of x on its own: the default `project` of Attention (wq, wk, wv) and FeedForward
    (w1, w3). pet/fused.py's fuse_projections replaces it by one matmul with the weights side by side."""
    return [linear(x) for linear in linears]


class Attention(nn.Module):
    project = staticmethod(separate)  # (x, (wq, wk, wv)) -> [q, k, v]; per layer, pet/fused.py's fused_project

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_heads, config.n_kv_heads, config.head_dim
        bias = config.qkv_has_bias
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attn_proj_has_bias)
        if config.qk_norm:  # Qwen3: one RMSNorm over each head's head_dim, shared by all heads
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, segments=None):
        b, t, _ = x.shape
        q, k, v = self.project(x, (self.wq, self.wk, self.wv))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        grouped = self.n_kv_heads != self.n_heads
        native_gqa = grouped and _SDPA_GQA and cache is None and mask is None and x.device.type == "cpu"
        if grouped and not native_gqa:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        gqa = {"enable_gqa": True} if native_gqa else {}
        if segments is not None:
            out = segment_attention(q, k, v, segments, **gqa)
        elif mask is None and cache is None and t > 1:
            out = causal_attention(q, k, v, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, **gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); backward keeps w1 x and w3 x, not silu(w1 x) (models/lean_ops.py)."""
    project = staticmethod(separate)  # (x, (w1, w3)) -> [w1 x, w3 x]; per layer, pet/fused.py's fused_project

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(swiglu(*self.project(x, (self.w1, self.w3))))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, segments=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block in backward (recompute_config)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random initialisation for training from scratch and for tests (normal(0, std), norms 1)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states [B, T, hidden] (the loss applies lm_head in chunks)."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        row_positions = position_ids  # as given: a packed row's positions tell where shared prefixes are
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.tok_embeddings(input_ids)
        inv_freq = rope_inv_freq(self.config, device=input_ids.device)
        cos, sin = rope_cos_sin(inv_freq, position_ids, x.dtype)
        window = self.config.sliding_window
        if window is not None and window >= past + t:
            window = None  # no query can see further back than the window: plain attention
        segments = None
        if segment_ids is not None and attention_mask is None and cache is None and window is None:
            # packed training rows: sample by sample
            segments, segment_ids = segment_layout(segment_ids, row_positions), None
        mask = _additive(build_attention_mask(t, past, segment_ids, attention_mask, input_ids.device,
                                              position_ids=row_positions), x.dtype)
        window_mask = None
        if window is not None:
            window_mask = _additive(build_attention_mask(t, past, segment_ids, attention_mask, input_ids.device,
                                                         window, row_positions), x.dtype)
        for i, layer in enumerate(self.layers):
            layer_mask = window_mask if window is not None and i >= self.config.max_window_layers else mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layer_mask, None, segments, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_mask, cache, segments)
        if cache is not None:
            cache.length += t
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, segment_ids=None, attention_mask=None, cache=None):
        """Logits [B, T, vocab] in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, segment_ids, attention_mask, cache))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as an additive one (0 / -inf). SDPA converts a boolean mask at every call and each
    layer keeps its copy for backward (30 x 4 MiB per 1024-token row, 32 x 64 MiB at 4096); converted
    once, the layers share one. Every query sees at least itself, so no row is all -inf."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def build_model(config: LlamaConfig, device="meta", dtype: torch.dtype = torch.float32) -> Llama:
    """The model with uninitialised storage on `device` (meta by default: no memory at all)."""
    with torch.device(device):
        model = Llama(config)
    return model.to(dtype)
