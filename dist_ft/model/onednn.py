"""fp32 linear layers on CPU through oneDNN's matmul instead of MKL's sgemm.

PyTorch computes an fp32 ``nn.Linear`` on CPU with MKL. oneDNN, which PyTorch ships and uses
for bf16, is faster at the shapes a policy has. GFLOP/s of ``x [M, K] @ W [N, K]^T``, fp32, 2
threads, on the 2-core AMD EPYC (AVX-512) CI machine kind (``bench/peer_trl.py``'s machine):

    ======================================  =====  ======
    product                                   MKL  oneDNN
    ======================================  =====  ======
    learner, M=372, 576 -> 1536               125     189
    learner lm_head, M=256, 576 -> 49152      122     167
    input gradient, M=372, 1536 -> 576        183     213
    decode, M=16, 576 -> 1536                 110     141
    decode lm_head, M=16, 576 -> 49152         50     100
    ======================================  =====  ======

On SmolLM2-135M's peer-bench step that is the rollout 1.11x and the learner step 1.14x faster.
The arithmetic is IEEE fp32 in another summation order (no down-conversion): against a float64
product both stay within ~1e-6 of the output's scale, oneDNN's error about 3x MKL's at K=576.

A oneDNN call spends ~12 us on set-up, more than MKL needs for a small product, so a product
runs on oneDNN only when it is large (:func:`large`): LoRA's rank-r factors in decode and every
layer of the tiny test model keep torch's path. Other dtypes and devices always do: bf16
already runs on oneDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Where the two paths cross, in multiply-adds M*N*K: at M=16, 576 -> 576 (5.3M) both take
# ~95 us, at 576 -> 1536 (14M) MKL 256 us and oneDNN 201 us, at 64 -> 64 (65k) MKL 6 us and
# oneDNN 17 us. And in elements M*K + N*K + M*N, for products too thin for the first rule:
# MKL takes 185 us for LoRA's B factor at M=372, 8 -> 1536 (586k), oneDNN 73 us; at M=512,
# 64 -> 64 (69k) MKL 30 us, oneDNN 37 us.
MIN_MACS = 1 << 23
MIN_ELEMENTS = 1 << 19


def large(rows: int, out_features: int, in_features: int) -> bool:
    """Whether oneDNN beats MKL at [rows, in] @ [in, out] (also its input gradient's shape)."""
    macs = rows * out_features * in_features
    elements = rows * (in_features + out_features) + out_features * in_features
    return macs >= MIN_MACS or elements >= MIN_ELEMENTS


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ b [N]) -> [..., N] on oneDNN; any strides (w may be a
    transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _Linear(torch.autograd.Function):
    """``F.linear`` with the forward and the input gradient on oneDNN. A weight that trains (full
    fine-tuning, LoRA's factors) gets the ``mm`` autograd would run: MKL is the faster of the two
    at the weight gradient's shape (398 vs 484 us for LoRA's B factor at M=372)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        return _matmul(x, w, b)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dx = _matmul(dy, w.t(), None) if ctx.needs_input_grad[0] else None  # dy @ w
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dw = dy_MN.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = dy_MN.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose large fp32 CPU products run on oneDNN. :func:`convert` makes them
    by swapping the class of existing layers, so parameters, hooks (DeepSpeed's, peft's) and
    state-dict keys stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(1, x.shape[-1])
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or not large(rows, *w.shape)
        ):
            return F.linear(x, w, self.bias)
        return _Linear.apply(x, w, self.bias)


def convert(model: nn.Module) -> int:
    """Make every plain fp32 ``nn.Linear`` in ``model`` a :class:`OneDNNLinear`; returns how
    many. Subclasses (bitsandbytes' 4-bit layers, peft's wrappers) keep their own forward; the
    layers they wrap are converted."""
    if not available():
        return 0
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = OneDNNLinear
            converted += 1
    return converted
