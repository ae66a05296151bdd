"""The fleet cost model (dist_ft/costmodel.py), phase by phase, against figures worked out by
hand."""

import pytest

from dist_ft.costmodel import Rates, StepShape, cost_table, predict

# 1,000 samples of 100 + 100 tokens, 1 kB payload each, a 1 GB sync of a 1e9-weight model
SHAPE = StepShape(
    samples=1000,
    prompt_tokens=100,
    completion_tokens=100,
    payload_bytes=1000,
    sync_bytes=10**9,
    full_bytes=10**9,
    params=10**9,
    full=True,
    learners=2,
)
# 1,000 completion tokens/s, 100 TFLOP/s, 8 Gbit/s = 1e9 bytes/s, 2 driver ms per worker
RATES = Rates(worker_tokens_per_s=1000, learner_tflops=100, link_gbps=8, driver_ms_per_worker=2)


def test_each_phase_of_a_step():
    c = predict(SHAPE, 10, "object_store", RATES)
    assert c.generate_s == pytest.approx(100 * 100 / 1000)  # 100 samples per worker: 10 s
    assert c.payload_s == pytest.approx(2 * 1000 * 1000 / 1e9)  # in and out of the driver
    # 6 FLOPs per weight and token (full), 2e5 tokens, over 2 ranks at 1e14 FLOP/s
    assert c.train_s == pytest.approx(6 * 1e9 * 2e5 / 2e14)
    assert c.sync_s == pytest.approx(10 * 1.0)  # ten copies over rank 0's link
    assert c.driver_s == pytest.approx(0.02)
    assert c.step_s == pytest.approx(10 + 0.002 + 6 + 10 + 0.02)
    assert c.bytes == 2 * 10**6 + 10 * 10**9


def test_uneven_shares_wait_for_the_largest_and_peft_skips_weight_gradients():
    lora = StepShape(**{**vars(SHAPE), "full": False})
    c = predict(lora, 3, "object_store", RATES)
    assert c.generate_s == pytest.approx(334 * 100 / 1000)  # ceil(1000 / 3) samples
    assert c.train_s == pytest.approx(4 * 1e9 * 2e5 / 2e14)


def test_the_collective_sync_grows_with_the_log_of_the_fleet_the_store_linearly():
    for workers, rounds in ((1, 1), (3, 2), (7, 3), (8, 4), (1000, 10)):
        assert predict(SHAPE, workers, "collective", RATES).sync_s == pytest.approx(rounds)
        assert predict(SHAPE, workers, "object_store", RATES).sync_s == pytest.approx(workers)


def test_the_table_has_a_row_per_fleet_size():
    lines = cost_table(SHAPE, [8, 1000], "collective", RATES)
    assert lines[0].split() == [
        "workers", "step", "s", "generate", "payload", "train", "sync", "driver", "bytes/step",
    ]  # fmt: skip
    # 1000 workers: 1 sample each (0.1 s), 0.002 s payload, 6 s train, 10 s sync, 2 s driver
    assert lines[2].split() == ["1,000", "18.1", "0.1", "0.00", "6.0", "10.0", "2.00", "1.0", "TB"]
