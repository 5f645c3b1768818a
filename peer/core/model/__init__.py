"""The network and how it is trained on one peer's devices.

- ``classifier``: ``build_model`` (a timm network by name, local or hub weights), ``ImageClassifier`` (the
  LightningModule: cross-entropy, AdamW, warm-up + cosine ``Schedule``), ``image_config`` (the model's input);
- ``parallel``: the Lightning strategy for each ``parallel.strategy`` (single, DDP, FSDP2 sharding) of several
  processes.

The classifier's public names are importable from this package itself.
"""

from vitpeer.peer.core.model.classifier import ImageClassifier, Schedule, build_model, image_config

__all__ = ["ImageClassifier", "Schedule", "build_model", "image_config"]
