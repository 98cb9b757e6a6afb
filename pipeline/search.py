"""`fc7 query` and the Python API: open an index once, query it many times.

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

import json
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.dataset as pads
from pydantic import Field

from pipeline.config import JobConfig, add_option, load_config, new_parser
from pipeline.decode import ImageDecodeError
from pipeline.errors import ArtifactError, ConfigError, ProvenanceMismatch, SourceError
from pipeline.index import (
    SCORES,
    LoadedIndex,
    faiss,
    load_index,
    normalise,
    scores,
    to_gpu,
    walk,
)
from pipeline.model import Embedder
from pipeline.provenance import Provenance
from pipeline.store import EmbeddingDataset, embeddings_to_numpy

# Images embedded per model call when a query holds many images.
EMBED_BATCH = 32


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

    def __init__(self, loaded: LoadedIndex, device: str = "auto"):
        device = "gpu" if device.startswith("cuda") else device
        if device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"--device {device}: must be auto, cpu or gpu")
        self._loaded = loaded
        self.manifest: dict[str, Any] = loaded.manifest
        self.provenance: Provenance = loaded.provenance
        self.metric: str = loaded.manifest["metric"]
        self.dim: int = int(loaded.manifest["dim"])
        self._positions = {item: position for position, item in enumerate(loaded.ids)}
        self._cpu = loaded.index
        for part in walk(self._cpu):
            if isinstance(part, faiss.IndexIVF) and not isinstance(part, _FAST_SCAN):
                part.make_direct_map()  # lets search_ids reconstruct stored vectors
        self._gpu = to_gpu(self._cpu) if device in ("auto", "gpu") else None
        if device == "gpu" and self._gpu is None:
            raise ConfigError(f"--device gpu: FAISS has no GPU here for {self.manifest['factory']}")
        # GPU indexes must not be searched from two threads at once; CPU ones may.
        self._gpu_lock = threading.Lock()
        self._device = device
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    @classmethod
    def open(cls, index_dir: str | Path, device: str = "auto") -> SimilarityIndex:
        """Open an index folder built by `fc7 index`.

        Args:
            index_dir: the folder.
            device: `auto` (a GPU when FAISS has one), `cpu` or `gpu`.

        Raises:
            ArtifactError: the folder is missing, corrupt or inconsistent.
        """
        return cls(load_index(index_dir), device)

    def __len__(self) -> int:
        return len(self._loaded.ids)

    @property
    def score_meaning(self) -> str:
        return SCORES[self.metric]

    def item(self, id: str) -> Match:
        """The indexed item `id` (score 0.0).

        Raises:
            KeyError: no such id in the index.
        """
        return self._match(self._position(id), 0.0)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Match]]:
        """The `k` nearest indexed items of each row of `vectors` (shape (n, dim) or (dim,)).

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
            vectors = normalise(vectors)
        values, positions = self._search(self._cpu, vectors, k)
        return [self._matches(s, p, k) for s, p in zip(values, positions, strict=True)]

    def search_ids(
        self, ids: list[str], k: int = 10, include_self: bool = False
    ) -> list[list[Match]]:
        """The `k` nearest items of indexed items, using their stored vectors.

        Each item is left out of its own results unless `include_self`.

        Raises:
            KeyError: an id not in the index (the error names it).
        """
        positions = np.array([self._position(item) for item in ids], dtype=np.int64)
        vectors, searched = self._stored_vectors(positions)
        extra = 0 if include_self else 1
        values, found = self._search(searched, vectors, k + extra)
        results = []
        for own, row_scores, row_positions in zip(positions, values, found, strict=True):
            keep = [
                (s, p)
                for s, p in zip(row_scores, row_positions, strict=True)
                if include_self or p != own
            ][:k]
            results.append([self._match(int(p), float(s)) for s, p in keep if p >= 0])
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
                torch_device = {"gpu": "cuda"}.get(self._device, self._device)
                self._embedder = Embedder.matching(self.provenance, torch_device)
        return self._embedder

    # -- internals -------------------------------------------------------------------------

    def _position(self, item: str) -> int:
        try:
            return self._positions[item]
        except KeyError:
            raise KeyError(item) from None

    def _match(self, position: int, score: float) -> Match:
        loaded = self._loaded
        return Match(loaded.ids[position], loaded.paths[position], loaded.labels[position], score)

    def _matches(self, scores: np.ndarray, positions: np.ndarray, k: int) -> list[Match]:
        return [
            self._match(int(p), float(s))
            for s, p in zip(scores[:k], positions[:k], strict=True)
            if p >= 0
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
        wanted = [self._loaded.ids[p] for p in positions]
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
        return normalise(vectors) if self.metric == "cosine" else vectors


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


# ---------------------------------------------------------------------------------------------
# fc7 query


class QueryConfig(JobConfig):
    """Options of `fc7 query`."""

    index: str
    images: list[str] = []
    ids: list[str] = []
    k: int = Field(default=10, ge=1, le=10_000)
    include_self: bool = False
    as_json: bool = False
    device: Literal["auto", "cpu", "gpu"] = "auto"


def parse(argv: list[str] | None) -> QueryConfig:
    parser = new_parser(
        prog="fc7 query",
        description="Find the indexed images most similar to images or to indexed ids.\n\n"
        "Scores: cosine similarity for a cosine index and inner product for an ip index\n"
        "(higher is more similar); squared L2 distance for an l2 index (lower is more similar).",
        epilog="examples:\n"
        "  fc7 query out/index --image photos/cat.jpg -k 5\n"
        "  fc7 query out/index --id cats/cat1.jpg dogs/dog2.jpg --json",
    )
    parser.add_argument("index", help="index folder built by fc7 index")
    add_option(
        parser,
        "--image",
        QueryConfig,
        "query image files (local paths or URIs), embedded with the index's model",
        field="images",
        nargs="+",
        metavar="PATH",
    )
    add_option(
        parser,
        "--id",
        QueryConfig,
        "ids of indexed items, searched with their stored vectors",
        field="ids",
        nargs="+",
        metavar="ID",
    )
    add_option(parser, "-k", QueryConfig, "results per query", type=int)
    add_option(
        parser,
        "--include-self",
        QueryConfig,
        "keep an --id query's own item in its results",
        action="store_true",
    )
    add_option(
        parser,
        "--json",
        QueryConfig,
        "print a JSON list of {query, results: [{id, path, label, score}]}",
        field="as_json",
        action="store_true",
    )
    add_option(
        parser,
        "--device",
        QueryConfig,
        "where to search and embed: auto (GPU when FAISS has one), cpu or gpu",
        choices=["auto", "cpu", "gpu"],
    )
    return load_config(QueryConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """`fc7 query`: print the nearest items of each query as a table or JSON."""
    config = parse(argv)
    if bool(config.images) == bool(config.ids):
        raise ConfigError("give either --image PATH... or --id ID... (one of them)")
    index = SimilarityIndex.open(config.index, device=config.device)
    if config.images:
        queries = config.images
        results = index.search_paths(config.images, config.k)
    else:
        queries = config.ids
        try:
            results = index.search_ids(config.ids, config.k, config.include_self)
        except KeyError as err:
            raise ConfigError(
                f"--id {err.args[0]}: not in the index {config.index} ({len(index):,} items; "
                f"ids look like {index._loaded.ids[0]!r})"
            ) from None
    if config.as_json:
        print(
            json.dumps(
                [
                    {"query": query, "results": [asdict(match) for match in matches]}
                    for query, matches in zip(queries, results, strict=True)
                ],
                indent=2,
            )
        )
    else:
        print(format_table(queries, results, index.score_meaning))
    return 0


def format_table(queries: list[str], results: list[list[Match]], score: str) -> str:
    """Results as a readable text table, one block per query."""
    lines = [f"score: {score}"]
    for query, matches in zip(queries, results, strict=True):
        lines.append(f"\nquery: {query}")
        id_width = max([len(m.id) for m in matches] + [2])
        label_width = max([len(m.label or "-") for m in matches] + [5])
        lines.append(
            f"  {'rank':>4}  {'score':>9}  {'id':<{id_width}}  {'label':<{label_width}}  path"
        )
        for rank, match in enumerate(matches, 1):
            lines.append(
                f"  {rank:>4}  {match.score:>9.4f}  {match.id:<{id_width}}  "
                f"{match.label or '-':<{label_width}}  {match.path}"
            )
        if not matches:
            lines.append("  (no results)")
    return "\n".join(lines)


if __name__ == "__main__":
    from pipeline.cli import run

    sys.exit(run("query", main, None))
