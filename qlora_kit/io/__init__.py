"""The I/O layer: safetensors headers, tensors and shards (safetensors.py, shards.py), and folders
written atomically (atomic.py). It imports no model library, so any stage can use it cheaply."""
