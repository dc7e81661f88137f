"""Export: the base model with the LoRA adapters folded in, as an ordinary full-precision model folder.

merge.py streams the base checkpoint tensor by tensor into sharded safetensors (qlora_kit.io.shards
writes them), re-quantizing the projections as training saw them (nf4.py) and adding each adapter's
delta (adapter.py); folder.py keeps the user's folders safe; verify.py compares the merged model
with the adapter model.
"""
