"""Loading the quantized base model, finding its projections, and adding LoRA adapters."""
