import json
from pathlib import Path

import torch

from trainer.observe.spikes import MIN_HISTORY, SpikeCapture


def images():
    return {k: torch.zeros(2, 3, 8, 8) for k in ("real_x", "real_y", "fake_x", "fake_y", "rec_x", "rec_y")}


def test_a_jump_beyond_the_running_median_saves_that_step(tmp_path):
    capture = SpikeCapture(tmp_path, factor=5.0, check_steps=4)
    events = []
    for step in range(1, 25):
        cycle = 10.0 if step == 18 else 1.0 + 0.01 * (step % 3)
        events += capture.add(step, {"loss/cycle_x": torch.tensor(cycle), "loss/d_x": torch.tensor(0.5)}, images())
    assert [e["step"] for e in events] == [18]
    assert events[0]["terms"] == ["loss/cycle_x"]
    saved = tmp_path / "spikes" / "step_00000018"
    record = json.loads((saved / "losses.json").read_text())
    assert record["losses"]["loss/cycle_x"] == 10.0 and record["spiking"]["loss/cycle_x"]["median"] < 1.1
    assert (saved / "x_to_y.png").is_file() and (saved / "y_to_x.png").is_file()
    assert torch.load(saved / "tensors.pt", weights_only=True)["fake_y"].shape == (2, 3, 8, 8)


def test_no_spike_before_enough_history(tmp_path):
    capture = SpikeCapture(tmp_path, factor=2.0, check_steps=1)
    values = [1.0] * (MIN_HISTORY - 1) + [100.0]
    events = [e for step, v in enumerate(values, 1) for e in capture.add(step, {"loss/x": torch.tensor(v)}, images())]
    assert events == []


def test_one_way_generators_save_the_grid_they_have(tmp_path):
    """CUT/FastCUT record x, G(x) and y only: the spike keeps x | G(x) and no Y -> X grid."""
    capture = SpikeCapture(tmp_path, factor=5.0, check_steps=1)
    one_way = {k: torch.zeros(2, 3, 8, 8) for k in ("real_x", "real_y", "fake_y")}
    values = [1.0] * MIN_HISTORY + [50.0]
    events = [
        event for step, v in enumerate(values, 1) for event in capture.add(step, {"loss/nce": torch.tensor(v)}, one_way)
    ]
    saved = Path(events[0]["dir"])
    assert (saved / "x_to_y.png").is_file() and not (saved / "y_to_x.png").exists()
