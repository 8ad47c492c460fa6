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
