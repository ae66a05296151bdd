"""The weight transport: rank 0 publishes from inside its actor, the driver forwards a note
(never the tensors), workers hash what they receive, and a read-back every Nth sync (every sync
in debug mode) catches a load that silently converts what it was given."""

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from support import build

from dist_ft.cluster.local import LocalCluster
from dist_ft.rollout import RolloutWorker
from dist_ft.sync import Published, SyncMismatchError, fingerprint, make_transport
from dist_ft.sync.inprocess import InProcessTransport


def tensors_in(obj) -> list[str]:
    """Paths of every torch.Tensor reachable from ``obj`` (dataclasses, dicts, sequences)."""
    if isinstance(obj, torch.Tensor):
        return ["."]
    if is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return []
    return [f"{k}/{p}" for k, v in items for p in tensors_in(v)]


def test_the_driver_never_holds_a_weight_tensor_during_a_ray_sync(tiny_path):
    import ray
    from ray.core.generated.common_pb2 import Address

    from dist_ft.cluster.placement import ActorSpec
    from dist_ft.cluster.ray import RayCluster

    _, wk, lk = build(tiny_path, "algo.prompts_per_step=2")
    cluster = RayCluster(wk, lk, ActorSpec(2, 1), "local")
    try:
        sync = cluster.sync_weights()
        # What the driver received from the learner, and forwarded to the workers: a note.
        update = cluster._update
        assert isinstance(update, Published) and tensors_in(update) == []
        assert isinstance(update.handle, ray.ObjectRef)
        # The object was put by the learner actor, which owns it, not by the driver.
        owner = Address()
        owner.ParseFromString(update.handle.owner_address())
        learner_worker = ray.get(
            cluster.learners[0].__ray_call__.remote(
                lambda _s: ray.get_runtime_context().get_worker_id()
            )
        )
        assert owner.worker_id.hex() == learner_worker
        assert owner.worker_id.hex() != ray.get_runtime_context().get_worker_id()
        # ... and the workers hold exactly what the learner exports.
        exported = ray.get(
            cluster.learners[0].__ray_call__.remote(
                lambda h: fingerprint(h.learner.export_weights())
            )
        )
        assert update.fingerprint == exported
        assert ray.get([w.fingerprint.remote() for w in cluster.workers]) == [exported] * 2
        assert sync.nbytes == sum(
            t.nbytes for t in ray.get(update.handle).values()
        )  # a test may fetch it; the cluster never does
    finally:
        cluster.shutdown()


@pytest.fixture
def ray_sees_tests():
    """A local Ray whose workers can import tests/generators.py, as a user's engine module
    would be importable on their cluster."""
    import ray

    tests = str(Path(__file__).resolve().parents[1])
    ray.init(
        address="local",  # private: never another Ray that discovery finds on the machine
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests}},
    )
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "transport",
    ["object_store", "collective", "transports:DirTransport", "transports:RendezvousTransport"],
)
def test_a_ray_sync_reads_back_every_nth_and_catches_a_lossy_load(
    tiny_path, ray_sees_tests, transport
):
    """The built-in transport and a user's (tests/transports.py, chosen by its config name)
    pass the same checks: bytes hashed on arrival every sync, read back every Nth. The
    rendezvous transport sends only while a worker receives, as a broadcast does."""
    from dist_ft.cluster.placement import ActorSpec
    from dist_ft.cluster.ray import RayCluster

    _, wk, lk = build(
        tiny_path, "algo.prompts_per_step=2", "rollout.generator=generators:DriftingLoader"
    )
    cluster = RayCluster(
        wk,
        lk,
        ActorSpec(1, 1),
        "local",
        read_back_every=2,
        transport=make_transport(transport, "ray"),
    )
    try:
        cluster.sync_weights()  # sync 0: read back, the load was exact
        cluster.sync_weights()  # sync 1: bytes hashed on arrival (right); the load drifts unseen
        with pytest.raises(SyncMismatchError, match=r"workers \[0\] after loading hold"):
            cluster.sync_weights()  # sync 2: read back
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("transport", ["inprocess", "transports:DirTransport"])
def test_debug_mode_reads_back_every_sync(tiny_path, transport):
    _, wk, lk = build(
        tiny_path, "algo.prompts_per_step=2", "rollout.generator=generators:DriftingLoader"
    )
    cluster = LocalCluster(wk, lk, transport=make_transport(transport, "local"))
    cluster.sync_weights()
    with pytest.raises(SyncMismatchError, match="after loading hold"):
        cluster.sync_weights()
    cluster.shutdown()


def test_an_engine_that_cannot_read_back_is_checked_by_the_bytes_that_arrive(tiny_path):
    """Read-back is an engine capability: without export_weights the worker hashes what arrived
    (a damaged delivery is still refused, nothing loaded) and the conversion its load makes goes
    unseen, where the same engine with read-back fails the second sync
    (test_debug_mode_reads_back_every_sync)."""
    _, wk, lk = build(
        tiny_path, "algo.prompts_per_step=2", "rollout.generator=generators:NoReadBack"
    )
    cluster = LocalCluster(wk, lk)
    worker = cluster.workers[0]
    assert not worker.reads_back
    cluster.sync_weights()
    cluster.sync_weights()  # the drifting load: no read-back to catch it, no error
    update = InProcessTransport().publish(3, cluster.learner.export_weights())
    assert worker.set_weights(update, DamagingTransport(), read_back=True) != update.fingerprint
    assert worker.version == 0  # the damaged bytes were not loaded
    assert worker.set_weights(update, InProcessTransport(), read_back=True) == update.fingerprint
    assert worker.version == 3


