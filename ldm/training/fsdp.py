"""Fully sharded data parallel training (FSDP) with EMA: Lightning's ModelParallelStrategy and torch's FSDP2.

    python train.py --base configs/ldm_txt2img.yaml ... --strategy fsdp --devices 8 --num_nodes 2   # GPUs (NCCL)
    python train.py --base configs/demo/shapes_ldm.yaml --strategy fsdp --devices 2 --accelerator cpu  # CPUs (gloo)

``lightning.trainer.strategy: fsdp`` builds :class:`FullyShardedStrategy`: Lightning's ``ModelParallelStrategy``
(FSDP2, ``torch.distributed.fsdp.fully_shard``) with every process one data-parallel rank. Lightning's own
``FSDPStrategy`` (FSDP1) refuses a CPU accelerator ("The strategy `fsdp` requires a GPU accelerator",
``pytorch_lightning/trainer/connectors/accelerator_connector.py``, ``_check_strategy_and_fallback``) and flattens the
parameters into one buffer per unit; FSDP2 runs on CPUs with gloo as well, and keeps every parameter a ``DTensor``
under its own name, which is what lets the EMA shard like the weights.

What the training module does with it (:func:`shard`, called from its ``configure_model`` hook):
- each block of the UNet (``input_blocks.N``, ``middle_block``, ``output_blocks.N``) is one FSDP unit, the UNet's
  other layers (time embedding, ``out``) the root unit; a trainable text encoder is one unit per embedder. Frozen
  parts (the first stage, a frozen text encoder) are not sharded: every rank keeps them whole, as under DDP.
- the EMA's buffers become ``DTensor``s sharded like their parameters: each rank keeps, updates and swaps in the
  EMA of its own shards only (:class:`ldm.ema.EMA` works on the local shards).
- checkpoints: Lightning gathers the whole state dict (weights, EMA, optimizer state) on rank 0 into one file of the
  usual layout (``save_distributed_checkpoint=False``): it resumes with or without FSDP, on any number of ranks, and
  ``--export-only`` reads it as any other.
- the export and the sample grids: every rank takes part (gathering the weights, or a forward, is collective);
  rank 0 writes (:func:`full_state_dict`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["STRATEGY", "FullyShardedStrategy", "make_strategy", "shard", "is_sharded", "full_state_dict",
           "unet_blocks"]

STRATEGY = "fsdp"  # the lightning.trainer.strategy value that means this


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP: one data-parallel dimension of all processes of all
    nodes (``tensor_parallel_size=1``; the parent's ``"auto"`` would make the data-parallel size the number of
    nodes), and checkpoints gathered into one file on rank 0 (``save_distributed_checkpoint=False``)."""

    strategy_name = STRATEGY

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("tensor_parallel_size", 1)
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()


def make_strategy(**kwargs: Any) -> FullyShardedStrategy:
    return FullyShardedStrategy(**kwargs)


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` is a DTensor (it went through :func:`shard`)."""
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in module.parameters())


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The FSDP units of a UNet (and the blocks activation checkpointing recomputes): every input and output block
    and the middle block."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def shard(module: nn.Module, mesh: Any) -> None:
    """Shard a :class:`~ldm.training.latent_diffusion.LatentDiffusionModule` over the 1-D device ``mesh`` (see the
    module docstring). Idempotent: a module that is sharded already is left as it is."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from ldm import accel

    if is_sharded(module):
        return
    if getattr(module, "lora", None) is not None:
        raise ValueError("model.params.lora: a LoRA run trains a few MB; use --strategy ddp, not fsdp")
    unet = module.model.diffusion_model
    # The CPU fast paths cache packed weights keyed on a tensor's address and version; FSDP re-gathers the weights
    # into its own buffers at every forward. The sharded UNet runs the plain layers.
    accel.restore(unet)
    with torch.no_grad():  # FSDP shards contiguous tensors only: the channels-last conv weights go back to NCHW
        for p in unet.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for block in unet_blocks(unet):
        fully_shard(block, mesh=mesh)
    # the root unit too gives its whole weights back after each forward (FSDP's default keeps them until the
    # backward, which sampling and validation never run): the EMA swaps shards in and out between forwards
    fully_shard(unet, mesh=mesh, reshard_after_forward=True)
    conditioner = getattr(module, "conditioner", None)
    for embedder in (conditioner.embedders if conditioner is not None else []):
        if any(p.requires_grad for p in embedder.parameters()):
            fully_shard(embedder, mesh=mesh)
    dtensor = _dtensor_type()
    unsharded = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, dtensor)]
    if unsharded:  # no DDP here: a trainable tensor outside the FSDP units would get no gradient from other ranks
        raise ValueError(f"FSDP: trainable parameters outside the sharded modules ({', '.join(unsharded[:3])}"
                         f"{', ...' if len(unsharded) > 3 else ''}); freeze them or use --strategy ddp")
    ema = getattr(module, "model_ema", None)
    if ema is not None:
        params = dict(module._ema_target().named_parameters())
        for name, s_name in ema.m_name2s_name.items():
            p = params[name]
            if isinstance(p, dtensor):  # every rank holds the same whole EMA here: each keeps its own shard
                ema._buffers[s_name] = distribute_tensor(ema._buffers[s_name].to(p.device), p.device_mesh,
                                                         p.placements, src_data_rank=None)
    log.info("FSDP: the UNet sharded over %d ranks in %d blocks%s", mesh.size(), len(unet_blocks(unet)) + 1,
             ", the EMA with it" if ema is not None else "")


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded module, gathered on rank 0 (on the CPU; other ranks get ``{}``).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
