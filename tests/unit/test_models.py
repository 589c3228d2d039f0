import typing

import pytest
import torch

from trainer.algorithms.cyclegan import build_units
from trainer.config.generators import GENERATOR_FACTS
from trainer.config.model import GeneratorName, LossConfig, ModelConfig
from trainer.models import CHECKPOINTABLE, GENERATORS, build_discriminator, build_generator, build_hnet
from trainer.models.resnet import ResnetBlock


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet9_generator_matches_reference_parameter_count():
    assert count(build_generator(ModelConfig(generator="resnet_9blocks", ngf=64, norm_g="instance"))) == 11_378_179


def test_patchgan_matches_reference_parameter_count():
    cfg = ModelConfig(discriminator="patchgan", n_layers_d=3, ndf=64, norm_d="instance")
    assert count(build_discriminator(cfg)) == 2_764_737


SHAPE_CASES = [
    (name, size)
    for name in sorted(GENERATORS)
    for size in (64, 256)
    if size % ModelConfig(generator=name).min_image_multiple() == 0  # unet_128/unet_256 need 128/256 px
]


@pytest.mark.parametrize("name,size", SHAPE_CASES)
def test_generator_output_shape_and_range(name, size):
    torch.manual_seed(0)
    net = build_generator(ModelConfig(generator=name, ngf=8 if size == 256 else 16, norm_g="batch"))
    x = torch.rand(2, 3, size, size) * 2 - 1
    y = net(x)
    assert y.shape == (2, 3, size, size)
    assert y.min() >= -1 and y.max() <= 1


def test_article_unet_layout_follows_the_article():
    net = build_generator(ModelConfig(generator="unet_article", n_skip=2, norm_g="batch"))
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    # encoders 3->64->128 (4x4 s2, no bias before BN), decoders 128 (s1) and 64 (s2), output to 3 with bias
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 128), (128, 128), (256, 64), (128, 3)]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 2]
    assert [c.bias is None for c in convs] == [True, True, True, True, False]


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("kind", ["patchgan", "pixel", "hnet"])
def test_discriminators_give_patch_scores(kind, size):
    _, discs = build_units(ModelConfig(discriminator=kind, ndf=8), LossConfig())
    scores = discs.d_x(torch.randn(2, 3, size, size))
    assert scores.shape[:2] == (2, 1)
    expected = {"patchgan": size // 8 - 2, "pixel": size, "hnet": size // 8 - 2}[kind]
    assert scores.shape[-1] == expected


def test_hnet_shares_the_trunk_between_both_discriminators():
    cfg = ModelConfig(discriminator="hnet", ndf=8, hnet_trunk_layers=2)
    _, discs = build_units(cfg, LossConfig())
    trunk_params = {id(p) for p in discs.trunk.parameters()}
    assert trunk_params <= {id(p) for p in discs.d_x.parameters()}
    assert trunk_params <= {id(p) for p in discs.d_y.parameters()}
    trunk, head_x, head_y = build_hnet(cfg)
    # one trunk plus two heads, counted once each, equals the pair's unique parameters
    assert count(discs) == count(trunk) + count(head_x) + count(head_y)
    assert count(discs) < 2 * count(build_discriminator(ModelConfig(ndf=8)))


@pytest.mark.parametrize("init", ["normal", "xavier", "kaiming", "orthogonal"])
def test_init_schemes(init):
    torch.manual_seed(0)
    net = build_generator(ModelConfig(generator="resnet", n_blocks=1, ngf=32, norm_g="batch", init=init))
    conv = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][2]
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    if init == "normal":
        assert conv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    if init == "kaiming":
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.all(bn.bias == 0)


def test_the_builders_and_the_facts_name_the_same_generators():
    assert list(GENERATORS) == list(GENERATOR_FACTS) == list(typing.get_args(GeneratorName))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_each_generator_is_what_its_facts_say(name):
    """The config checks with GENERATOR_FACTS; the networks must agree: what can be checkpointed, the layers
    PatchNCE reads, the input multiple."""
    cfg = ModelConfig(generator=name, ngf=4, norm_g="instance")
    facts = GENERATOR_FACTS[name]
    net = build_generator(cfg)
    assert isinstance(net, CHECKPOINTABLE) == facts.checkpointable
    if facts.feature_layers is not None:
        depth = facts.feature_layers(cfg)
        assert isinstance(net.net[depth - 1], ResnetBlock) and isinstance(net.net[depth], torch.nn.ConvTranspose2d)
    side = facts.multiple(cfg)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 2 * side, 2 * side)).shape[-1] == 2 * side
