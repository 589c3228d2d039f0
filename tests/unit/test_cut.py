"""CUT/FastCUT and WGAN-GP against computations written out independently: the PatchNCE loss, the gradient
penalty and its double backward, the generator objective with its patch sampling and flip, the eagerly built head;
and the configurations they refuse."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainer.algorithms import cut
from trainer.algorithms.losses import discriminator_loss, generator_adv_loss, gradient_penalty, patch_nce_loss
from trainer.build import build_training
from trainer.checkpoint.format import TRAIN_STATE, CheckpointError
from trainer.checkpoint.resume import check_architecture
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.runtime.backends import build_backend

NEW_MODEL_FIELDS = ("family", "nce_layers", "nce_patches", "nce_mlp_channels", "nce_identity", "flip_equivariance")
NETWORKS = ["model.generator=resnet", "model.n_blocks=5", "model.ngf=4", "model.ndf=4", "model.n_layers_d=2"]
SMALL = [*NETWORKS, "model.nce_mlp_channels=8", "model.nce_patches=6"]


def direct_patch_nce(query, key, images, tau):
    """PatchNCE with Python loops in float64: -log of the positive's softmax share among the same image's patches,
    where the positive's own slot among the negatives counts exp(-10 / tau) (the reference's masked diagonal)."""
    q, k = query.double().tolist(), key.double().tolist()
    patches = len(q) // images
    total = 0.0
    for i in range(len(q)):
        image = i // patches
        dots = {j: sum(a * b for a, b in zip(q[i], k[j])) for j in range(image * patches, (image + 1) * patches)}
        positive = dots[i] / tau
        negatives = [(-10.0 if j == i else dot) / tau for j, dot in dots.items()]
        logits = [positive, *negatives]
        top = max(logits)
        total += -(positive - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q)


def test_patch_nce_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(2 * 5, 7, generator=g), dim=1)
    key = F.normalize(torch.randn(2 * 5, 7, generator=g), dim=1)
    for tau in (0.07, 1.0):
        got = patch_nce_loss(query, key, images=2, temperature=tau).item()
        assert got == pytest.approx(direct_patch_nce(query, key, 2, tau), rel=1e-5)
    # Negatives come only from the same image: another image's patches do not change the loss.
    other = key.clone()
    other[5:] = F.normalize(torch.randn(5, 7, generator=g), dim=1)
    first = patch_nce_loss(query[:5], key[:5], 1, 0.07)
    assert patch_nce_loss(query, other, 2, 0.07) != patch_nce_loss(query, key, 2, 0.07)
    assert 2 * patch_nce_loss(query, other, 2, 0.07) - patch_nce_loss(query[5:], other[5:], 1, 0.07) == (
        pytest.approx(first.item(), rel=1e-5)
    )
    # A query equal to its key and far from the others: the loss is near 0; keys are detached.
    identical = torch.eye(4)
    assert patch_nce_loss(identical, identical, 1, 0.07).item() < 1e-4
    key.requires_grad_(True)
    patch_nce_loss(query.requires_grad_(True), key, 2, 0.07).backward()
    assert key.grad is None and query.grad.abs().sum() > 0


def test_gradient_penalty_and_its_double_backward_match_hand_computations():
    w = torch.tensor([[[[0.3, -1.2], [0.5, 2.0]]]], requires_grad=True)  # a linear critic: grad = w everywhere
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    penalty = gradient_penalty(lambda m: (m * w).flatten(1).sum(1), real, fake)
    norm = w.detach().norm().item()
    assert penalty.item() == pytest.approx((norm - 1) ** 2, rel=1e-6)
    penalty.backward()  # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||: the second derivative reached w
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm)

    # A quadratic critic sum(m^2): grad = 2 m at m = a real + (1 - a) fake, one a per image from the global RNG.
    torch.manual_seed(5)
    got = gradient_penalty(lambda m: m.square().flatten(1).sum(1), real, fake).item()
    torch.manual_seed(5)
    alpha = torch.rand(3).tolist()
    want = 0.0
    for a, r, f in zip(alpha, real.double(), fake.double()):
        want += ((2 * (a * r + (1 - a) * f)).norm().item() - 1) ** 2 / 3
    assert got == pytest.approx(want, rel=1e-5)


def test_wgan_losses():
    scores = torch.tensor([1.0, 3.0])
    assert generator_adv_loss(scores, "wgangp").item() == -2.0
    loss, real, fake = discriminator_loss(scores, torch.tensor([-1.0, 0.0]), "wgangp")
    assert (real.item(), fake.item(), loss.item()) == (-2.0, -0.5, -1.25)


def expected_generator_loss(gens, disc, x, y, cfg, flip):
    """CUT's objective written out from the paper with the reference's sampling: one coin for the flip, then per
    NCE pass and layer one random permutation of the key feature map's locations (global RNG, in that order)."""
    g, head, layers = gens.g_xy, gens.head, gens.layers

    def project(features, locations):
        out = []
        for mlp, feature, where in zip(head.mlps, features, locations):
            rows = feature.permute(0, 2, 3, 1).reshape(feature.shape[0], -1, feature.shape[1])[:, where]
            rows = mlp(rows.reshape(-1, feature.shape[1]))
            out.append(rows / (rows.norm(dim=1, keepdim=True) + 1e-7))  # the reference normalization
        return out

    def nce(source, output, flipped):
        keys_features = g.features(source, layers)
        locations = [torch.randperm(f.shape[2] * f.shape[3])[: gens.patches] for f in keys_features]
        queries = g.features(output, layers)
        if flipped:
            queries = [q.flip(3) for q in queries]
        pairs = zip(project(queries, locations), project(keys_features, locations))
        return sum(direct_patch_nce(q, k, len(source), cfg.nce_temperature) for q, k in pairs) / len(layers)

    flipped = flip and torch.rand(()).item() < 0.5
    fake_y = g(x.flip(3) if flipped else x)
    idt_y = g(y.flip(3) if flipped else y) if gens.use_identity else None
    nce_value = nce(x, fake_y, flipped)
    if idt_y is not None:
        nce_value = 0.5 * (nce_value + nce(y, idt_y, flipped))
    adversarial = ((disc.d_y(fake_y) - 1) ** 2).mean().item()  # the translation as G made it, mirrored or not
    return cfg.lambda_adv * adversarial + cfg.lambda_nce * nce_value, flipped


