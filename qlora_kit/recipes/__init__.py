"""Runnable recipes: `python -m qlora_kit.recipes.<name>`."""
