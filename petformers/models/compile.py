"""Regional compilation: torch.compile of the decoder block instead of the whole model.

The blocks are the same code: with inline_inbuilt_nn_modules (torch >= 2.5's default) dynamo compiles one
graph that all of them share (two: the first block's input needs no gradient), in a fraction of a
whole-model compile, and `dynamic=True` keeps it when the row length changes. segment_attention loops over
a row's samples in Python, so it stays eager (torch.compiler.disable, a graph break): norms, projections,
LoRA, rope and SwiGLU are compiled. Its segment lengths reach it through one holder object: a list passed
into the compiled block is guarded by its length, so each new number of samples per row recompiled the
block, and after torch's recompile limit (8) the blocks silently ran eager.
`scripts/bench_levers.py` measures it (the regional_compile lever); tests/test_regional_compile.py checks
that it computes the eager model's loss and gradients without recompiling for new packings.
"""

from __future__ import annotations

import functools

import torch

from petformers.models import llama


class _Segments:
    """The current row layout for segment_attention: the compiled block sees this one object every call
    (dynamo guards its identity and never reads it; only the eager segment_attention does)."""

    lengths: list[list[tuple[int, int]]] | None = None  # (length, shared prefix) per segment, per row


_SEGMENTS = _Segments()
_segment_attention = llama.segment_attention


@torch.compiler.disable
def _eager_segment_attention(q, k, v, lengths, **sdpa_kwargs):
    if isinstance(lengths, _Segments):
        lengths = lengths.lengths
    return _segment_attention(q, k, v, lengths, **sdpa_kwargs)


@functools.cache
def _compiled_block_forward():
    return torch.compile(llama.TransformerBlock.forward, dynamic=True)


def _block_forward(layer, x, cos, sin, mask, cache=None, segments=None):
    if segments is not None:
        _SEGMENTS.lengths, segments = segments, _SEGMENTS
    return _compiled_block_forward()(layer, x, cos, sin, mask, cache, segments)


def compile_blocks(model: llama.Llama) -> llama.Llama:
    """Run each of model's decoder blocks through the one compiled block forward, in place. Sets
    llama.segment_attention to its eager form for the whole process: outside a compiled region, and for a
    plain list of lengths, it computes what it always did."""
    llama.segment_attention = _eager_segment_attention
    for layer in model.layers:
        layer.forward = functools.partial(_block_forward, layer)
    return model