@pytest.mark.parametrize("family", ["cut", "fastcut"])
def test_generator_objective_matches_the_paper(family):
    cfg = load_config(None, [f"model.family={family}", *SMALL])
    torch.manual_seed(0)
    gens, disc = cut.build_units(cfg.model, cfg.loss)
    disc.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    flips = set()
    for seed in range(4):  # FastCUT: both sides of the coin
        torch.manual_seed(seed)
        loss, stats, out = cut.generator_step(gens, disc, x, y, cfg.loss)
        torch.manual_seed(seed)
        with torch.no_grad():
            want, flipped = expected_generator_loss(gens, disc, x, y, cfg.loss, cfg.model.flip_equivariance)
        flips.add(flipped)
        assert loss.item() == pytest.approx(want, rel=1e-4)
    assert ("loss/nce_y" in stats) == (family == "cut") and set(out) <= {"fake_y", "idt_y"}
    assert flips == ({False, True} if family == "fastcut" else {False})
    assert cfg.loss.lambda_nce == (10.0 if family == "fastcut" else 1.0)


def test_the_head_exists_before_any_forward_and_fits_the_features():
    cfg = load_config(None, ["model.family=cut", *SMALL, "model.nce_layers=[0, 4, 7, 12]"])
    torch.manual_seed(0)
    gens, _ = cut.build_units(cfg.model, cfg.loss)
    widths = [mlp[0].in_features for mlp in gens.head.mlps]
    features = gens.g_xy.features(torch.zeros(1, 3, 16, 16), [0, 4, 7, 12])
    assert widths == [f.shape[1] for f in features] == [3, 8, 16, 16]
    assert all(mlp[2].out_features == 8 for mlp in gens.head.mlps)
    assert sum(p.numel() for p in gens.head.parameters()) > 0 and gens.g_yx is None
    # The defaults keep the paper's layers the generator has: 3 blocks end at index 12.
    assert load_config(None, ["model.family=cut", "model.generator=resnet", "model.n_blocks=3"]).model.nce_layers == [
        0, 4, 7, 10
    ]  # fmt: skip


