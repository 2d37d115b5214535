"""Weights named by URL (``detectron2://``, ``catalog://``, ``https://``), in detectron2's
download cache (iopath's, ``$FVCORE_CACHE``) as detectron2 itself keeps them; where a download
fails, one line says which URL and where its file can be put by hand."""

from __future__ import annotations

import logging
import os
import sys
from urllib.parse import urlparse

from .io import CheckpointError

__all__ = ["is_url", "cache_path", "local_weights_path"]


def is_url(path: str) -> bool:
    """Whether ``path`` names weights by URL (any ``scheme://``) rather than a local file."""
    return "://" in str(path)


def _download_url(url: str) -> str:
    """The http(s) address detectron2 downloads ``url`` from."""
    from detectron2.checkpoint.catalog import ModelCatalog
    from detectron2.utils.file_io import Detectron2Handler

    if url.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX):]
    if url.startswith("catalog://"):
        return ModelCatalog.get(url[len("catalog://"):])
    return url


def cache_path(url: str) -> str:
    """Where detectron2's download cache keeps the file of ``url`` (put there by hand, it is used
    without any download)."""
    from iopath.common.file_io import get_cache_dir

    address = _download_url(url)
    folder = os.path.dirname(urlparse(address).path.lstrip("/"))
    return os.path.join(get_cache_dir(), folder, address.split("/")[-1])


def local_weights_path(path: str) -> str:
    """A local file for ``path``: ``path`` itself, or for a URL the file in detectron2's
    download cache (:func:`cache_path`), downloaded there first if it is not yet.

    Raises:
        CheckpointError: the URL cannot be fetched (one line: the URL, why, and where to put
            the file by hand).
    """
    if not is_url(path):
        return path
    try:
        address, cached = _download_url(path), cache_path(path)
    except Exception as e:  # noqa: BLE001  (a scheme or catalog name detectron2 does not know)
        raise CheckpointError(f"{path}: not a URL detectron2 can fetch ({e}); "
                              "pass a local path") from e
    if os.path.isfile(cached):
        return cached
    from iopath.common.download import download
    from iopath.common.file_io import file_lock

    quiet = logging.getLogger("iopath.common.download")
    level, quiet.level = quiet.level, logging.CRITICAL  # its "Failed to download": ours says it
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with file_lock(cached):
            if not os.path.isfile(cached):
                download(address, os.path.dirname(cached), filename=os.path.basename(cached),
                         progress=sys.stderr.isatty())
    except Exception as e:  # URLError, HTTPError, socket and file errors
        reason = " ".join(str(getattr(e, "reason", e)).split()) or type(e).__name__
        raise CheckpointError(
            f"{path}: could not download it ({reason}); put the file at {cached} (detectron2's "
            "download cache, $FVCORE_CACHE) or pass a local path instead"
        ) from e
    finally:
        quiet.level = level
    return cached
