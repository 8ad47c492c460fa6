"""From raw text to batches: corpus (``corpus.py``) → tokenizer → token cache (``cache.py``) → windows
(``windows.py``) → batches, served by ``TextDataModule`` (``datamodule.py``).

``TextDataModule`` is imported on first use: the rest of this package does not need Lightning, and the light
commands (``lm-lightning evaluate``) read text through it without importing Lightning."""

from lm_lightning.data.corpus import DataError

__all__ = ["DataError", "TextDataModule"]


def __getattr__(name: str):
    if name == "TextDataModule":
        from lm_lightning.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
