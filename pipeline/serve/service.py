"""What the endpoints share: the index, an optional classifier, the lazy model, thumbnails."""

from __future__ import annotations

import threading

import numpy as np
from fastapi import HTTPException

from pipeline.classify import Classifier
from pipeline.decode import DecodeBudget
from pipeline.model import Embedder
from pipeline.search import Match, SimilarityIndex
from pipeline.serve.images import ThumbnailCache, decode_upload, make_thumbnail, read_indexed_file


class Service:
    """One opened index (and classifier) answering the requests of one server.

    The model is loaded on the first image query only, so a server answering id queries never
    pays for it. Every decode, of an upload or a thumbnail, holds its memory in one budget.

    Example:
        >>> service = Service(SimilarityIndex.open("out/index"), None, 20_000_000, 10**8, 192,
        ...                   2 * 1024**3)  # doctest: +SKIP
        >>> service.item("cats/cat1.jpg").path  # doctest: +SKIP
        '/photos/cats/cat1.jpg'
    """

    def __init__(
        self,
        index: SimilarityIndex,
        classifier: Classifier | None,
        max_upload: int,
        max_pixels: int,
        thumbnail_size: int,
        decode_memory: int,
    ):
        self.index = index
        self.classifier = classifier
        self.max_upload = max_upload
        self.max_pixels = max_pixels
        self.thumbnail_size = thumbnail_size
        # One budget for every decode in this server: uploads and thumbnails, so neither kind
        # can take the memory the other was promised.
        self.decode_budget = DecodeBudget(decode_memory)
        self.thumbnails = ThumbnailCache()
        self._model_loaded = False
        self._embedder_lock = threading.Lock()

    @property
    def model_loaded(self) -> bool:
        return self._model_loaded

    def embedder(self) -> Embedder:
        """The model the index was built with; the index loads it once, on first use.

        Raises:
            PipelineError: the recorded weights cannot be loaded or verified here.
        """
        embedder = self.index.embedder()
        with self._embedder_lock:
            if not self._model_loaded:
                # The index gives its embedder a budget of its own (of --decode-memory too):
                # share this server's instead, so that all decodes together stay within it.
                embedder.decode_budget = self.decode_budget
                self._model_loaded = True
        return embedder

    def embed_upload(self, data: bytes) -> np.ndarray:
        """One uploaded image as a (1, dim) vector; HTTPException 4xx when it is not usable."""
        # Decoded with the preprocessing the index records, which is the model's: a file that
        # is no image is refused before the model is loaded.
        tensor = decode_upload(
            data,
            self.index.provenance.preprocessing,
            self.max_upload,
            self.max_pixels,
            self.decode_budget,
        )
        return self.embedder()(tensor[None])

    def item(self, item_id: str) -> Match:
        """The indexed item `item_id`; HTTPException 404 when the index has no such id."""
        try:
            return self.index.item(item_id)
        except KeyError:
            raise _unknown(item_id) from None

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[Match]:
        # SimilarityIndex may be searched from several threads (it locks a GPU index itself).
        return self.index.search_vectors(vectors, k=k)[0]

    def search_id(self, item_id: str, k: int, include_self: bool) -> list[Match]:
        try:
            return self.index.search_ids([item_id], k=k, include_self=include_self)[0]
        except KeyError:
            raise _unknown(item_id) from None

    def thumbnail(self, item_id: str) -> bytes:
        """A small JPEG of the indexed image `item_id`, made once and kept in a bounded cache.

        Raises:
            HTTPException: 404 for an unknown id, or a file that is gone or not a usable image.
        """
        cached = self.thumbnails.get(item_id)
        if cached is not None:
            return cached
        # The path comes from the index's own map, never from the request.
        path = self.item(item_id).path
        data = make_thumbnail(
            read_indexed_file(path), self.thumbnail_size, self.max_pixels, self.decode_budget
        )
        self.thumbnails.put(item_id, data)
        return data


def _unknown(item_id: str) -> HTTPException:
    return HTTPException(404, f"no item with id {item_id!r} in this index")
