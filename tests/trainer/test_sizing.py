"""`coordinator run` refuses a model whose training state cannot fit the trainer's device."""

import pytest

from trainer.sizing import ModelTooLargeError, check_fits, refuse_oversized, training_bytes

GIB = 2**30


def test_training_bytes_shard_over_gpus_not_over_one_host():
    # 7B x 16 bytes = 112 GB; 8 GPUs hold 14 GB each; CPU ranks all live in one host.
    assert training_bytes(7_000_000_000, "cuda", 1) == 112_000_000_000
    assert training_bytes(7_000_000_000, "cuda", 8) == 14_000_000_000
    assert training_bytes(7_000_000_000, "cpu", 8) == 112_000_000_000
    assert training_bytes(3, "cuda", 2) == 24  # 48 / 2


def test_a_model_that_fits_passes_and_one_that_does_not_says_what_to_do():
    refuse_oversized("m", 1_000_000_000, "cuda", 2, 8 * GIB)  # 8e9 bytes <= 8.59e9
    with pytest.raises(ModelTooLargeError) as e:
        refuse_oversized("m", 1_000_000_000, "cuda", 1, 8 * GIB)  # 16e9 > 8.59e9
    # 16e9 / 8.59e9 = 1.86: two GPUs
    assert "--trainer-procs 2" in str(e.value) and "14.9 GiB" in str(e.value)
    with pytest.raises(ModelTooLargeError, match="--device cuda"):
        refuse_oversized("m", 1_000_000_000, "cpu", 4, 8 * GIB)


def test_the_tiny_model_fits_this_machine():
    check_fits("tiny", "cpu", 1)


def test_lora_holds_a_quarter_of_full_training_and_is_offered_when_full_does_not_fit():
    # 7B: full 16 bytes each = 112 GB; LoRA keeps the frozen fp32 weights only, 28 GB
    assert training_bytes(7_000_000_000, "cuda", 1, lora=True) == 28_000_000_000
    with pytest.raises(ModelTooLargeError, match=r"trainer\.lora\.rank"):
        refuse_oversized("m", 7_000_000_000, "cuda", 1, 40 * GIB)
    refuse_oversized("m", 7_000_000_000, "cuda", 1, 40 * GIB, lora=True)  # 28e9 fits 42.9e9
    with pytest.raises(ModelTooLargeError, match="frozen fp32 weights") as e:
        refuse_oversized("m", 7_000_000_000, "cuda", 1, 16 * GIB, lora=True)
    # 28e9 / 17.2e9 = 1.63: FSDP2 shards the frozen base over two GPUs; LoRA is not re-offered
    assert "--trainer-procs 2" in str(e.value) and "lora.rank" not in str(e.value)
    refuse_oversized("m", 7_000_000_000, "cuda", 2, 16 * GIB, lora=True)
    assert training_bytes(7_000_000_000, "cpu", 2, lora=True) == 28_000_000_000
