"""Weight sync from learner to rollout workers: the transport seam (``base``), one module per
transport, and the registry ``resources.weight_transport`` names them from."""

from __future__ import annotations

import importlib

from dist_ft.sync.base import (
    Published,
    SyncMismatchError,
    WeightTransport,
    check_fingerprints,
    describe,
    fingerprint,
    to_rollout_dtype,
)

__all__ = [
    "TRANSPORTS",
    "Published",
    "SyncMismatchError",
    "WeightTransport",
    "check_fingerprints",
    "describe",
    "fingerprint",
    "make_transport",
    "to_rollout_dtype",
]

# name -> "module:Class"; a user's transport is named as "package.module:Class" directly.
# "auto" picks by resources.mode: in-process in debug mode, the object store on Ray.
TRANSPORTS = {
    "inprocess": "dist_ft.sync.inprocess:InProcessTransport",
    "object_store": "dist_ft.sync.object_store:ObjectStoreTransport",
    "collective": "dist_ft.sync.collective:CollectiveTransport",
}
_DEFAULT = {"local": "inprocess", "ray": "object_store"}
# the built-ins' reach
_MODES = {"inprocess": {"local"}, "object_store": {"ray"}, "collective": {"ray"}}


def make_transport(name: str, mode: str) -> WeightTransport:
    """The transport ``resources.weight_transport=name`` asks for in ``resources.mode=mode``;
    ValueError naming the key for an unknown name, a class that is not a WeightTransport, or a
    built-in that cannot reach the workers of that mode."""
    name = _DEFAULT[mode] if name == "auto" else name
    if name in _MODES and mode not in _MODES[name]:
        raise ValueError(
            f"resources.weight_transport={name} cannot reach the rollout workers of "
            f"resources.mode={mode}: use auto or {_DEFAULT[mode]}"
        )
    target = TRANSPORTS.get(name, name)
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(
            f"resources.weight_transport={name!r}: one of auto, {', '.join(TRANSPORTS)}, or a "
            "class as package.module:Class"
        )
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"resources.weight_transport={name!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, WeightTransport)):
        raise ValueError(
            f"resources.weight_transport={name!r} is not a dist_ft.sync.WeightTransport subclass"
        )
    if cls.blocking and mode == "local":
        raise ValueError(
            f"resources.weight_transport={name!r} sends only while its receivers receive, which "
            "one process cannot do: use it with resources.mode=ray"
        )
    transport: WeightTransport = cls()
    return transport
