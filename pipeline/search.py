"""The query API: open an index once, query it many times (`fc7 query` is `jobs/query.py`).

Queries are images (embedded with the model, layer and preprocessing recorded in the index),
ids of indexed items (their stored vectors, no re-embedding) or vectors. Scores follow the
index's metric: cosine similarity for `cosine` and inner product for `ip` (higher is more
similar), squared L2 distance for `l2` (lower is more similar).

Example:
    >>> index = SimilarityIndex.open("out/index")           # doctest: +SKIP
    >>> index.search_ids(["cats/cat1.jpg"], k=5)[0][0].id     # doctest: +SKIP
    'cats/cat7.jpg'
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
from pydantic import TypeAdapter, ValidationError, model_validator

from pipeline.config import Device, JobConfig, option
from pipeline.decode import DEFAULT_DECODE_MEMORY, ImageDecodeError
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch, SourceError
from pipeline.index.faiss_env import SCORES, faiss, normalize, parts, scores, to_gpu
from pipeline.index.format import INDEX_FILE, LoadedIndex, load_index
from pipeline.index.idmap import IdMap
from pipeline.model import Embedder
from pipeline.provenance import Provenance
from pipeline.resources import available_memory
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

# Images embedded per model call when a query holds many images.
EMBED_BATCH = 32
# `mmap=None` maps an index file larger than this fraction of the memory available now.
MMAP_FRACTION = 0.25


@dataclass(frozen=True)
class Match:
    """One search result: the indexed item and its score under the index's metric."""

    id: str
    path: str
    label: str | None
    score: float


