"""precision: null picks bf16 autocast on a CPU with bf16 units only for models wide enough to gain from it."""

import pytest

from lm_lightning import hardware


@pytest.mark.parametrize(
    "has_bf16, n_embd, expected",
    [
        (True, hardware.BF16_MIN_WIDTH, "bf16-mixed"),
        (True, hardware.BF16_MIN_WIDTH - 64, "32-true"),
        (True, None, "bf16-mixed"),
        (False, 4 * hardware.BF16_MIN_WIDTH, "32-true"),
    ],
)
def test_auto_precision_on_cpu_depends_on_bf16_units_and_width(monkeypatch, has_bf16, n_embd, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert hardware.auto_precision("cpu", n_embd) == expected


def test_cpu_peak_is_measured_once_and_measured_again_when_a_run_beats_it(monkeypatch, tmp_path):
    import json

    import torch

    monkeypatch.setenv("LM_LIGHTNING_CACHE", str(tmp_path))
    measured = iter([2e9, 3e9, 9e9])
    monkeypatch.setattr(hardware, "measured_peak_flops", lambda device, dtype: next(measured))
    cpu = torch.device("cpu")
    assert hardware.peak_flops(cpu, torch.float32)[0] == 2e9
    assert hardware.peak_flops(cpu, torch.float32)[0] == 2e9  # cached: not measured again
    assert hardware.peak_flops(cpu, torch.float32, achieved=1e9)[0] == 2e9  # below the peak: nothing to correct
    # A run faster than the cached peak (measured while the machine was busy): measured again, the highest kept.
    assert hardware.peak_flops(cpu, torch.float32, achieved=5e9)[0] == 5e9
    assert hardware.peak_flops(cpu, torch.float32, achieved=6e9)[0] == 9e9
    assert list(json.loads((tmp_path / hardware.PEAKS_FILE).read_text()).values()) == [9e9]
