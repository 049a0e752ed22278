"""petformers: parameter-efficient fine-tuning of Llama-family models on PyTorch."""

__version__ = "0.1.0"
