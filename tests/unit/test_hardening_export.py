"""Exports and checkpoints from elsewhere (issue 27): a model.json or train_state.json whose architecture is out of
bounds is refused in one line before anything is allocated; an export is published whole by a rename, with the
sha256 of each file, never through a planted link; non-finite and damaged weights are refused at save and load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tests.conftest import REPO, rewrite_listed, run_bounded
from trainer.algorithms import cut, cyclegan
from trainer.algorithms.bounds import MAX_PARAMETERS, unit_parameters
from trainer.checkpoint.export import export, load_generators, load_inference_generators, save_export
from trainer.checkpoint.format import COMPLETE, CheckpointError
from trainer.config.checks import ConfigError
from trainer.config.load import config_yaml, load_config
from trainer.config.model import LossConfig, ModelConfig
from trainer.models import build_generator

TINY = ["model.generator=resnet", "model.ngf=4", "model.n_blocks=1", "data.load_size=8", "data.crop_size=8"]


@pytest.fixture()
def cfg():
    return load_config(None, TINY)


def weights(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Freshly initialized g_xy and g_yx of `cfg`, as the generator unit's full state dict."""
    torch.manual_seed(seed)
    return {f"{n}.{k}": v for n in ("g_xy", "g_yx") for k, v in build_generator(cfg.model).state_dict().items()}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (links not followed) by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


HOSTILE_MODELS = {
    "image_size": ({"image_size": 100000}, "model.json: image_size=100000 is out of bounds"),
    "ngf": ({"ngf": 200000}, "model.json: model.ngf=200000 is out of bounds; expected an integer in [1, 4096]"),
    "parameters": ({"ngf": 2048}, f"parameters, over the limit of {MAX_PARAMETERS:,}"),
}
BOUNDED_LOAD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # any big allocation fails instead of swapping
from trainer.config.checks import ConfigError
from trainer.checkpoint.export import load_generators
for path in sys.argv[1:]:
    try:
        load_generators(path)
        print("loaded", path)
    except ConfigError as err:
        print(err)
