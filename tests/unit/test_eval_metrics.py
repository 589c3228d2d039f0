"""Evaluation metrics against torchmetrics (the independent oracle) and hand-computed values, the Inception loader,
that training starts without importing torchmetrics, and the eval.select score."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchmetrics
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from tests.conftest import REPO, write_tiny_inception
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.sections import EvalConfig
from trainer.data import test_sets as data
from trainer.eval.evaluator import Evaluator, format_table, load_inception, selection_score
from trainer.eval.image_metrics import PSNR, SSIM, MeanAbsoluteError, reduce_means


class Scale(nn.Module):
    """A stand-in generator: x -> a * x + b (kept in [-1, 1])."""

    def __init__(self, a: float, b: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x + self.b).clamp(-1, 1)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return write_tiny_inception(tmp_path_factory.mktemp("inception") / "inception.pt")


def hand_made(n: int = 6, paired: bool = True) -> data.TestSet:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1
    y = (x.flip(1) * 0.8 + 0.1 * torch.rand(n, 3, 16, 16, generator=gen)).clamp(-1, 1)  # a "known answer"
    return data.TestSet(x, y, None, None, paired, n, n)


def evaluate(test: data.TestSet, g_xy: nn.Module, g_yx: nn.Module, inception=None, batch_size: int = 4) -> dict:
    cfg = EvalConfig(images=test.total_x, batch_size=batch_size)
    return Evaluator(test, cfg, 3, torch.device("cpu"), 1, inception)(g_xy, g_yx)


def test_metrics_equal_torchmetrics_functional_on_a_hand_made_pair():
    test = hand_made()
    g_xy, g_yx = Scale(0.9, 0.05), Scale(0.5)
    m = evaluate(test, g_xy, g_yx, batch_size=4)  # 6 images in batches of 4 and 2
    fake_y, fake_x = g_xy(test.x), g_yx(test.y)

    def psnr(a, b):
        return peak_signal_noise_ratio(a, b, data_range=2.0, dim=(1, 2, 3)).item()

    def ssim(a, b):
        return structural_similarity_index_measure(a, b, data_range=2.0).item()

    assert m["eval/psnr_g_xy"] == pytest.approx(psnr(fake_y, test.y), abs=1e-5)
    assert m["eval/psnr_g_yx"] == pytest.approx(psnr(fake_x, test.x), abs=1e-5)
    assert m["eval/psnr_identity"] == pytest.approx(psnr(test.x, test.y), abs=1e-5)
    assert m["eval/psnr_gain_xy"] == pytest.approx(m["eval/psnr_g_xy"] - m["eval/psnr_identity"])
    assert m["eval/ssim_g_xy"] == pytest.approx(ssim(fake_y, test.y), abs=1e-5)
    assert m["eval/ssim_g_yx"] == pytest.approx(ssim(fake_x, test.x), abs=1e-5)
    assert m["eval/ssim_identity"] == pytest.approx(ssim(test.x, test.y), abs=1e-5)
    assert m["eval/cycle_l1_x"] == pytest.approx((g_yx(fake_y) - test.x).abs().mean().item(), abs=1e-6)
    assert m["eval/cycle_l1_y"] == pytest.approx((g_xy(fake_x) - test.y).abs().mean().item(), abs=1e-6)
    assert m["eval/images_x"] == 6 and "eval/fid_x" not in m
    # A perfect cycle has no reconstruction error; a repeated call gives the same numbers.
    assert evaluate(test, nn.Identity(), nn.Identity())["eval/cycle_l1_x"] == 0.0


def test_psnr_ssim_and_l1_equal_torchmetrics_over_uneven_batches():
    gen = torch.Generator().manual_seed(2)
    preds = torch.rand(9, 3, 24, 20, generator=gen) * 2 - 1  # non-square, so height and width are not mixed up
    target = (preds * 0.8 + 0.4 * torch.rand(9, 3, 24, 20, generator=gen) - 0.2).clamp(-1, 1)  # SSIM ~0.8
    ours = {"psnr": PSNR(2.0), "ssim": SSIM(2.0), "l1": MeanAbsoluteError()}
    oracle = {
        "psnr": PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3)),
        "ssim": StructuralSimilarityIndexMeasure(data_range=2.0),
        "l1": torchmetrics.MeanAbsoluteError(),
    }
    for start, stop in ((0, 3), (3, 8), (8, 9)):
        for metric in [*ours.values(), *oracle.values()]:
            metric.update(preds[start:stop], target[start:stop])
    values = reduce_means(ours)
    for name, metric in oracle.items():
        assert values[name] == pytest.approx(metric.compute().item(), abs=1e-5), name
        assert ours[name].compute() == values[name]  # one process: the reduction is the local value
    for metric in ours.values():
        metric.reset()
    assert math.isnan(ours["psnr"].compute())


def test_psnr_of_known_errors_and_ssim_of_identical_images():
    target = torch.zeros(2, 3, 16, 16)
    preds = torch.stack([torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), -0.02)])
    psnr, l1, ssim = PSNR(2.0), MeanAbsoluteError(), SSIM(2.0)
    psnr.update(preds, target)
    l1.update(preds, target)
    # MSE 0.04 and 0.0004 against a range of 2: 10 log10(4 / 0.04) = 20 dB and 40 dB, mean 30 dB.
    assert psnr.compute() == pytest.approx(30.0, abs=1e-5)
    assert l1.compute() == pytest.approx((0.2 + 0.02) / 2, abs=1e-7)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ssim.update(images, images)
    assert ssim.compute() == pytest.approx(1.0, abs=1e-6)


def test_training_starts_without_importing_torchmetrics():
    check = "import sys, trainer.train, trainer.evaluate; assert 'torchmetrics' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_unpaired_data_gives_cycle_metrics_only():
    m = evaluate(hand_made(paired=False), Scale(0.5), Scale(2.0))
    assert "eval/cycle_l1_x" in m and not any(k.startswith(("eval/psnr", "eval/ssim")) for k in m)


def test_fid_and_kid_with_a_local_torchscript_network(inception_file):
    test = hand_made(8)
    inception = load_inception(str(inception_file))
    evaluator = Evaluator(test, EvalConfig(images=8, batch_size=3), 3, torch.device("cpu"), 1, inception)
    g_xy, g_yx = Scale(0.7), Scale(0.3)
    first = evaluator(g_xy, g_yx)
    reference = FrechetInceptionDistance(inception)
    reference.update(test.y, real=True)
    reference.update(g_xy(test.x), real=False)
    assert first["eval/fid_y"] == pytest.approx(reference.compute().item(), rel=1e-4)
    assert {"eval/fid_x", "eval/kid_x", "eval/kid_y", "eval/kid_x_std"} <= first.keys()
    # Real features are kept from the first call: a second call with other generators still compares with them.
    assert evaluator(g_xy, g_yx) == first
    assert evaluator(Scale(1.0), Scale(1.0))["eval/fid_y"] != first["eval/fid_y"]


def test_one_generator_is_measured_in_its_direction_only(inception_file):
    """CUT's evaluation (no F): G's PSNR/SSIM and domain Y's FID/KID, equal to those of the two-way evaluation,
    with the real Y features fed once although no generator translates Y."""
    test = hand_made(8)
    inception = load_inception(str(inception_file))
    g_xy = Scale(0.7)
    one_way = Evaluator(test, EvalConfig(images=8, batch_size=3), 3, torch.device("cpu"), 1, inception)
    got = one_way(g_xy, None)
    both = Evaluator(test, EvalConfig(images=8, batch_size=3), 3, torch.device("cpu"), 1, inception)(g_xy, Scale(0.3))
    assert set(got) == {
        "eval/images_x", "eval/images_y", "eval/psnr_identity", "eval/ssim_identity", "eval/psnr_g_xy",
        "eval/ssim_g_xy", "eval/psnr_gain_xy", "eval/fid_y", "eval/kid_y", "eval/kid_y_std",
    }  # fmt: skip
    for key in got:
        assert got[key] == pytest.approx(both[key], rel=1e-5, abs=1e-6), key  # KID: a difference of large terms
    assert one_way(g_xy, None) == got  # the real features are not fed twice
    with pytest.raises(ValueError, match="either a generator pair or one generator"):
        one_way(g_xy, Scale(0.3))
    assert selection_score(got, "psnr") == got["eval/psnr_g_xy"] and selection_score(got, "fid") == -got["eval/fid_y"]


def test_inception_loader_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.inception_weights=.*nope.pt does not exist"):
        load_inception(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError) as err:
        load_inception(str(junk))
    assert "is not a TorchScript Inception-v3" in str(err.value) and "\n" not in str(err.value)


def test_selection_score_is_higher_for_better_models():
    metrics = {"eval/psnr_g_xy": 20.0, "eval/psnr_g_yx": 22.0, "eval/cycle_l1_x": 0.1, "eval/cycle_l1_y": 0.3}
    assert selection_score(metrics, "psnr") == 21.0
    assert selection_score(metrics, "cycle") == pytest.approx(-0.2)
    with pytest.raises(ConfigError, match="eval.select=fid needs eval/fid_x, which needs eval.inception_weights"):
        selection_score(metrics, "fid")
    lines = format_table({"eval/a": 1.0, "eval/bb": 2.5}).splitlines()
    assert [line.split() for line in lines] == [["eval/a", "1.0000"], ["eval/bb", "2.5000"]]
    assert len({len(line) for line in lines}) == 1


def test_eval_config_rules():
    with pytest.raises(ConfigError, match="eval.select=fid needs eval.inception_weights"):
        load_config(None, ["eval.select=fid"])
    with pytest.raises(ConfigError, match="eval.select=psnr needs eval.images > 0"):
        load_config(None, ["eval.select=psnr", "eval.images=0"])
    with pytest.raises(ConfigError, match="eval.batch_size=0 is not allowed"):
        load_config(None, ["eval.batch_size=0"])