def test_the_discriminator_unit_penalizes_under_wgangp_only():
    for mode, keys in (("lsgan", {"real_y", "fake_y"}), ("wgangp", {"real_y", "fake_y", "gp_y"})):
        cfg = load_config(None, ["model.family=cut", *SMALL, f"loss.gan_mode={mode}"])
        _, disc = cut.build_units(cfg.model, cfg.loss)
        y = torch.rand(2, 3, 16, 16)
        assert set(disc(y, y.flip(3))) == keys
        loss, stats = cut.discriminator_step(disc, y, y, None, y.flip(3), cfg.loss)
        extra = 0.5 * cfg.loss.lambda_gp * stats["loss/gp_y"] if mode == "wgangp" else 0.0
        assert loss.item() == pytest.approx((0.5 * (stats["loss/d_y_real"] + stats["loss/d_y_fake"]) + extra).item())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.family=cut", "model.generator=unet_128"], "model.family=cut needs a ResNet generator"),
        (["model.family=cut", "model.discriminator=hnet"], "trains one discriminator"),
        (["model.family=cut", "model.generator=resnet", "model.n_blocks=2", "model.nce_layers=[0, 12]"],
         "model.nce_layers=[0, 12] is not allowed; expected a non-empty list of layer indices in [0, 11]"),
        (["model.family=cut", "model.nce_layers=[4, 4]"], "expected distinct indices"),
        (["model.family=cut", "model.nce_layers=4"], "model.nce_layers=4 has the wrong type; expected a list"),
        (["model.family=fastcut", "loss.lambda_preserve=0.5"], "loss.lambda_preserve=0.5 is a CycleGAN term"),
        (["model.family=cut", "eval.select=cycle"], "eval.select=cycle needs reconstructions"),
        (["loss.gan_mode=wgangp", "train.compile=true"], "torch.compile cannot differentiate twice"),
        (["loss.gan_mode=wgangp", "train.precision=fp16"], "use bf16 or fp32"),
        (["loss.gan_mode=wgangp", "model.norm_d=batch"], "the penalty is not per image"),
        (["model.nce_patches=64"], "model.nce_patches=64 is a CUT/FastCUT setting"),
        (["loss.lambda_nce=2"], "loss.lambda_nce=2.0 is a CUT/FastCUT setting"),
        (["loss.nce_temperature=0.1"], "loss.nce_temperature=0.1 is a CUT/FastCUT setting"),
        (["loss.lambda_gp=-1"], "loss.lambda_gp=-1.0 is not allowed"),
    ],
)  # fmt: skip
def test_settings_the_families_cannot_use_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_pool_follows_the_family_unless_set():
    assert load_config(None, []).train.pool_size == 50
    assert load_config(None, ["model.family=cut"]).train.pool_size == 0
    assert load_config(None, ["model.family=cut", "train.pool_size=8"]).train.pool_size == 8