"""


def test_an_export_out_of_bounds_is_refused_in_one_line_without_allocating(cfg, tmp_path):
    exports = []
    for name, (change, _) in HOSTILE_MODELS.items():
        out = tmp_path / name
        save_export(out, weights(cfg), None, cfg.model, cfg.data)
        meta = json.loads((out / "model.json").read_text())
        if "image_size" in change:
            meta.update(change)
        else:
            meta["model"].update(change)
        rewrite_listed(out, "model.json", json.dumps(meta).encode())
        exports.append(str(out))
    result = run_bounded([sys.executable, "-c", BOUNDED_LOAD, *exports], timeout_s=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(exports), result.stdout
    for line, path, (_, message) in zip(lines, exports, HOSTILE_MODELS.values()):
        assert line.startswith(f"export {path}: ") and message in line, line


def fake_run(cfg, run_dir: Path, model: dict | None, units: dict[str, torch.Tensor]) -> Path:
    """A run directory with config.yaml and one intact checkpoint holding `units` and `model` as its architecture."""
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    state = {"step": 1, "world_size": 1, "backend": "ddp", "model": model, "format": 1, "images_seen": 2}
    files = {"train_state.json": json.dumps(state).encode(), "units.safetensors": save(units)}
    for name, data in files.items():
        (checkpoint / name).write_bytes(data)
    (checkpoint / COMPLETE).write_text(json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in files.items()}))
    return run_dir


def test_a_checkpoint_model_out_of_bounds_is_refused_before_export(cfg, tmp_path):
    units = {f"g/{k}": v for k, v in weights(cfg).items()}
    run_dir = fake_run(cfg, tmp_path / "run", {**dataclasses.asdict(cfg.model), "ngf": 200000}, units)
    with pytest.raises((ConfigError, CheckpointError), match=r"model\.ngf=200000 is out of bounds") as caught:
        export(run_dir)
    assert "train_state.json" in str(caught.value) and "\n" not in str(caught.value)
    assert not (run_dir / "export-step_00000001").exists()


def test_non_finite_weights_are_refused_at_save_and_at_load(cfg, tmp_path):
    out = tmp_path / "run" / "export"
    save_export(out, weights(cfg), None, cfg.model, cfg.data)
    before = snapshot(out)
    nan = {k: torch.full_like(v, float("nan")) if k.startswith("g_yx.") else v for k, v in weights(cfg).items()}
    with pytest.raises(ConfigError, match=rf"^export {out}: g_yx: \S+ holds NaN or infinite values"):
        save_export(out, weights(cfg), nan, cfg.model, cfg.data)
    assert snapshot(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["export"]

    all_nan = {k: torch.full_like(v, float("nan")) for k, v in weights(cfg).items() if k.startswith("g_xy.")}
    rewrite_listed(out, "g_xy.safetensors", save({k[5:]: v for k, v in all_nan.items()}))
    with pytest.raises(ConfigError, match=rf"^export {out}: g_xy.safetensors: \S+ holds NaN or infinite values"):
        load_generators(out)

    units = {f"g/{k}": torch.full_like(v, float("inf")) for k, v in weights(cfg).items()}
    run_dir = fake_run(cfg, tmp_path / "nan-run", dataclasses.asdict(cfg.model), units)
    with pytest.raises(ConfigError, match=r"units.safetensors: \S+ holds NaN or infinite values"):
        load_inference_generators(run_dir)


def test_damaged_or_linked_export_files_are_refused(cfg, tmp_path):
    def fresh(name: str) -> Path:
        out = tmp_path / name
        save_export(out, weights(cfg), None, cfg.model, cfg.data)
        return out

    flipped = fresh("flipped")
    data = bytearray((flipped / "g_xy.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    (flipped / "g_xy.safetensors").write_bytes(bytes(data))
    linked = fresh("linked")
    (tmp_path / "copy.safetensors").write_bytes((linked / "g_yx.safetensors").read_bytes())
    (linked / "g_yx.safetensors").unlink()
    (linked / "g_yx.safetensors").symlink_to(tmp_path / "copy.safetensors")  # same bytes, same sha256
    unlisted = fresh("unlisted")
    hashes = json.loads((unlisted / COMPLETE).read_text())
    (unlisted / COMPLETE).write_text(json.dumps({"model.json": hashes["model.json"]}))
    expected = {
        flipped: f"export {flipped} is damaged: g_xy.safetensors does not match its sha256 in COMPLETE",
        linked: f"export file {linked / 'g_yx.safetensors'} is a symlink; expected a regular file",
        unlisted: f"export {unlisted}: COMPLETE does not list g_xy.safetensors",
    }
    for out, message in expected.items():
        with pytest.raises(ConfigError) as caught:
            load_generators(out)
        assert str(caught.value) == message


@pytest.mark.parametrize(
    "meta,message",
    [([], "expected a JSON object with model (a mapping) and image_size (an integer)"),
     ({"model": {}, "image_size": "8"}, "expected a JSON object with model (a mapping) and image_size (an integer)"),
     ({"model": {}, "image_size": 8, "extra": []}, "extra=[] is not one of none, hist, label"),
     ({"model": {"ngf": "x"}, "image_size": 8}, "model.ngf='x' has the wrong type; expected int"),
     ({"model": {"input_nc": 3}, "image_size": 8, "extra": "hist"}, "model.input_nc=3 does not fit extra=hist")],
    ids=["not-an-object", "image-size-a-string", "extra-a-list", "ngf-a-string", "channels-of-another-extra"],
)  # fmt: skip
def test_a_malformed_model_json_is_one_line(meta, message, cfg, tmp_path):
    out = tmp_path / "export"
    save_export(out, weights(cfg), None, cfg.model, cfg.data)
    rewrite_listed(out, "model.json", json.dumps(meta).encode())
    with pytest.raises(ConfigError) as caught:
        load_generators(out)
    assert str(caught.value) == f"export {out}: model.json: {message}"


def test_an_export_of_an_earlier_version_loads_with_a_warning(cfg, tmp_path, capsys):
    out = tmp_path / "export"
    save_export(out, weights(cfg), None, cfg.model, cfg.data)
    (out / COMPLETE).unlink()
    assert load_generators(out).image_size == 8
    assert capsys.readouterr().err.splitlines() == [
        f"warning: export {out} has no COMPLETE (an export of an earlier version): its files are not checked "
        "against their sha256"
    ]


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from trainer.config.load import load_config
from trainer.checkpoint.export import save_export
from trainer.models import build_generator

synced = []
fsync = os.fsync
def fsync_then_die(fd):  # the second file of the new export is on disk, the rest is not
    fsync(fd)
    synced.append(fd)
    if len(synced) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync_then_die
cfg = load_config(None, sys.argv[2:])
torch.manual_seed(1)
new = {f"{n}.{k}": v for n in ("g_xy", "g_yx") for k, v in build_generator(cfg.model).state_dict().items()}
save_export(Path(sys.argv[1]), new, new, cfg.model, cfg.data)
"""


