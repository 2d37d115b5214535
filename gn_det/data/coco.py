"""Checks for COCO-format datasets whose files must already be on disk.

detectron2 registers its builtin datasets (``coco_2017_train``, ``coco_2017_val``, LVIS, ...)
at import, under ``$DETECTRON2_DATASETS`` (default ``./datasets``), without looking at the disk;
a missing file then surfaces deep inside data loading. :func:`check_dataset_files` fails early,
naming the path it expected and how to point detectron2 elsewhere.
"""

from __future__ import annotations

import logging
import os

__all__ = ["check_dataset_files"]

logger = logging.getLogger(__name__)

_BUILTIN_DATASETS_DOC = (
    "https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html"
)


def check_dataset_files(dataset_name: str) -> None:
    """Check that a registered dataset's ``json_file`` and ``image_root`` exist.

    A no-op for datasets whose files are generated on first use (metadata
    ``generated_on_use=True``, e.g. the shapes datasets), for datasets without ``json_file``
    metadata, and for remote (``scheme://``) paths.

    Raises:
        KeyError: if ``dataset_name`` is not registered in ``DatasetCatalog``.
        FileNotFoundError: naming the missing path and ``$DETECTRON2_DATASETS``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {dataset_name!r} is not registered; "
            f"registered datasets: {', '.join(sorted(DatasetCatalog.list()))}"
        )
    metadata = MetadataCatalog.get(dataset_name)
    if metadata.get("generated_on_use", False):
        return
    json_file = metadata.get("json_file")
    if json_file is None:
        return
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    hint = (
        f"detectron2 registers its builtin datasets under $DETECTRON2_DATASETS "
        f"(now {root!r}, resolved when detectron2 was imported); set it to the folder that "
        f"holds them, or register your own copy with register_coco_instances. "
        f"See {_BUILTIN_DATASETS_DOC}"
    )
    paths = [("annotation file", json_file, os.path.isfile)]
    image_root = metadata.get("image_root")
    if image_root is not None:
        paths.append(("image folder", image_root, os.path.isdir))
    for what, path, exists in paths:
        path = os.fspath(path)
        if "://" in path:
            logger.debug("Not checking remote path %s of %s", path, dataset_name)
            continue
        if not exists(path):
            raise FileNotFoundError(
                f"Dataset {dataset_name!r}: {what} not found at {os.path.abspath(path)}. {hint}"
            )
