"""From raw text to batches: corpus (``corpus.py``) → tokenizer → token cache (``cache.py``) → windows
(``windows.py``) → batches, served by ``TextDataModule`` (``datamodule.py``)."""

from lm_lightning.data.corpus import DataError
from lm_lightning.data.datamodule import TextDataModule

__all__ = ["DataError", "TextDataModule"]
