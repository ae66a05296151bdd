"""LoRA folded into the base weights for the rollout's decode (``rollout.merge_lora``).

peft adds a LoRA layer's update in every forward: two thin matmuls, a scale and an add on each
of SmolLM2-135M's 210 adapted layers, every decode step. That is a fifth of a 16-token fp32
``generate`` on 2 CPU cores (1.25x slower than the same decode with the adapter off). Folded
into the weight, W0 + scaling * B @ A, the layer is one matmul again.

Exactly, with no drift: each adapted layer keeps two weight tensors, its start W0 (never
written) and the merged one, recomputed from W0 whenever the adapter changed (a sync, a switch
of adapter: :meth:`MergedLoRA.decoding` compares the adapter tensors' version counters, which
every in-place write bumps, and the active adapter's name). peft's in-place merge and unmerge
would instead leave W0 + d - d in the base, a rounding step away from what the learner holds,
more with every sync. The layers point at the merged tensors only inside ``decoding``; outside
it (reference logprobs, exports, fingerprints) the model is peft's as loaded. The cost is a
second copy of the adapted weights (425 MB for SmolLM2-135M in fp32), allocated at the first
decode. In debug mode W0 is the learner's own frozen tensor (:meth:`MergedLoRA.rebase`, from
``HFGenerator.share_frozen``) and the merged copy lives only while a decode runs: held across
steps it sat beside the learner's activations at their peak. It is rebuilt from W0 every step
anyway (each sync changes the adapter), so the release costs one allocation of it a step.

fp32 only: the logprobs then come from the sampling pass, and the merged weight differs from
the learner's W0 x + scaling * B (A x) by fp32 rounding alone. A bf16 weight cannot hold a
small update (it would round away under bf16's 8-bit mantissa), and bf16 scores its samples in
a second pass anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class MergedLoRA:
    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        # Any: peft's layers get base_layer, lora_A/B and get_delta_weight dynamically
        self.layers: list[Any] = [
            m
            for m in model.modules()
            if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), nn.Linear)
        ]
        self.start: list[torch.Tensor] = [m.base_layer.weight.data for m in self.layers]
        self.merged: list[torch.Tensor | None] = [None] * len(self.layers)  # at the first decode
        self.merged_from: list[tuple[str, int, int]] | None = None
        self.transient = False  # merged weights released after each decode (see rebase)

    def rebase(self, index: int, w0: torch.Tensor) -> None:
        """Layer ``index``'s W0 is ``w0``, the same values held elsewhere (the learner's, in this
        process); the tensor the layer held so far is dropped, and from now on the merged
        weights exist only inside :meth:`decoding`."""
        self.start[index] = self.layers[index].base_layer.weight.data = w0
        self.merged[index] = None
        self.merged_from = None
        self.transient = True

    def _adapter_state(self) -> list[tuple[str, int, int]]:
        """(adapter, A's version, B's version) of every layer: changes with any write."""
        state = []
        for layer in self.layers:
            (name,) = layer.active_adapters
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            state.append((name, a._version, b._version))
        return state

    @torch.no_grad()
    def _refresh(self) -> None:
        """Every merged weight recomputed from W0 and the active adapter as it is now."""
        for i, (layer, w0) in enumerate(zip(self.layers, self.start)):
            (name,) = layer.active_adapters
            if self.merged[i] is None:
                self.merged[i] = torch.empty_like(w0)
            torch.add(w0, layer.get_delta_weight(name), out=self.merged[i])

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """The adapted layers on their merged weights, recomputed first if the adapter changed;
        peft, told they are merged, adds no update of its own."""
        if (state := self._adapter_state()) != self.merged_from:
            self._refresh()
            self.merged_from = state
        for layer, merged in zip(self.layers, self.merged):
            layer.base_layer.weight.data = merged
            layer.merged_adapters = list(layer.active_adapters)
        try:
            yield
        finally:
            for layer, w0 in zip(self.layers, self.start):
                layer.base_layer.weight.data = w0
                layer.merged_adapters = []
            if self.transient:
                self.merged = [None] * len(self.layers)
                self.merged_from = None
