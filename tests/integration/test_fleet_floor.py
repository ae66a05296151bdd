"""The elastic fleet's floor on one machine: a private Ray that advertises one `rollout` unit,
`resources.rollout_workers=auto`, and `resources.min_rollout_workers=2`. The run waits for a
second unit that never comes and stops with a FleetError naming the key, as a TimeoutError (the
CLI's one-line, exit-1 class). Joins and losses need hosts: tests/slow/test_fleet.py."""

import time

import pytest
from support import build

from dist_ft.cluster.fleet import FleetError


@pytest.fixture
def ray_with_one_rollout_unit():
    import ray

    ray.init(address="local", num_cpus=4, resources={"rollout": 1}, include_dashboard=False)
    yield
    ray.shutdown()


def test_below_min_rollout_workers_the_run_waits_then_stops_naming_the_key(
    tiny_path, demo_prompts, ray_with_one_rollout_unit
):
    from dist_ft.cluster.placement import ActorSpec
    from dist_ft.cluster.ray import RayCluster

    _, wk, lk = build(tiny_path, "algo.prompts_per_step=2")
    cluster = RayCluster(wk, lk, ActorSpec("auto", 1, min_rollout_workers=2), "local")
    # the fleet waits resources.actor_timeout_s (600 s here): a short wait for the test, set
    # after the actors have started (their start-up is bounded by the same setting)
    cluster.fleet.timeout_s = 3.0
    try:
        assert cluster.fleet.elastic and len(cluster.workers) == 1  # one per `rollout` unit
        cluster.sync_weights()
        t0 = time.monotonic()
        with pytest.raises(FleetError, match=r"live for 3 s .*min_rollout_workers=2") as e:
            cluster.submit_rollout(1, demo_prompts[:2])
        assert isinstance(e.value, TimeoutError)
        assert 3.0 <= time.monotonic() - t0 < 30.0  # the timeout, not forever
        assert cluster.fleet_stats()["fleet/workers"] == 1.0
    finally:
        cluster.shutdown()