class SimilarityIndex:
    """An index folder opened for querying; safe to search from several threads at once.

    Example:
        >>> index = SimilarityIndex.open("out/index")                  # doctest: +SKIP
        >>> matches = index.search_images([open("cat.jpg", "rb").read()], k=5)[0]  # doctest: +SKIP
        >>> [(m.id, round(m.score, 3)) for m in matches]               # doctest: +SKIP
    """

    def __init__(
        self,
        loaded: LoadedIndex,
        device: str = "auto",
        decode_memory: int = DEFAULT_DECODE_MEMORY,
    ):
        """Wrap a loaded index; see `open`, which most callers want.

        A memory-mapped index (`loaded.mmap`) is searched on the CPU whatever `device` says
        (which still places the model): copying it to a GPU would read all of it.
        """
        device = _device(device)
        self._loaded = loaded
        self._id_map = loaded.id_map
        self.manifest: dict[str, Any] = loaded.manifest
        self.provenance: Provenance = loaded.provenance
        self.metric: str = loaded.manifest["metric"]
        self.dim: int = int(loaded.manifest["dim"])
        self.mmap: bool = loaded.mmap
        self._cpu = loaded.index
        if not self.mmap:
            # A direct map reads every list's ids into memory: a mapped index does without,
            # and search_ids re-reads its stored vectors from the source embeddings instead.
            for part in parts(self._cpu):
                if isinstance(part, faiss.IndexIVF) and not isinstance(part, _FAST_SCAN):
                    part.make_direct_map()  # lets search_ids reconstruct stored vectors
        on_gpu = device in ("auto", "cuda") and not self.mmap
        self._gpu = to_gpu(self._cpu) if on_gpu else None
        if device == "cuda" and self._gpu is None and not self.mmap:
            raise ConfigError(
                f"--device cuda: FAISS has no GPU here for {self.manifest['factory']}"
            )
        # GPU indexes must not be searched from two threads at once; CPU ones may.
        self._gpu_lock = threading.Lock()
        self._device = device
        self._decode_memory = decode_memory
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        device: str = "auto",
        decode_memory: int = DEFAULT_DECODE_MEMORY,
        mmap: bool | None = None,
    ) -> SimilarityIndex:
        """Open an index folder built by `fc7 index`.

        Args:
            index_dir: the folder.
            device: `auto` (a GPU when FAISS has one), `cpu` or `cuda` (`gpu` is an alias).
            decode_memory: bytes the decodes of image queries may hold at once.
            mmap: memory-map the index file (inverted lists, flat and refine codes) instead
                of reading it, so that an index larger than memory can be searched: pages are
                read as queries touch them. A mapped index is searched on the CPU, and an id
                query on an IVF index re-reads its item's vector from the source embeddings.
                None (the default) maps the index when its file is larger than a quarter of
                the memory available now.

        Raises:
            ArtifactError: the folder is missing, corrupt or inconsistent.
            ConfigError: an unknown device, or `cuda` where FAISS has no GPU (and the index is
                not mapped).

        Example:
            >>> index = SimilarityIndex.open("out/index", mmap=True)  # doctest: +SKIP
            >>> index.mmap
            True
        """
        if mmap is None:
            mmap = _index_bytes(Path(index_dir)) > MMAP_FRACTION * available_memory()
        return cls(load_index(index_dir, mmap=mmap), device, decode_memory)

    def __len__(self) -> int:
        return len(self._id_map)

    @property
    def score_meaning(self) -> str:
        """What the scores mean, e.g. "cosine similarity (higher is more similar)"."""
        return SCORES[self.metric]

    def example_id(self) -> str | None:
        """An id in the index (the first), to show what ids look like; None when empty."""
        return self._id_map.rows([0])[0][0] if len(self) else None

    def item(self, id: str) -> Match:
        """The indexed item `id` (score 0.0).

        Raises:
            KeyError: no such id in the index.
        """
        item, path, label = self._id_map.rows([self._id_map.position(id)])[0]
        return Match(item, path, label, 0.0)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Match]]:
        """The `k` nearest indexed items of each row of `vectors` (shape (n, dim) or (dim,)).

        Raises:
            ProvenanceMismatch: the vectors' dimension is not the index's.
        """
        values, positions = self.search_raw(vectors, k)
        return [self._matches(s[:k], p[:k]) for s, p in zip(values, positions, strict=True)]

    def search_raw(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions (rows of `id_map`) of the `k` nearest items of each row.

        For jobs that search many rows (`fc7 duplicates`, `fc7 audit`): no `Match` objects.
        At most `len(self)` columns; FAISS pads with position -1 where it finds fewer.

        Raises:
            ProvenanceMismatch: the vectors' dimension is not the index's.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ProvenanceMismatch(
                f"query vectors have shape {vectors.shape}; this index holds {self.dim}-d "
                f"{self.provenance.layer} vectors"
            )
        if self.metric == "cosine":
            vectors = normalize(vectors)
        return self._search(self._cpu, vectors, k)

    @property
    def id_map(self) -> IdMap:
        """The indexed items' ids, paths and labels by position."""
        return self._id_map

    def search_ids(
        self, ids: list[str], k: int = 10, include_self: bool = False
    ) -> list[list[Match]]:
        """The `k` nearest items of indexed items, using their stored vectors.

        Each item is left out of its own results unless `include_self`.

        Raises:
            KeyError: an id not in the index (the error names it).
        """
        positions = self._id_map.positions(ids)
        if (positions < 0).any():
            raise KeyError(ids[int(np.flatnonzero(positions < 0)[0])])
        vectors, searched = self._stored_vectors(positions)
        extra = 0 if include_self else 1
        values, found = self._search(searched, vectors, k + extra)
        results = []
        for own, row_scores, row_positions in zip(positions, values, found, strict=True):
            keep = np.flatnonzero(include_self | (row_positions != own))[:k]
            results.append(self._matches(row_scores[keep], row_positions[keep]))
        return results

    def search_images(
        self, images: list[bytes], k: int = 10, names: list[str] | None = None
    ) -> list[list[Match]]:
        """Embed encoded images with the index's model, then search.

        Args:
            images: encoded image files (JPEG, PNG, ...).
            k: results per image.
            names: how to name each image in errors (default: "image 1", "image 2", ...).

        Raises:
            ImageDecodeError: an image cannot be decoded; the message says which.
            WeightsError, ProvenanceMismatch: the index's model cannot be loaded here.
        """
        names = names or [f"image {i + 1}" for i in range(len(images))]
        embedder = self.embedder()
        vectors = []
        for start in range(0, len(images), EMBED_BATCH):
            chunk, errors = embedder.embed_bytes(images[start : start + EMBED_BATCH])
            for offset, error in enumerate(errors):
                if error is not None:
                    # embed_bytes gives reasons only, not kinds: "corrupt" is the generic one.
                    raise ImageDecodeError(f"{names[start + offset]}: {error}", "corrupt")
            vectors.append(chunk)
        if not vectors:
            return []
        return self.search_vectors(np.concatenate(vectors), k)

    def search_paths(self, paths: list[str], k: int = 10) -> list[list[Match]]:
        """Read image files (local paths or URIs) and search by them.

        Raises:
            SourceError: a file cannot be read or decoded.
        """
        from pipeline.sources import read_image_bytes

        images = []
        for path in paths:
            try:
                images.append(read_image_bytes(path))
            except OSError as err:
                raise SourceError(f"--image {path}: cannot read: {err}") from None
        try:
            return self.search_images(images, k, names=[f"--image {p}" for p in paths])
        except ImageDecodeError as err:
            raise SourceError(f"{err} (cannot decode the query image)") from None

    def embedder(self) -> Embedder:
        """The model that made the indexed vectors, loaded on first use (once)."""
        with self._embedder_lock:
            if self._embedder is None:
                # An index of int8 embeddings carries their model (see index.format).
                folders = (str(self._loaded.folder),) if self._loaded.folder else ()
                self._embedder = Embedder.matching(
                    self.provenance, self._device, self._decode_memory, model_dirs=folders
                )
        return self._embedder

    # -- internals -------------------------------------------------------------------------

    def _matches(self, scores: np.ndarray, positions: np.ndarray) -> list[Match]:
        """The results of one query: its rows of the id map fetched in one call."""
        found = positions >= 0  # FAISS pads with -1 when it finds fewer than k
        rows = self._id_map.rows(positions[found])
        return [
            Match(item, path, label, float(score))
            for (item, path, label), score in zip(rows, scores[found], strict=True)
        ]

    def _search(self, index: Any, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, len(self)))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if index is self._cpu and self._gpu is not None:
            with self._gpu_lock:
                distances, positions = self._gpu[0].search(vectors, k)
        else:
            distances, positions = index.search(vectors, k)
        if positions.size and positions.max() >= len(self):
            # Only a damaged index answers positions its id map lacks; never drop them silently.
            raise ArtifactError(
                f"{self._loaded.folder or 'the index'}: answered position {positions.max()}, "
                f"beyond its {len(self):,} ids; the index is corrupt: rebuild it"
            )
        return scores(distances, self.metric), positions

    def _stored_vectors(self, positions: np.ndarray) -> tuple[np.ndarray, Any]:
        """Stored vectors at `positions` and the index to search them with.

        Reconstructed from the index where it keeps them (inside the PCA, if any), else
        re-read from the source embeddings.
        """
        outer = faiss.downcast_index(self._cpu)
        # Behind a PCA, search the stored (projected) vectors with the inner index: FAISS's
        # reverse transform is only an approximation, and wrong for a whitened PCA.
        searched = outer.index if isinstance(outer, faiss.IndexPreTransform) else outer
        searched = faiss.downcast_index(searched)
        if _can_reconstruct(searched):
            return searched.reconstruct_batch(positions), searched
        return self._reread(positions), self._cpu

    def _reread(self, positions: np.ndarray) -> np.ndarray:
        wanted = [item for item, _, _ in self._id_map.rows(positions)]
        found: dict[str, np.ndarray] = {}
        for source in self.manifest.get("sources", []):
            try:
                data = EmbeddingDataset.open(source["uri"])
            except ArtifactError as err:
                raise ArtifactError(
                    f"this index cannot give back stored vectors and its source is gone: {err}"
                ) from None
            # The vectors must be the ones indexed: same features, same files.
            self.provenance.require_compatible(data.provenance, "this index", source["uri"])
            if data.fingerprint() != source["fingerprint"]:
                raise ArtifactError(
                    f"{source['uri']} changed since it was indexed, and this index cannot give "
                    f"back stored vectors; rebuild the index"
                )
            # Through `batches`, which verifies checksums and refuses non-finite vectors.
            for batch in data.batches(["id", "embedding"], where=pads.field("id").isin(wanted)):
                vectors = embeddings_to_numpy(batch.column("embedding"))
                for item, vector in zip(batch.column("id").to_pylist(), vectors, strict=True):
                    found.setdefault(item, vector)
        missing = [item for item in wanted if item not in found]
        if missing:
            raise ArtifactError(f"ids {missing[:3]} are no longer in the index's source embeddings")
        vectors = np.stack([found[item] for item in wanted])
        return normalize(vectors) if self.metric == "cosine" else vectors


