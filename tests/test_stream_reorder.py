"""Layer-major gradient accumulation gives the plain order's losses, gradients and update, with
each streamed layer copied twice per optimizer step instead of twice per micro-batch."""

import pytest
import torch

from qlora_kit.data.batches import collate
from qlora_kit.memory.reorder import LayerMajorStep, layer_major_driver
from qlora_kit.train.loss import batch_loss_sum, count_trained_tokens
from stream_models import CPU, lora_model, one_thread  # noqa: F401 - one_thread is an autouse fixture
from tiny_models import save_tiny_model
LAYERS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("reorder") / "llama", "llama", num_hidden_layers=LAYERS)


def micro_batches(count=3):
    """Micro-batches of different lengths, padded, with prompt tokens left out of the loss."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        examples = []
        for length in torch.randint(6, 20, (2,), generator=generator).tolist():
            ids = torch.randint(3, 500, (length,), generator=generator).tolist()
            examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
        batches.append(collate(examples, pad_token_id=0))
    return batches


def plain_step(model, batches, step_trained):
    total = torch.zeros(())
    for batch in batches:
        loss_sum = batch_loss_sum(model, batch)
        (loss_sum / step_trained).backward()
        total += loss_sum.detach()
    return total


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_layer_major_equals_plain_order(folder):
    batches = micro_batches()
    step_trained = int(sum(count_trained_tokens(b["labels"]) for b in batches))
    plain, _ = lora_model(folder)
    reordered, streamer = lora_model(folder, resident_layers=2)
    driver = LayerMajorStep(reordered, streamer, CPU, verify_recompute=True)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, reordered)]
    for step in range(2):
        streamer.reset_stats()
        loss_plain = plain_step(plain, batches, step_trained)
        loss_reordered = driver(batches, step_trained)
        torch.testing.assert_close(loss_reordered, loss_plain, rtol=1e-6, atol=0)
        assert driver.recompute_max_diff == 0.0
        grads_plain, grads_reordered = lora_grads(plain), lora_grads(reordered)
        assert grads_plain.keys() == grads_reordered.keys() and len(grads_plain) == 2 * 7 * LAYERS
        for name in grads_plain:
            torch.testing.assert_close(grads_reordered[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # every streamed layer crossed twice in this step (once less for the one kept from the last step)
        assert streamer.stats.copies <= 2 * len(streamer.streamed)
        assert streamer.stats.max_in_flight <= 2 and streamer.stats.evictions == 0
    weights_plain = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in reordered.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, weights_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # the model still works the plain way afterwards (hooks and checkpointing restored)
    with torch.no_grad():
        torch.testing.assert_close(batch_loss_sum(reordered, batches[0]), batch_loss_sum(plain, batches[0]))


@pytest.mark.gpu
def test_cuda_layer_major_equals_plain_order(folder):
    """Boundaries through pinned slabs and a side stream, layers streamed: the plain order's loss and gradients."""
    cuda = torch.device("cuda")
    batches = micro_batches()
    step_trained = int(sum(count_trained_tokens(b["labels"]) for b in batches))
    plain, _ = lora_model(folder, device=cuda)
    reordered, streamer = lora_model(folder, resident_layers=2, device=cuda)
    driver = LayerMajorStep(reordered, streamer, cuda, verify_recompute=True)
    for _ in range(2):  # the second step reuses the first one's pinned slabs
        loss_plain = torch.zeros((), device=cuda)
        for batch in batches:
            loss_sum = batch_loss_sum(plain, {k: v.to(cuda) for k, v in batch.items()})
            (loss_sum / step_trained).backward()
            loss_plain += loss_sum.detach()
        loss_reordered = driver(batches, step_trained)
        torch.testing.assert_close(loss_reordered, loss_plain, rtol=1e-5, atol=0)
        assert driver.recompute_max_diff < 1e-5
        grads_plain, grads_reordered = lora_grads(plain), lora_grads(reordered)
        for name in grads_plain:
            torch.testing.assert_close(grads_reordered[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
        plain.zero_grad(set_to_none=True)
        reordered.zero_grad(set_to_none=True)
    assert streamer.stats.max_in_flight <= 2


def test_recompute_draws_the_same_dropout_masks(folder):
    model, streamer = lora_model(folder, resident_layers=2, dropout=0.3)
    driver = LayerMajorStep(model, streamer, CPU, verify_recompute=True)
    batches = micro_batches(2)
    loss = driver(batches, int(sum(count_trained_tokens(b["labels"]) for b in batches)))
    assert driver.recompute_max_diff == 0.0  # each layer recomputed exactly what the forward stored
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_driver_only_when_streaming_and_accumulating(folder):
    model, streamer = lora_model(folder, resident_layers=2)
    assert layer_major_driver(model, streamer, True, 4, 1, CPU) is not None
    assert layer_major_driver(model, streamer, True, 1, 1, CPU) is None
    assert layer_major_driver(model, streamer, False, 4, 1, CPU) is None
    assert layer_major_driver(model, None, True, 4, 1, CPU) is None
