"""Seconds per weight sync on a local Ray, with the driver out of the path against the old
design with the driver in it, same actors, interleaved (new, old, new, old, ...).

- new: ``RayCluster.sync_weights``. Learner rank 0 exports, casts, hashes and puts the update
  from inside its actor; the driver forwards the small ``Published`` note; each rollout worker
  pulls, hashes and loads.
- old (emulated here): the driver fetches the learner's export, casts, hashes and puts it
  itself, then calls the workers the same way.

For a 0.5B-shaped model (Qwen2.5-0.5B dims, random fp32 weights, built once into the cache;
a fp32 learner and, unless ``--rollout-dtype`` says otherwise, fp32 rollout workers) under LoRA
(the adapter alone travels) and under full fine-tuning (every weight), with the driver's peak
resident-memory growth during each sync: the old path pulls the whole update through the
driver, the new one only a note. Read-back (workers re-export and hash what they loaded) is
on for one sync of each path, reported apart, and off for the timed rounds.
Figures are printed, not asserted.

Memory, 24 layers, fp32 rollout: a full-weight sync briefly holds ~5.9 GB in each rollout
worker (its model plus about two copies of the update as it arrives) and ~5.6 GB more in the
driver on the old path; with the object store that is ~18 GB, more than a shared 24 GiB
machine may have free (Ray's memory monitor then kills a worker).

    python bench/sync_seconds.py [--layers 24] [--repeats 3] [--rollout-dtype float32]
        [--methods lora,none]

``--transports`` compares the two transports instead, on the same actors and interleaved
(object store, collective, object store, ...): the current path against
``resources.weight_transport=collective`` (learner rank 0 broadcasts over gloo), for each
rollout worker count in ``--workers`` (2,4); the first sync of each (for the collective, its
group's rendezvous) is a warm-up, not timed; only the cluster's first sync reads back.

    python bench/sync_seconds.py --transports --workers 2,4 [--layers 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from sync_bytes import SHAPES
from transformers import AutoTokenizer, Qwen2ForCausalLM

from dist_ft.cluster import make_cluster
from dist_ft.config import load_config
from dist_ft.model.loading import resolve_model_path
from dist_ft.model.tiny import cache_dir
from dist_ft.run.specs import actor_spec, component_specs
from dist_ft.sync import check_fingerprints, describe, make_transport, to_rollout_dtype

ROLLOUT_WORKERS, LEARNERS = 2, 1
# Large: only the first sync of the new path reads back (RayCluster reads back on sync 0).
READ_BACK_EVERY = 10**9


def build_cluster(
    model_path: str, method: str, rollout_dtype: str, workers: int = ROLLOUT_WORKERS
) -> Any:
    """A RayCluster through the real construction path: config, component specs, make_cluster."""
    cfg = load_config(
        None,
        [
            f"model.path={model_path}",
            f"peft.method={method}",
            "peft.r=16",
            f"rollout.dtype={rollout_dtype}",
            "resources.mode=ray",
            "resources.ray_address=local",
            f"resources.rollout_workers={workers}",
            f"resources.learners={LEARNERS}",
            "run.wandb=disabled",
        ],
    )
    rollout, learner = component_specs(cfg, resolve_model_path(model_path, cfg.model.tiny))
    actors = actor_spec(cfg, gpu=learner.device == "cuda")
    return make_cluster(rollout, learner, cfg.resources, actors, None, READ_BACK_EVERY)


def ensure_model(layers: int) -> Path:
    """A Qwen2.5-0.5B-shaped model with ``layers`` layers, random fp32 weights, built once.

    The tokenizer is the tiny model's (~100 tokens against a 151,936-row embedding): generation
    never runs here, and the loaders only need one to be there."""
    target = cache_dir() / "bench" / f"qwen2.5-0.5b-shape-L{layers}"
    if (target / "config.json").exists():
        return target
    config = copy.deepcopy(SHAPES["0.5B (Qwen2.5-0.5B dims)"])
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temp dir and renamed, as the tiny model is: no half-written model is ever seen.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        print(f"building {target} (once)", file=sys.stderr)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
        tiny = resolve_model_path("tiny", load_config(None, []).model.tiny)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp)
        with contextlib.suppress(OSError):  # another process built it first: same model
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sync_through_driver(cluster: Any, read_back: bool) -> int:
    """The old design, with the cluster's own actors: the driver fetches rank 0's export,
    casts, hashes and puts it, then calls each worker as ``sync_weights`` does. Returns the
    bytes sent."""
    ref = cluster.learners[0].__ray_call__.remote(
        lambda h: (h.learner.version, h.learner.export_weights())
    )
    version, tensors = ray.get(ref)
    del ref  # the export's copy in the object store goes now, not after the sync
    tensors = to_rollout_dtype(tensors, cluster.rollout_dtype)
    # Held as the cluster's latest, as sync_weights holds its own: the previous update leaves
    # the store before the workers pull this one (holding both would be the bench's artefact).
    update = cluster._update = describe(version, tensors, ray.put(tensors))
    del tensors  # the driver lets go of its copy as soon as the store holds one
    refs = [w.set_weights.remote(update, cluster.transport, read_back) for w in cluster.workers]
    check_fingerprints(update, ray.get(refs), read_back)
    return update.nbytes


class PeakRSS:
    """Peak growth of this process's resident memory while the block runs, in bytes, sampled
    every 5 ms by a thread. (ru_maxrss is the lifetime peak: once the first old-path
    sync has raised it, later syncs of either path could not move it.)"""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


@dataclass
class Runs:
    """One path's syncs: seconds and the driver's peak RSS growth (bytes) of each."""

    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def add(self, seconds: float, rss: int) -> None:
        self.seconds.append(seconds)
        self.rss.append(rss)


def timed(label: str, sync: Any, into: Runs) -> int:
    """Run ``sync()`` (which returns the bytes it sent), recording its seconds and RSS growth."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        nbytes = sync()
        seconds = time.perf_counter() - t0
    into.add(seconds, mem.growth)
    print(f"  {label:14} {seconds:8.3f} s  driver RSS +{mem.growth >> 20} MiB", file=sys.stderr)
    return nbytes