def _index_bytes(folder: Path) -> int:
    """The size of the folder's FAISS file; 0 when it is missing (`load_index` says so)."""
    try:
        return (folder / INDEX_FILE).stat().st_size
    except OSError:
        return 0


# FAISS 1.15 crashes (segfault) reconstructing from fast-scan PQ codes instead of raising.
_FAST_SCAN = (faiss.IndexFastScan, faiss.IndexIVFFastScan)


def _can_reconstruct(index: Any) -> bool:
    """Whether `index.reconstruct` gives back stored vectors (the refine stage's, if any)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return _can_reconstruct(index.refine_index)
    if isinstance(index, _FAST_SCAN):
        return False
    if isinstance(index, faiss.IndexIVF):
        return index.direct_map.type != faiss.DirectMap.NoMap
    if isinstance(index, faiss.IndexPreTransform):
        return False  # the reverse transform is approximate; see _stored_vectors
    return True


def _device(device: str) -> str:
    """`auto`, `cpu` or `cuda` (`gpu` and `cuda:N` name the GPU too)."""
    device = "cuda" if device.startswith("cuda") else device
    try:
        return TypeAdapter(Device).validate_python(device)
    except ValidationError:
        raise ConfigError(f"--device {device}: must be auto, cpu or cuda (gpu)") from None


# The help of `--mmap` in `fc7 query` and `fc7 serve`.
MMAP_HELP = (
    "memory-map the index file (lists and codes) instead of reading it, and search on "
    "the CPU; when not given, only an index larger than a quarter of the available memory is "
    "mapped (`mmap: false` in --config: never)"
)


class QueryConfig(JobConfig):
    """Options of `fc7 query` (`jobs/query.py`)."""

    index: str = option(help="index folder built by fc7 index", positional=True)
    images: list[str] = option(
        [],
        "query image files (local paths or URIs), embedded with the index's model",
        flag="--image",
        metavar="PATH",
    )
    ids: list[str] = option(
        [], "ids of indexed items, searched with their stored vectors", flag="--id", metavar="ID"
    )
    k: int = option(10, "results per query", flag="-k", ge=1, le=10_000)
    include_self: bool = option(False, "keep an --id query's own item in its results")
    as_json: bool = option(
        False, "print a JSON list of {query, results: [{id, path, label, score}]}", flag="--json"
    )
    device: Device = option(
        "auto",
        "where to search and embed: auto (GPU when FAISS has one), cpu or cuda (gpu is an alias)",
    )
    mmap: bool | None = option(None, MMAP_HELP)

    @model_validator(mode="after")
    def _one_kind_of_query(self) -> QueryConfig:
        if bool(self.images) == bool(self.ids):
            raise ValueError("give either --image PATH... or --id ID... (one of them)")
        return self
