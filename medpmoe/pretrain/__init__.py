"""Self-supervised pretraining of a timm ViT expert on unlabeled images (MAE, DINO through lightly)."""

from medpmoe.pretrain.record import read_record, record_path, write_expert
from medpmoe.pretrain.run import pretrain

__all__ = ["pretrain", "read_record", "record_path", "write_expert"]
