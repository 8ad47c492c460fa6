"""Where ``trainer.logger.class_path`` pointed before the MLflow code moved to ``lm_lightning.tracking``:
configs that name ``lm_lightning.logger.MLflowLogger`` keep working."""

from lm_lightning.tracking.logger import MLflowLogger

__all__ = ["MLflowLogger"]
