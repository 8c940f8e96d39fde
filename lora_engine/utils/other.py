"""Two small model helpers of peft 0.21.2's ``peft.utils.other`` that user code imports from the top level."""

from __future__ import annotations

import torch


def cast_mixed_precision_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen parameter of ``model`` to ``dtype`` (fp16/bf16) and every trainable one to fp32, in
    place: half-precision frozen weights save memory, fp32 adapters keep mixed-precision training stable."""
    for param in model.parameters():
        param.data = param.to(dtype if not param.requires_grad else torch.float32)


def shift_tokens_right(
    input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int
) -> torch.Tensor:
    """``[B, T]`` token ids shifted one position right, ``decoder_start_token_id`` first and label padding
    (-100) replaced by ``pad_token_id``: decoder inputs from labels. A new tensor; ``input_ids`` is untouched."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; the model config must define pad_token_id to shift labels")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)
