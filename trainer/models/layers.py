"""Shared building blocks: the normalization choice and weight initialization."""

from __future__ import annotations

import torch.nn as nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalization the reference uses for `kind`: BatchNorm (affine, running stats), InstanceNorm (no affine)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected batch, instance or none")


def conv_bias(kind: str) -> bool:
    """Convolutions followed by BatchNorm need no bias (its shift replaces it); the others keep theirs."""
    return kind != "batch"


def init_weights(net: nn.Module, kind: str, gain: float) -> None:
    """Initialize conv/linear weights (normal(0, gain), xavier, kaiming or orthogonal) and norm scales N(1, gain)."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if kind == "normal":
                nn.init.normal_(module.weight, 0.0, gain)
            elif kind == "xavier":
                nn.init.xavier_normal_(module.weight, gain=gain)
            elif kind == "kaiming":
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
            elif kind == "orthogonal":
                nn.init.orthogonal_(module.weight, gain=gain)
            else:
                raise ValueError(f"unknown init {kind!r}; expected normal, xavier, kaiming or orthogonal")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, gain)
            nn.init.zeros_(module.bias)
