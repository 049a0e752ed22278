"""Fill a model built on the meta device with real tensors, once, in the asked dtype.

Loaders yield (petformers_name, tensor) pairs; each tensor is checked and converted as it arrives
and assigned in place of the meta parameter, so the full model is never held twice.
"""

from __future__ import annotations

from typing import Iterable

import torch

from petformers.errors import CheckpointError
from petformers.models.llama import Llama


def materialize(model: Llama, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device="cpu", source: str = "checkpoint") -> Llama:
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if tied and name == "lm_head.weight":
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not a parameter of this Llama model)")
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model config expects {want}")
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    model.load_state_dict(loaded, strict=False, assign=True)  # completeness checked above
    model.tie_weights()
    return model.requires_grad_(False).eval()
