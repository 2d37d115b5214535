"""detectron2's ``DetectionCheckpointer`` on gn_det's safe loaders.

detectron2 reads ``.pkl`` files with plain ``pickle.load``, which runs whatever code a file
carries. :class:`Checkpointer` reads every file through :mod:`gn_det.checkpoint.io` instead
(restricted unpickler, ``torch.load(weights_only=True)``, safetensors), understands every format
of :mod:`gn_det.checkpoint.weights` (torchvision ImageNet ResNets included), and keeps BN
statistics on their way to converted GN layers. Training (``MODEL.WEIGHTS``, ``--resume``) and
evaluation load through it.
"""

from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer

from .weights import read_weights, state_for_model

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)


class Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads safely and transfers BN state into GN (module doc)."""

    def load_weights(self, path: str):
        """Load only the model weights of ``path`` (any format); returns fvcore's
        ``_IncompatibleKeys`` (``missing_keys``, ``unexpected_keys``, ``incorrect_shapes``)."""
        checkpoint = self._load_file(path)
        incompatible = self._load_model(checkpoint)
        self._log_incompatible_keys(incompatible)
        return incompatible

    def _load_file(self, filename: str):
        weights = read_weights(filename)
        logger.info("Loading %s (%s, from %s).", filename, weights.kind, weights.author)
        # Named for the model in _load_model; the rest (optimizer, ...) is for resuming.
        return {**weights.extra, "model": weights.state, "__gn_det_weights__": weights}

    def _load_model(self, checkpoint):
        weights = checkpoint.pop("__gn_det_weights__", None)
        if weights is not None:
            checkpoint["model"] = state_for_model(weights, self.model)
            checkpoint["matching_heuristics"] = False  # done, with BN statistics kept
        return super()._load_model(checkpoint)
