"""Peak memory of the merge stays a few copies of the largest tensor, however big the model (measured in a child)."""

from transformers import LlamaConfig

from qlora_kit.bench.export import measure_merge, memory_bound
from qlora_kit.bench.random_model import write_random_model, write_random_run

# 16 layers whose largest tensors are the MLP projections, 512 x 4096 in bf16: 4 MiB each, 228 MiB in all.
CONFIG = dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=False)
LARGEST = 512 * 4096 * 2
SLACK = 64 << 20  # what building the model skeleton, late imports and the allocator's caches add


def test_peak_rss_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    base = write_random_model(tmp_path / "base", LlamaConfig(**CONFIG), max_shard_size="64MB")
    # compute dtype float32: the NF4 round trip then holds the most (a bf16 tensor cast to fp32, then dequantized)
    run = write_random_run(tmp_path / "run", base, compute_dtype="float32")
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    # Row chunks of 4 MiB (default 64 MiB), so that the tensors, not the working buffers, dominate.
    figures = measure_merge(run, tmp_path / "merged", "nf4", max_shard_size="16MB", device="cpu", chunk_bytes=4 << 20)
    assert figures["largest_tensor_bytes"] == LARGEST
    assert figures["shards"] > 10 and figures["merged_modules"] == 16 * 7
    growth = figures["peak_rss_bytes"] - figures["rss_before_bytes"]
    assert figures["peak_rss_bytes"] < memory_bound(LARGEST)  # the bound: 3 x largest + 1.5 GB
    # Holding the model would take more than model_bytes; the merge holds a few copies of one tensor.
    assert growth < 3 * LARGEST + SLACK < model_bytes / 2, (growth >> 20, model_bytes >> 20)
