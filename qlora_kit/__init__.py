"""qlora_kit: QLoRA fine-tuning of causal language models on one GPU you own."""

__version__ = "0.1.0"