def test_a_kill_during_save_export_leaves_the_previous_export(cfg, tmp_path):
    out = tmp_path / "run" / "export"
    save_export(out, weights(cfg), None, cfg.model, cfg.data)
    before = snapshot(out)
    killed = run_bounded([sys.executable, "-c", KILLED_SAVE, str(out), *TINY], timeout_s=120, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "run" / "export.tmp").is_dir()  # it died while writing
    assert snapshot(out) == before
    old = load_generators(out)
    assert torch.equal(old.g_xy.state_dict()["net.1.weight"], weights(cfg)["g_xy.net.1.weight"])

    save_export(out, weights(cfg, seed=2), None, cfg.model, cfg.data)  # the next save clears the debris
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]
    new = load_generators(out)
    assert torch.equal(new.g_xy.state_dict()["net.1.weight"], weights(cfg, seed=2)["g_xy.net.1.weight"])


def test_a_save_that_died_between_its_renames_gets_the_previous_export_back(cfg, tmp_path, monkeypatch):
    out = tmp_path / "export"
    save_export(out, weights(cfg), None, cfg.model, cfg.data)
    before = snapshot(out)
    os.rename(out, tmp_path / "export.old")  # where the first rename of a save leaves it

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_export(out, weights(cfg, seed=2), None, cfg.model, cfg.data)
    monkeypatch.undo()
    assert snapshot(out) == before
    load_generators(out)


def test_links_planted_where_save_export_writes_are_replaced_never_followed(cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = {}
    for name in ("export", "export.tmp", "export.old"):
        target = tmp_path / f"victim-{name}"
        target.mkdir()
        (target / "keep.txt").write_text(name)
        (run / name).symlink_to(target)
        elsewhere[target] = snapshot(target)
    save_export(run / "export", weights(cfg), weights(cfg, seed=1), cfg.model, cfg.data)
    assert all(snapshot(target) == files for target, files in elsewhere.items())
    assert sorted(p.name for p in run.iterdir()) == ["export"]
    assert (run / "export").is_dir() and not (run / "export").is_symlink()
    assert sorted(snapshot(run / "export")) == [
        "COMPLETE", "g_xy.safetensors", "g_yx.safetensors", "model.json",
        "raw/COMPLETE", "raw/g_xy.safetensors", "raw/g_yx.safetensors", "raw/model.json",
    ]  # fmt: skip
    assert load_generators(run / "export").image_size == load_generators(run / "export" / "raw").image_size == 8


def test_save_export_never_replaces_a_directory_that_is_not_an_export(cfg, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=rf"^{photos} exists and is neither an export \(model.json\) nor empty"):
        save_export(photos, weights(cfg), None, cfg.model, cfg.data)
    assert snapshot(photos) == {"holiday.png": b"precious"}


@pytest.mark.parametrize(
    "fields",
    [{}, {"discriminator": "hnet", "hnet_trunk_layers": 3, "norm_d": "batch"}, {"discriminator": "pixel"},
     {"generator": "densenet", "n_blocks": 2}, {"generator": "unet_article", "input_nc": 27},
     {"family": "cut"}, {"family": "fastcut", "discriminator": "pixel", "norm_g": "batch"}],
)  # fmt: skip
def test_the_parameter_count_is_that_of_the_units_training_builds(fields):
    model = ModelConfig(**{"ngf": 8, "ndf": 8, **fields})
    units = (cut if model.family in ("cut", "fastcut") else cyclegan).build_units(model, LossConfig())
    assert unit_parameters(model) == sum(t.numel() for u in units for t in (*u.parameters(), *u.buffers()))