def test_a_transport_named_in_the_config_carries_every_sync_of_a_run(tiny_path, tmp_path):
    """``resources.weight_transport=transports:DirTransport`` reaches the cluster: the run's
    syncs go through its files (each hashed on arrival and read back in debug mode), and its
    scratch directory is gone after the run."""
    from transports import DirTransport

    from dist_ft.recipes.grpo import train

    cfg = build(
        tiny_path,
        "resources.weight_transport=transports:DirTransport",
        "run.steps=2",
        "grpo.sft_warmup_steps=0",
        f"run.output_dir={tmp_path / 'run'}",
        "run.plot=false",
    )[0]
    before = len(DirTransport.made)
    train(cfg)
    (transport,) = DirTransport.made[before:]
    # the start's weights (version 0), then one version per step, all through its files
    assert transport.published == [0, 1, 2]
    assert not Path(transport.root).exists()  # close() ran at shutdown


def test_a_collective_sync_keeps_its_group_and_a_lost_member_leaves(tiny_path):
    """``resources.weight_transport=collective`` on a local Ray, 2 workers, every sync read
    back: the broadcast group of (rank 0, worker 0, worker 1) is made once and reused; a worker
    SIGKILLed between syncs leaves the fleet at the next (Ray does not restart it: a restarted
    process would be a stranger to the group), and the survivor keeps getting exact weights,
    through a new group of its own; the group before is dropped, in rank 0 and the survivor."""
    import os
    import signal

    import ray

    from dist_ft.cluster.placement import ActorSpec
    from dist_ft.cluster.ray import RayCluster

    _, wk, lk = build(tiny_path, "algo.prompts_per_step=2")
    cluster = RayCluster(
        wk,
        lk,
        ActorSpec(2, 1),
        "local",
        read_back_every=1,
        transport=make_transport("collective", "ray"),
    )

    def held_groups(_self) -> list[tuple[int, ...]]:  # runs in the actor's process
        from dist_ft.sync import collective

        return [members for _, members, _ in collective._GROUPS.values()]

    def groups() -> list[list[tuple[int, ...]]]:  # of learner rank 0 and each live worker
        actors = [cluster.learners[0], *cluster.workers]
        return ray.get([a.__ray_call__.remote(held_groups) for a in actors])

    try:
        for _ in range(3):
            sync = cluster.sync_weights()
            held = ray.get([w.fingerprint.remote() for w in cluster.workers])
            assert held == [cluster._update.fingerprint] * 2 and sync.nbytes > 0
        assert groups() == [[(0, 1)]] * 3  # one rendezvous for three syncs
        os.kill(cluster.fleet.live[1].info["pid"], signal.SIGKILL)
        with pytest.warns(UserWarning, match="rollout worker 1 .* leaves the fleet"):
            cluster.sync_weights()
        assert [w.index for w in cluster.fleet.live] == [0]
        cluster.sync_weights()
        assert ray.get(cluster.workers[0].fingerprint.remote()) == cluster._update.fingerprint
        assert groups() == [[(0,)]] * 2
    finally:
        cluster.shutdown()


def test_a_transport_that_cannot_reach_the_workers_is_refused_by_name():
    with pytest.raises(
        ValueError, match=r"weight_transport=inprocess cannot reach .* resources\.mode=ray"
    ):
        make_transport("inprocess", "ray")
    with pytest.raises(ValueError, match=r"not a dist_ft\.sync\.WeightTransport subclass"):
        make_transport("generators:NaiveSampler", "local")
    with pytest.raises(ValueError, match="one of auto, inprocess, object_store"):
        make_transport("nccl", "local")
    with pytest.raises(ValueError, match=r"one process cannot do: use it with resources\.mode=ray"):
        make_transport("transports:RendezvousTransport", "local")


class DamagingTransport(InProcessTransport):
    """Delivers the update with one value changed, as a faulty link would."""

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        got = {k: v.clone() for k, v in update.handle.items()}
        name = sorted(got)[0]
        got[name].view(-1)[0] += 1.0
        return got


def test_a_worker_does_not_load_damaged_bytes(tiny_path):
    _, wk, _ = build(tiny_path, "algo.prompts_per_step=2")
    worker = RolloutWorker(wk)
    before = worker.fingerprint()
    sent = {k: v + 0.5 for k, v in worker.generator.export_weights().items()}
    update = InProcessTransport().publish(1, sent)
    print_ = worker.set_weights(update, DamagingTransport(), read_back=False)
    assert print_ != update.fingerprint
    assert worker.fingerprint() == before and worker.version == 0  # nothing was loaded
    # the same update through an intact transport loads, and is read back exactly
    assert worker.set_weights(update, InProcessTransport(), read_back=True) == update.fingerprint
    assert worker.version == 1
