"""FLOPs and MFU (trainer.observe.flops): the count of one update equals a hand count on tiny units, every shipped
config is counted on the meta device, and the peak comes from the GPU table or a CPU measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.algorithms import cyclegan
from trainer.config.load import load_config
from trainer.config.model import LossConfig
from trainer.observe import flops

REPO = Path(__file__).resolve().parents[2]


def test_one_update_counts_what_a_hand_count_gives():
    """G and F: one 1x1 conv 3 -> 3; D_X and D_Y: one 1x1 conv 3 -> 1; a 4 x 4 image pair, no identity term.
    A 1x1 conv's forward is 2 x C_in x C_out x pixels FLOPs: 288 for a generator, 96 for a discriminator; its
    backward is as much again for the weight gradient and again for the input gradient where the input needs one.

    Generator step: forward G(x), F(G(x)), F(y), G(F(y)) = 4 x 288 and D_Y(G(x)), D_X(F(y)) = 2 x 96; backward:
    the four generator weight gradients 4 x 288, input gradients of F(G(x)) and G(F(y)) (their inputs are fakes)
    2 x 288, the discriminators' input gradients 2 x 96 (their weights are frozen). Discriminator step: forward on
    two real and two detached fake images 4 x 96, weight gradients 4 x 96, no input gradients."""
    gens = cyclegan.GeneratorPair(torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1), use_identity=False)
    discs = cyclegan.DiscriminatorPair(torch.nn.Conv2d(3, 1, 1), torch.nn.Conv2d(3, 1, 1))
    generator_step = 4 * 288 + 2 * 96 + 4 * 288 + 2 * 288 + 2 * 96
    discriminator_step = 4 * 96 + 4 * 96
    assert flops.update_flops(cyclegan, gens, discs, LossConfig(lambda_identity=0.0), 4) == 4032
    assert generator_step + discriminator_step == 4032


@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_is_counted_without_touching_the_random_state(config):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    count, reason = flops.flops_per_pair(load_config(REPO / f"configs/{config}.yaml", ["data.root="]))
    assert count is not None and count > 0, reason
    assert reason.endswith("GFLOP per image pair per update")
    assert torch.equal(torch.get_rng_state(), before)


def test_the_peak_is_the_gpu_table_or_a_cpu_measurement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert flops.peak_flops(cuda, "bf16") == (989e12, "NVIDIA H100 80GB HBM3: 989 TFLOP/s (bf16)")
    assert flops.peak_flops(cuda, "fp32")[0] == 494e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.peak_flops(cuda, "bf16") == (None, "no peak known for Some Future GPU: MFU not logged")
    before = torch.get_rng_state()
    peak, reason = flops.peak_flops(torch.device("cpu"), "fp32")
    assert peak > 1e8 and reason.startswith("this CPU's ")
    assert torch.equal(torch.get_rng_state(), before)  # measured at start, after the seed: no random draws
