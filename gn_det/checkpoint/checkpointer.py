"""detectron2's ``DetectionCheckpointer`` on gn_det's safe loaders.

detectron2 reads ``.pkl`` files with plain ``pickle.load``, which runs whatever code a file
carries; :class:`Checkpointer` reads every format of :mod:`gn_det.checkpoint.weights` safely and
keeps BN statistics on their way to converted GN layers. It also saves atomically: detectron2
writes in place, so a run killed mid-save leaves a truncated file that ``--resume`` fails on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer

from .io import CheckpointError, save_checkpoint_file, write_text_atomically
from .weights import Weights, fit_summary, read_weights, state_for_model

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
        _check_fold_plan(filename, weights, self.model)
        check_weight_standardization(filename, weights, self.model)
        logger.info("Loading %s (%s, from %s).", filename, weights.kind, weights.author)
        # Named for the model in _load_model; the rest (optimizer, ...) is for resuming.
        return {**weights.extra, "model": weights.state,
                "__gn_det_weights__": (filename, weights)}

    def _load_model(self, checkpoint):
        """detectron2's, then one line on what the file set, or ``CheckpointError`` when it
        sets too little of the backbone (:func:`~gn_det.checkpoint.weights.fit_summary`)."""
        filename, weights = checkpoint.pop("__gn_det_weights__", (None, None))
        if weights is not None:
            checkpoint["model"] = state_for_model(weights, self.model)
            checkpoint["matching_heuristics"] = False  # done, with BN statistics kept
        incompatible = super()._load_model(checkpoint)
        if filename is not None:  # heads missing (an ImageNet backbone) are no cause to warn
            line, partial = fit_summary(self.model.state_dict(), incompatible.missing_keys,
                                        [k for k, *_ in incompatible.incorrect_shapes], filename)
            logger.log(logging.WARNING if partial else logging.INFO, line)
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        """Each key at DEBUG: ``_load_model`` has said it in one line (fvcore warns per key)."""
        logger.debug("Keys not loaded: %s", incompatible)

    def save(self, name: str, **kwargs: Any) -> None:
        """detectron2's ``save`` (model, checkpointables, ``kwargs`` into ``<name>.pth``, then the
        ``last_checkpoint`` tag), each file written atomically; a no-op off the main process."""
        if not self.save_dir or not self.save_to_disk:
            return
        from ..folding import fold_plan_metadata
        from ..standardization import ws_metadata

        data = {"model": self.model.state_dict(), **fold_plan_metadata(self.model),
                **ws_metadata(self.model),
                **{key: obj.state_dict() for key, obj in self.checkpointables.items()}, **kwargs}
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", save_file)
        save_checkpoint_file(data, save_file, file_format="pth", overwrite=True)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` (what ``--resume`` reads) at a saved file, atomically."""
        write_text_atomically(os.path.join(self.save_dir, "last_checkpoint"),
                              last_filename_basename)


def _check_fold_plan(path: str, weights: Weights, model) -> None:
    """Refuse a checkpoint folded otherwise than ``model`` (:func:`gn_det.folding.fold_plan`), which
    fvcore would load as far as it fits, warning of keys not found: a wrong model."""
    from ..folding import FOLD_PLAN_KEY, NOT_FOLDED

    recorded = weights.extra.get(FOLD_PLAN_KEY) or NOT_FOLDED
    built = getattr(model, FOLD_PLAN_KEY, NOT_FOLDED)
    if recorded != built:
        raise CheckpointError(f"{path}: written for {recorded}, but the model is built with "
                              f"{built}; load it with the config keys it was written for")


def check_weight_standardization(path: str, weights: Weights, model) -> None:
    """Refuse a GN + WS checkpoint for a model without WS: the same keys, but raw weights that
    only a standardising conv turns into what was trained."""
    from ..standardization import WS_KEY, ws_metadata

    if weights.extra.get(WS_KEY) and not ws_metadata(model):
        raise CheckpointError(f"{path}: written by a GN + Weight Standardization model (raw conv "
                              f"weights that it standardises), but the model is built without "
                              f"it; set {weights.extra[WS_KEY]}, or fold it for inference "
                              "(gn-det convert --to folded)")