def test_wgangp_is_refused_where_the_backend_frees_weights_between_the_backwards(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # as under a launcher: no process group of its own in this process
    kept = {}
    for backend in ("ddp", "fsdp2", "deepspeed"):
        for stage in (2, 3) if backend == "deepspeed" else (2,):
            cfg = load_config(None, [*NETWORKS, f"distributed.backend={backend}", f"distributed.zero_stage={stage}"])
            instance = build_backend(cfg.distributed, cfg.train, cfg.optimizer, on_cuda=False)
            kept[instance.name] = instance.double_backward
    assert kept == {"ddp": True, "fsdp2": False, "zero2": True, "zero3": False}
    cfg = load_config(None, [*NETWORKS, "loss.gan_mode=wgangp"])
    fsdp2 = SimpleNamespace(
        backend=SimpleNamespace(double_backward=False, batch_norm_synced=False), backend_name="fsdp2"
    )
    with pytest.raises(ConfigError, match="loss.gan_mode=wgangp under fsdp2: the gradient penalty differentiates"):
        build_training(cfg, fsdp2)


def test_a_checkpoint_from_before_the_families_resumes_as_cyclegan(tmp_path):
    """Checkpoints written before model.family existed lack its fields: they read as their defaults."""
    cfg = load_config(None, [])
    old = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in NEW_MODEL_FIELDS}
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"step": 4, "world_size": 1, "backend": "ddp", "model": old}))
    check_architecture(tmp_path, cfg.model)
    with pytest.raises(CheckpointError, match="model.family='cyclegan', config says 'cut'"):
        check_architecture(tmp_path, load_config(None, ["model.family=cut"]).model)
    # How CUT trains (patches, identity term, flip) may change on resume; its layers and head may not.
    cut_cfg = load_config(None, ["model.family=cut"])
    saved = dataclasses.asdict(cut_cfg.model)
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"step": 4, "world_size": 1, "backend": "ddp", "model": saved}))
    check_architecture(tmp_path, load_config(None, ["model.family=cut", "model.nce_patches=64"]).model)
    with pytest.raises(CheckpointError, match="model.nce_mlp_channels=256, config says 64"):
        check_architecture(tmp_path, load_config(None, ["model.family=cut", "model.nce_mlp_channels=64"]).model)


def test_a_flipped_batch_mirrors_the_extra_channels_with_the_translation():
    """With data.extra (here a label map, not mirror-symmetric) G's features of its mirrored translation are read
    with the mirrored map, and the keys with the map as it is; the translation is G's of the mirrored input."""
    cfg = load_config(None, ["model.family=fastcut", *SMALL, "data.extra=label"])
    torch.manual_seed(0)
    gens, _ = cut.build_units(cfg.model, cfg.loss)
    seen = []
    features = gens.g_xy.features
    gens.g_xy.features = lambda x, layers: seen.append(x.detach().clone()) or features(x, layers)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    label = torch.zeros(2, 1, 16, 16)
    label[..., :5] = 1.0  # the left third
    for seed in range(8):
        torch.manual_seed(seed)
        flipped = torch.rand(()).item() < 0.5
        torch.manual_seed(seed)
        seen.clear()
        out = gens(x, x, label, label)
        key_input, query_input = seen
        assert torch.equal(key_input[:, 3:], label)
        assert torch.equal(query_input[:, 3:], label.flip(3) if flipped else label)
        g_input = torch.cat([x, label], 1)
        assert torch.allclose(out["fake_y"], gens.g_xy(g_input.flip(3) if flipped else g_input))


def test_features_are_the_layers_outputs_even_before_an_in_place_relu():
    """Layer 2 (the stem's norm) is followed by ReLU(inplace=True): the feature must stay the norm's output."""
    cfg = load_config(None, ["model.family=cut", *SMALL, "model.nce_layers=[2, 3]"])
    torch.manual_seed(0)
    gens, _ = cut.build_units(cfg.model, cfg.loss)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    norm_out, relu_out = gens.g_xy.features(x, [2, 3])
    want = gens.g_xy.net[:3](x)
    torch.testing.assert_close(norm_out, want)
    torch.testing.assert_close(relu_out, want.clamp_min(0))
    assert (norm_out < 0).any()