def measure(model_path: str, method: str, rollout_dtype: str, repeats: int) -> dict[str, Any]:
    cluster = build_cluster(model_path, method, rollout_dtype)
    try:
        new, old, new_rb, old_rb = Runs(), Runs(), Runs(), Runs()
        # Warm-up, not reported: the first large put and get in each process fault in its
        # mapping of the object store, a cost that would fall on whichever path went first.
        sync_through_driver(cluster, read_back=False)
        # The first sync of each path reads back (the new one's because it is the cluster's
        # first); every later one only hashes what arrived: the steady state.
        nbytes = timed("new, read-back", lambda: cluster.sync_weights().nbytes, new_rb)
        old_bytes = timed("old, read-back", lambda: sync_through_driver(cluster, True), old_rb)
        assert old_bytes == nbytes, (old_bytes, nbytes)
        for _ in range(repeats):
            timed("new", lambda: cluster.sync_weights().nbytes, new)
            timed("old", lambda: sync_through_driver(cluster, False), old)
    finally:
        cluster.shutdown()
    return {"bytes": nbytes, "new": new, "old": old, "new_rb": new_rb, "old_rb": old_rb}


def measure_transports(
    model_path: str, method: str, rollout_dtype: str, repeats: int, workers: int
) -> dict[str, Any]:
    """Object store against collective on one cluster: the transport is swapped between syncs
    (the cluster hands its current one to every call)."""
    cluster = build_cluster(model_path, method, rollout_dtype, workers)
    collective = make_transport("collective", "ray")
    collective.setup()
    transports = {"object_store": cluster.transport, "collective": collective}
    runs = {name: Runs() for name in transports}
    try:
        for transport in transports.values():  # warm-up: read-back, the group's rendezvous
            cluster.transport = transport
            nbytes = cluster.sync_weights().nbytes
        for _ in range(repeats):
            for name, transport in transports.items():
                cluster.transport = transport
                timed(name, lambda: cluster.sync_weights().nbytes, runs[name])
    finally:
        collective.close()
        cluster.shutdown()
    return {"bytes": nbytes, **runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (0.5B has 24)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (new, old)")
    # bfloat16 halves the update (sync_bytes.py's 0.5B row) and the workers' memory, but under
    # LoRA the first sync fails its read-back for now: peft keeps the workers' adapter in fp32.
    parser.add_argument(
        "--rollout-dtype", default="float32", choices=("float32", "bfloat16", "float16")
    )
    parser.add_argument("--methods", default="lora,none", help="peft.method values, in order")
    parser.add_argument("--transports", action="store_true", help="object store vs collective")
    parser.add_argument("--workers", default="2,4", help="rollout worker counts (--transports)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    model_path = ensure_model(args.layers)
    full_bytes = (model_path / "model.safetensors").stat().st_size  # fp32, tied: stored once
    mib = 1 << 20

    workers = max(map(int, args.workers.split(","))) if args.transports else ROLLOUT_WORKERS
    print(
        f"0.5B-shaped model (Qwen2.5-0.5B dims, {args.layers} layers, random weights); "
        f"learner fp32, rollout {args.rollout_dtype}; local Ray, {LEARNERS} learner + "
        f"{args.workers if args.transports else ROLLOUT_WORKERS} rollout workers, "
        f"{os.cpu_count()} cores"
    )
    print("method: peft.method (none: full fine-tuning, every weight travels)")
    # The store's peak: the last published update, the export on its way to the driver and the
    # driver's own put, under full fine-tuning; plus slack. Ray's default (30% of the memory
    # free at start) depends on what else the shared machine runs.
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, workers + LEARNERS),  # 1 CPU slot per actor
        object_store_memory=3 * full_bytes + (1 << 30),
        include_dashboard=False,
        log_to_driver=False,
    )
    if args.transports:
        try:
            compare_transports(args, str(model_path))
        finally:
            ray.shutdown()
        print(f"total {time.perf_counter() - t_start:.0f} s")
        return
    print("new: learner rank 0 exports, hashes and puts; the driver forwards the note")
    print("old: the driver fetches the export, hashes and puts it, then calls the workers")
    print(f"read-back off; {args.repeats} interleaved rounds; seconds: median [min-max]")
    print(
        f"{'method':6} {'bytes/sync':>15} {'new s':>24} {'old s':>24} {'old/new':>8}"
        f"  driver RSS peak +MiB new / old",
        flush=True,
    )
    results = {}
    try:
        # Each row as soon as it is measured: LoRA's survives a later out-of-memory.
        for method in args.methods.split(","):
            print(f"peft.method={method}: {args.repeats} rounds", file=sys.stderr)
            r = results[method] = measure(str(model_path), method, args.rollout_dtype, args.repeats)
            new, old = r["new"], r["old"]
            ratio = statistics.median(old.seconds) / statistics.median(new.seconds)
            print(
                f"{method:6} {r['bytes']:>15,} {span(new):>24} {span(old):>24} {ratio:>7.2f}x"
                f"  {max(new.rss) / mib:8.1f} / {max(old.rss) / mib:8.1f}",
                flush=True,
            )
    finally:
        ray.shutdown()
    print("read-back on: one sync of each path, after a warm-up")
    for method, r in results.items():
        new, old = r["new_rb"], r["old_rb"]
        print(
            f"{method:6} read-back  new {new.seconds[0]:.3f} s  old {old.seconds[0]:.3f} s"
            f"  driver RSS peak +MiB {new.rss[0] / mib:.1f} / {old.rss[0] / mib:.1f}"
        )
    print(f"total {time.perf_counter() - t_start:.0f} s")


def compare_transports(args: argparse.Namespace, model_path: str) -> None:
    print("object_store: rank 0 puts once, each worker pulls; collective: rank 0 broadcasts (gloo)")
    print(f"read-back off; {args.repeats} interleaved rounds; seconds: median [min-max]")
    print(
        f"{'method':6} {'workers':>7} {'bytes/sync':>15} {'object_store s':>24} "
        f"{'collective s':>24} {'store/coll':>10}",
        flush=True,
    )
    for method in args.methods.split(","):
        for workers in map(int, args.workers.split(",")):
            print(f"peft.method={method}, {workers} workers", file=sys.stderr)
            r = measure_transports(model_path, method, args.rollout_dtype, args.repeats, workers)
            store, coll = r["object_store"], r["collective"]
            ratio = statistics.median(store.seconds) / statistics.median(coll.seconds)
            print(
                f"{method:6} {workers:>7} {r['bytes']:>15,} {span(store):>24} {span(coll):>24} "
                f"{ratio:>9.2f}x",
                flush=True,
            )


def span(r: Runs) -> str:
    s = r.seconds
    return f"{statistics.median(s):8.3f} [{min(s):.3f}-{max(s):.3f}]"


if __name__ == "__main__":
    main()
