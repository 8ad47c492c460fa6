"""The light commands start without Lightning's trainer stack, MLflow or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("lightning.pytorch.trainer", "mlflow", "transformers", "torch._dynamo")


def imported(*args: str) -> set[str]:
    """Modules ``lm-lightning args`` imports (``python -X importtime``)."""
    code = "import sys; from lm_lightning.cli import main; sys.argv = ['lm-lightning']; main(sys.argv[1:] or None)"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code.replace("None", repr(list(args)))],
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["export", "--help"], ["evaluate", "--help"]])
def test_light_commands_import_no_heavy_module(args):
    modules = imported(*args)
    assert not [m for m in modules if m.startswith(HEAVY)]


def test_generate_imports_no_heavy_module(tmp_path):
    from benchmarks.startup import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    modules = imported("generate", "--ckpt_path", str(ckpt), "--max_new_tokens", "5", "--seed", "1")
    assert not [m for m in modules if m.startswith(HEAVY)]


def test_fit_imports_no_transformers():
    modules = imported("fit", "--help")
    assert "lightning.pytorch.trainer" in modules
    assert not [m for m in modules if m.startswith(("transformers", "matplotlib", "scipy"))]
