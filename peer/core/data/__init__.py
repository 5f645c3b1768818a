"""Image data for a peer: where the samples come from, how they are split and batched.

Sources (``data.source``):

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, shipped inside the package (no network, the demo).
- ``cifar10`` / ``cifar100``: the python version of CIFAR in ``data_dir``; the official test split is the test set.
- ``imagefolder``: ImageNet-style ``data_dir/train/<class>/*.jpg`` and ``data_dir/val/<class>/*``, optional ``test/``.
- ``hf:<name>``: a Hugging Face dataset, either a directory made with ``save_to_disk`` or a hub name (cached in
  ``data_dir``); the image and label columns are found from the features.

Every peer of a swarm holds out the same validation and test samples (the split is seeded with ``split_seed``) but
walks the training samples in its own order (``order_seed``), so peers never compute identical batches. Images are
RGB and transformed with timm's transforms for the model (``image_config`` from ``timm.data.resolve_data_config``).

- ``sources``: each source loaded into train, val and test parts; ``num_classes``;
- ``huggingface``: the ``hf:<name>`` sources;
- ``splits``: image sources, the shared stratified split (``split_indices``), a transformed split;
- ``module``: ``VisionDataModule`` (Lightning), its transforms (``build_transforms``).
"""

from vitpeer.peer.core.data.module import VisionDataModule, build_transforms
from vitpeer.peer.core.data.sources import num_classes
from vitpeer.peer.core.data.splits import split_indices

__all__ = ["VisionDataModule", "build_transforms", "num_classes", "split_indices"]
