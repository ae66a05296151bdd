"""``Learner``: one DeepSpeed ZeRO rank. The only module in dist_ft that imports deepspeed.

In debug mode one Learner runs in the driver process at world size 1; on Ray each learner actor
is one rank of a data-parallel group (``cluster/ray.py`` sets rank, world size and master address).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dist_ft.algos.common import merge_stats
from dist_ft.algos.objective import OBJECTIVES, Objective, ObjectiveSettings, objective_class
from dist_ft.algos.settings import DPOParams, LossParams
from dist_ft.model import onednn
from dist_ft.model.loading import DTYPES, load_policy
from dist_ft.model.logprobs import group_logprobs, packed_completion_logprobs, shares_prompt_cache
from dist_ft.model.peft import adapter_parameters, use_adapter
from dist_ft.model.spec import Device, DType, PeftMethod, PeftSpec
from dist_ft.model.weights import export_state, is_adapter
from dist_ft.sync.rendezvous import interface_towards, listening_fd
from dist_ft.wire.batch import ScoredBatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the learner group. gloo on CPU, nccl on GPU. Idempotent within a process.

    Every socket of the group listens on one address, never on all interfaces: torch's env://
    rendezvous binds its store to the wildcard whatever MASTER_ADDR says, so rank 0 binds the
    store's socket to ``master_addr`` itself (127.0.0.1 in debug mode and on a private Ray, the
    node's cluster address on a real cluster) and hands it over; gloo and NCCL listen on the
    interface that faces ``master_addr`` unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say
    otherwise."""
    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
    )
    iface = interface_towards(master_addr)
    if iface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    listen_fd = listening_fd(master_addr, master_port)[0] if rank == 0 else None
    # torch's env:// waits as long for the other ranks (30 min), not TCPStore's own 5 min
    store = dist.TCPStore(
        master_addr,
        master_port,
        world_size,
        rank == 0,
        timeout=dist.constants.default_pg_timeout,
        master_listen_fd=listen_fd,
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    import deepspeed  # here, not at the top: the driver imports LearnerSpec without DeepSpeed

    # On CPU it prints "... shm_comm_op built successfully" to stdout each time it loads the
    # cached op; a failed build raises, so nothing said here is needed
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts the group above


@dataclass(frozen=True)
class LearnerSpec:
    """Everything one learner rank is built from (rank and rendezvous come separately)."""

    model_path: str
    dtype: DType
    peft: PeftSpec
    device: Device
    loss: LossParams
    temperature: float  # the sampling temperature: logprobs are recomputed at it
    lr: float
    weight_decay: float
    grad_clip: float
    zero_stage: int
    offload: Literal["none", "cpu"]
    samples_per_step: int
    micro_batches: int
    seed: int
    trust_remote_code: bool = False
    deterministic: bool = False
    dpo: DPOParams = field(default_factory=DPOParams)  # the DPO objective's loss variant and knobs
    pack: bool = True  # SFT and DPO forwards pack rows (see Learner._logprobs)
    cpu_linear: Literal["onednn", "torch"] = "onednn"  # resources.cpu_linear


def deepspeed_config(spec: LearnerSpec, world_size: int) -> dict[str, Any]:
    zero_stage, offload, dtype = spec.zero_stage, spec.offload, spec.dtype
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": spec.samples_per_step,
        "train_micro_batch_size_per_gpu": spec.samples_per_step
        // (world_size * spec.micro_batches),
        "gradient_accumulation_steps": spec.micro_batches,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        # torch's AdamW: DeepSpeed's fused/CPU Adam would JIT-compile for 60-90 s on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "torch_adam": True},
        },
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def _width(batch: ScoredBatch) -> int:
    """Episode columns that hold a token in some row: the padding every row shares is trimmed,
    so no compute goes to it."""
    used = batch.attention_mask.any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


