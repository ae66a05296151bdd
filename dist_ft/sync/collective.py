"""Weights broadcast over torch.distributed, from learner rank 0 to the rollout workers, in
process groups of their own (gloo; the learners' DeepSpeed group is not touched).

Membership: a group is made for each set of receivers a sync goes to. The driver names the
members by worker index (never reused within a run) and numbers the group: a membership other
than the one bound last gets a new number, so each process keeps only the group of the sync
under way and drops (closes) the one before; a run whose fleet changes a thousand times holds
one group per process, not a thousand. A worker that joins gets the current version in a group
of two (rank 0 and itself); the next full sync makes the group of the new membership.
Why a group per membership and not one group grown in place: gloo groups cannot change size,
and a group per membership costs one rendezvous at the first sync after a change, then
nothing; the workers outside a new group keep running.

The rendezvous store runs on the driver (``setup``), listening on the driver's node address
alone; each member's gloo device listens on its own address towards the store, never on all
interfaces. A sync is one broadcast of one flat byte buffer (every tensor, in name order, as
bytes); the names, dtypes and shapes travel in the driver's note, and the receivers hash what
they rebuilt, as with every transport.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import torch

from dist_ft.sync.base import Published, WeightTransport, describe
from dist_ft.sync.rendezvous import address_towards, listening_fd

# This process's group, for each store (host, port): (group number, members, gloo group). One
# at a time: syncs never overlap, and a number is never used again for another group.
_GROUPS: dict[tuple[str, int], tuple[int, tuple[int, ...], Any]] = {}


class CollectiveTransport(WeightTransport):
    """``resources.weight_transport=collective``: see the module docstring."""

    blocking = True
    # A member that never joins a group or a broadcast fails the sync after this; gloo's
    # broadcast relays through members, so one lost mid-sync can hold the others that long.
    timeout_s = 300.0

    def __init__(self) -> None:
        self.host, self.port = "", 0
        self.members: tuple[int, ...] = ()  # worker indices of the receivers, in rank order
        self.rank = 0  # 0: learner rank 0 (the sender); i: members[i - 1]
        self.group = 0  # the group's number (bind)
        self._bound: tuple[int, ...] | None = None  # driver: the membership bound last
        self._server: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_server": None}  # the store server stays on the driver

    def setup(self) -> None:
        import ray
        import torch.distributed as dist

        self.host = ray.util.get_node_ip_address()
        fd, self.port = listening_fd(self.host)
        self._server = dist.TCPStore(
            self.host,
            self.port,
            is_master=True,
            master_listen_fd=fd,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )

    def bind(self, members: tuple[int, ...], rank: int) -> CollectiveTransport:
        # A new number for a membership seen before too: some of its processes may have
        # dropped its old group since, and a rendezvous under the old number would mix.
        if members != self._bound:
            self._bound, self.group = members, self.group + 1
        bound = copy.copy(self)
        bound.members, bound.rank, bound._server = members, rank, None
        return bound

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> Published:
        layout = [
            (name, tensors[name].dtype, tuple(tensors[name].shape)) for name in sorted(tensors)
        ]
        return describe(version, tensors, layout)

    def send(self, update: Published, tensors: dict[str, torch.Tensor]) -> None:
        buffer = torch.cat(
            [tensors[name].detach().contiguous().reshape(-1).view(torch.uint8)
             for name, _, _ in update.handle]
        )  # fmt: skip
        self._broadcast(buffer)

    def receive(self, update: Published) -> dict[str, torch.Tensor]:
        buffer = torch.empty(update.nbytes, dtype=torch.uint8)
        self._broadcast(buffer)
        out, at = {}, 0
        for name, dtype, shape in update.handle:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            # clone: a slice at an odd offset cannot be viewed as a wider dtype
            out[name] = buffer[at : at + n].clone().view(dtype).reshape(shape)
            at += n
        return out

    def _broadcast(self, buffer: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._group().broadcast([buffer], opts).wait()

    def _group(self) -> Any:
        import torch.distributed as dist

        key = (self.host, self.port)
        if key not in _GROUPS or _GROUPS[key][0] != self.group:
            _GROUPS.pop(key, None)  # the group before: its connections close with it
            timeout = datetime.timedelta(seconds=self.timeout_s)
            client = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"{self.group}/", client)
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            local = address_towards(self.host)
            if local is None:
                raise RuntimeError(f"no route to the collective transport's store at {self.host}")
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local)]
            opts._timeout = timeout
            group = dist.ProcessGroupGloo(store, self.rank, len(self.members) + 1, opts)
            _GROUPS[key] = (self.group, self.members, group)
        return _GROUPS[key][2]

    def close(self) -> None:
        self._server = None
