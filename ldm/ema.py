"""Exponential moving average of weights, stored in the original checkpoints' ``model_ema.*`` layout.

The original ``LitEma`` keeps one buffer per parameter of the wrapped module, named after the parameter with the
dots removed (``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``), plus
``decay`` and ``num_updates``. Keeping that layout lets real SD files with EMA weights load strictly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP's parameters and the EMA buffers sharded like them), else ``t``: each rank
    averages and swaps its own shards, without communication."""
    return t.to_local() if hasattr(t, "to_local") else t


def ema_name(param_name: str) -> str:
    """``diffusion_model.out.2.weight`` -> ``diffusion_modelout2weight`` (the original EMA buffer name)."""
    return param_name.replace(".", "")


class EMA(nn.Module):
    """EMA of a module's trainable parameters. ``decay`` warms up as in the original: min(decay, (1+n)/(10+n)).
    Under FSDP the buffers are sharded like the parameters (:func:`ldm.training.fsdp.shard`)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.m_name2s_name: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = ema_name(name)
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone().float())

    def current_decay(self) -> float:
        decay = float(self.decay)
        n = int(self.num_updates)
        if n >= 0:
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step; call once per optimizer step."""
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        one_minus = 1.0 - self.current_decay()
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            s_name = self.m_name2s_name.get(name)
            if s_name is None:
                continue
            s = _local(shadow[s_name])
            s.sub_(one_minus * (s - _local(p.detach()).to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            s_name = self.m_name2s_name.get(name)
            if s_name is not None:
                _local(p).copy_(_local(shadow[s_name]).to(p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Temporarily use the EMA weights in ``model`` (for validation, sampling and export)."""
        backup = {n: _local(p.detach()).clone() for n, p in model.named_parameters() if n in self.m_name2s_name}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        _local(p).copy_(backup[n])