class Learner:
    def __init__(
        self,
        spec: LearnerSpec,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ) -> None:
        import deepspeed

        init_process_group(rank, world_size, master_addr, master_port or free_port())
        torch.use_deterministic_algorithms(spec.deterministic)
        torch.manual_seed(spec.seed + rank)
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0  # guards anything written to disk once per group
        self._objectives: dict[str, Objective] = {}  # by name, built on first use
        self.micro_batches = spec.micro_batches
        self.zero_stage = spec.zero_stage
        # peft's prefix tuning concatenates its prefix's columns to a 2D attention mask, which
        # the packed forward's 4D block mask cannot take: prefix keeps the padded forward.
        self.pack = spec.pack and spec.peft.method is not PeftMethod.PREFIX
        self.share_prompts = shares_prompt_cache(spec.peft)
        model = load_policy(
            spec.model_path,
            spec.dtype,
            spec.peft,
            torch.device(spec.device),
            spec.trust_remote_code,
        )
        if spec.cpu_linear == "onednn" and spec.device == "cpu":
            onednn.convert(model)  # before DeepSpeed hooks its modules: they keep the hooks
        self.adapter_only = is_adapter(model)
        # peft.adapters: one optimizer param group per adapter, in peft.adapters' order (a
        # batch's adapter_ids index it). A step trains one adapter; the others step at lr 0,
        # which leaves their weights bit-exactly where they were (AdamW's update and decay are
        # both scaled by lr). Their Adam moments still see a zero gradient under ZeRO-1/2/3,
        # whose flat partitions step as one; under ZeRO-0 AdamW skips a parameter without grad.
        self.adapters = list(spec.peft.adapters)
        trainable: list[Any] = [p for p in model.parameters() if p.requires_grad]
        if self.adapters:
            trainable = [{"params": adapter_parameters(model, a)} for a in self.adapters]
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=deepspeed_config(spec, world_size)
        )
        self.version = 0
        self.changed = set(self.adapters)  # adapters the next sync must carry: all at first

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _gathered(self, params: list[torch.nn.Parameter]) -> Any:
        """Context that materialises ZeRO-3 partitions (a no-op below stage 3)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3)

    def _accumulate(
        self, rows: int, micro_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
    ) -> dict[str, float]:
        """One optimizer step over ``rows`` samples, in ``micro_batches`` forward/backward passes.

        ``micro_loss(index)`` returns a micro-batch's share of the step's loss (its normaliser
        spans the whole step), so the summed gradients are those of the full-batch loss.
        """
        self.engine.train()
        # Exactly ``micro_batches`` pieces, also when rows don't divide (6 rows into 4 gives
        # 2+2+1+1; ``chunk`` would give 3 pieces): DeepSpeed steps the optimizer on every
        # ``micro_batches``-th backward, so one piece short shifts the step boundary into the
        # next step's batch.
        chunks = torch.arange(rows).tensor_split(self.micro_batches)
        total_loss, parts = 0.0, []
        for idx in chunks:
            loss, stats = micro_loss(idx)
            # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
            self.engine.backward(loss * self.micro_batches * self.world_size)
            self.engine.step()
            total_loss += float(loss.detach())
            parts.append(stats)
        totals = {"loss": total_loss, **merge_stats(parts)}
        self.version += 1
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed does not record it for fp32 ZeRO-0
            totals["grad_norm"] = float(grad_norm)
        return totals

    def step(self, batch: ScoredBatch, objective: str = "grpo") -> dict[str, float]:
        """One optimizer step of ``objective`` (a name in ``algos.objective.OBJECTIVES``) on this
        rank's share of the step's samples.

        Every rank of the group must call it (the normaliser is a collective): each counts what
        its share contributes to the loss denominator (sequences, tokens or pairs), the group
        sums the counts, and every micro-batch on every rank divides by that one number, so the
        update equals a single-process update on the whole step's batch.

        Under ``peft.adapters`` the batch's samples all carry one adapter id, and that adapter
        alone moves.
        """
        if self.adapters:
            self._use_adapter(batch)
        loss = self._objective(objective)
        normaliser = loss.normaliser(self._sum_over_ranks(loss.count(batch)))
        select: Callable[[torch.Tensor], ScoredBatch]  # index -> that micro-batch
        if OBJECTIVES[objective].whole_groups:  # micro-batches never split a group (a pair)
            units, select = int(batch.group_ids.max()) + 1 if len(batch) else 0, batch.select_groups
        else:
            units, select = len(batch), batch.select
        metrics = self._accumulate(
            units, lambda idx: self.micro_loss(select(idx), objective, normaliser)
        )
        metrics["tokens"] = float(batch.num_tokens)
        return metrics

    def micro_loss(
        self, batch: ScoredBatch, objective: str, normaliser: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``batch``'s share of a step's ``objective`` loss over ``normaliser``, with grad (one
        micro-batch of :meth:`step`)."""
        loss = self._objective(objective)
        pack = self.pack and loss.packs
        return loss.loss(lambda b, t: self._logprobs(b, _width(b), t, pack), batch, normaliser)

    def _objective(self, name: str) -> Objective:
        if name not in self._objectives:
            settings = ObjectiveSettings(self.spec.loss, self.spec.dpo, self.spec.temperature)
            self._objectives[name] = objective_class(name)(settings)
        return self._objectives[name]

    def _use_adapter(self, batch: ScoredBatch) -> None:
        if batch.adapter_ids is None:
            raise ValueError(f"peft.adapters={self.adapters}: a batch without adapter ids")
        used = batch.adapter_ids.unique().tolist()
        if len(used) != 1:
            raise ValueError(f"one step's samples belong to adapters {used}; train each alone")
        index = int(used[0])
        use_adapter(self.module, self.adapters[index])
        for i, group in enumerate(self.engine.optimizer.param_groups):
            group["lr"] = self.spec.lr if i == index else 0.0
        self.changed.add(self.adapters[index])

    def _sum_over_ranks(self, count: float) -> float:
        if self.world_size == 1:
            return count
        # nccl reduces CUDA tensors only; float64 keeps token counts exact
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total)

    def _logprobs(
        self, batch: ScoredBatch, width: int, temperature: float, pack: bool
    ) -> torch.Tensor:
        """[N, width] logprobs of the episode tokens under the current policy at
        ``temperature``, with grad. The forward attends to every episode token (context
        included: the model conditions on env/tool turns).

        ``pack``: one forward over the rows packed (``model.logprobs.packed_completion_logprobs``),
        the same logprobs to float error with no compute spent on padding: SFT and DPO (when
        ``self.pack``). Otherwise each group's prompt runs once for its samples
        (``model.logprobs.group_logprobs``): GRPO, whose ``Objective.packs`` says why.
        """
        if pack:
            prompt_ids_NP, prompt_mask_NP = batch.sample_prompts()
            return packed_completion_logprobs(
                self.engine,
                prompt_ids_NP,
                prompt_mask_NP,
                batch.episode_ids[:, :width],
                batch.episode_mask[:, :width],
                temperature,
                DTYPES[self.spec.dtype],
            )
        return group_logprobs(
            self.engine,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.group_ids,
            batch.episode_ids[:, :width],
            batch.attention_mask[:, :width],
            temperature,
            self.share_prompts,
        )

    @torch.no_grad()
    def logprobs(self, batch: ScoredBatch) -> torch.Tensor:
        """[N, T] float32 logprobs of ``batch``'s episode tokens under the current weights at
        temperature 1, 0 off the trained tokens: the reference pass of DPO, and evaluation.
        Collective under ZeRO-3 (every rank runs one forward, on its own share)."""
        self.engine.eval()
        width = _width(batch)
        logp_NT = self._logprobs(batch, width, 1.0, self.pack).float()
        out_NT = torch.zeros(batch.episode_ids.shape, dtype=torch.float32)
        out_NT[:, :width] = torch.where(batch.loss_mask[:, :width], logp_NT.cpu(), 0.0)
        return out_NT

    def export_weights(
        self, adapter_only: bool | None = None, changed_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """What changed since the start: the adapter alone under PEFT, else all weights.
        ``changed_only`` (a weight sync): under ``peft.adapters``, the adapters trained since
        the last such export (every adapter the first time), which it then marks sent.

        Under ZeRO-3 only the exported parameters are gathered (for LoRA: adapter parameters,
        never the base model). Every rank must call this; all get the same tensors.
        """
        adapter_only = self.adapter_only if adapter_only is None else adapter_only
        adapters = None
        if changed_only and self.adapters:
            adapters = [a for a in self.adapters if a in self.changed]
            self.changed = set()
        params = [p for p in self.module.parameters() if p.requires_grad or not adapter_only]
        with self._gathered(params):
            return export_state(self.module, adapter_only, adapters)

    def save_state(self, ckpt_dir: str | Path) -> None:
        """This rank's share of a run checkpoint: DeepSpeed's engine state (weights, optimizer,
        ZeRO partitions) and this process's RNG. Collective: every rank must call it."""
        ckpt_dir = Path(ckpt_dir)
        self.engine.save_checkpoint(
            str(ckpt_dir / "deepspeed"),
            tag="state",
            client_state={"version": self.version},
            save_latest=False,
            # Under PEFT the frozen base is the model file the run started from: not saved.
            exclude_frozen_parameters=self.adapter_only,
        )
        save_file(
            {"torch": torch.get_rng_state()}, str(ckpt_dir / f"learner_rng_{self.rank}.safetensors")
        )

    def load_state(self, ckpt_dir: str | Path) -> int:
        """Restore :meth:`save_state`; returns the policy version the checkpoint holds."""
        ckpt_dir = Path(ckpt_dir)
        _, client = self.engine.load_checkpoint(
            str(ckpt_dir / "deepspeed"), tag="state", load_module_strict=not self.adapter_only
        )
        if client is None:
            raise RuntimeError(f"{ckpt_dir}: no DeepSpeed state for rank {self.rank}")
        torch.set_rng_state(
            load_file(str(ckpt_dir / f"learner_rng_{self.rank}.safetensors"))["torch"]
        )
        self.version = int(client["version"])
        self.changed = set(self.adapters)  # the workers start from scratch: send every adapter
        return self.version

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The trained result, rank 0 writes: HF ``save_pretrained`` (safetensors), the adapter
        alone under peft; bitfit and adapter in dist_ft's format (``model.weights.save_artefact``).
        """
        from dist_ft.model.weights import save_artefact

        with self._gathered(list(self.module.parameters())):
            if self.is_main:
                save_artefact(self.module, out_dir, self.spec.peft)
