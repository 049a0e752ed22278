"""Quantized frozen bases for QLoRA: NF4/FP4 (QLoRA), int8 (row absmax) and GGUF blocks kept as stored.

- `blockwise`: 4-bit NF4/FP4 and 8-bit dynamic blockwise codes (bitsandbytes' formats, bit for bit);
- `int8`: row-wise absmax int8 (bitsandbytes' LLM.int8 vector-wise quantization, no outliers);
- `gguf_blocks`: llama.cpp's block formats, dequantized with vectorised torch ops (the one owner of
  that rule: the GGUF reader uses it too);
- `weight`: the storage modules (`QuantizedWeight` and its formats), each with `dequantize(dtype)`;
- `linear`: `QuantLinear`, the frozen linear layer that dequantizes on the fly in forward and backward;
- `model`: which layers are quantized (QLoRA's rule) and replacing them in a model.
"""
