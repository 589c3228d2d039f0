"""Shared building blocks: the normalization choice, the ResNet-style encoder front and decoder back, weight
initialization and activation checkpointing of a generator's blocks."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


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


def encoder_front(input_nc: int, ngf: int, norm: str) -> list[nn.Module]:
    """c7s1-ngf, then two stride-2 convolutions to 4 * ngf channels (the reference's ResNet encoder front)."""
    bias = conv_bias(norm)
    layers: list[nn.Module] = [
        nn.ReflectionPad2d(3),
        nn.Conv2d(input_nc, ngf, 7, bias=bias),
        norm_layer(norm, ngf),
        nn.ReLU(True),
    ]
    for mult in (1, 2):
        layers += [
            nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
            norm_layer(norm, ngf * mult * 2),
            nn.ReLU(True),
        ]
    return layers


def decoder_back(ngf: int, output_nc: int, norm: str) -> list[nn.Module]:
    """Two stride-2 transposed convolutions from 4 * ngf back to ngf channels, then c7s1-output_nc and tanh."""
    bias = conv_bias(norm)
    layers: list[nn.Module] = []
    for mult in (4, 2):
        layers += [
            nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
            norm_layer(norm, ngf * mult // 2),
            nn.ReLU(True),
        ]
    return layers + [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]


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


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    checkpointed: bool,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`fn(x)` (by default `block(x)`), keeping only `x` for the backward pass when `checkpointed` and autograd is
    recording: the block's activations are recomputed there (torch.utils.checkpoint, non-reentrant), with the RNG
    state of the forward, so dropout draws the same masks and the gradients are those of the plain call.

    Args:
        block: the module that `fn` runs (its batch norms are looked up here).
        x: the block's input; `fn` must not modify it in place, since the recomputation starts again from it.
        checkpointed: the owner's activation-checkpointing flag.
        fn: what to run, when it is not simply `block` (a method of `block`).
    """
    fn = block if fn is None else fn
    if not (checkpointed and torch.is_grad_enabled()):
        return fn(x)
    # Eager recomputation would update batch norms' running statistics a second time; a compiled backward
    # recomputes without side effects (and torch.compile takes no custom context_fn).
    if torch.compiler.is_compiling() or not any(_tracks_running_stats(m) for m in block.modules()):
        return checkpoint(fn, x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _kept_stats(block)))


def _tracks_running_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


@contextlib.contextmanager
def _kept_stats(block: nn.Module) -> Iterator[None]:
    """Restore the batch norms' running statistics after a recomputation: the first forward has updated them."""
    buffers = [b for m in block.modules() if _tracks_running_stats(m) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:  # the recomputation ends early (an exception) once it has what the backward needs
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
