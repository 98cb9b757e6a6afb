"""`fc7 query INDEX_DIR --image PATH... | --id ID...`: print the nearest indexed items.

Also runs as `python jobs/query.py INDEX_DIR ...`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit`

from jobs import run  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.search import Match, QueryConfig, SimilarityIndex  # noqa: E402

DESCRIPTION = """Find the indexed images most similar to images or to indexed ids.

Scores: cosine similarity for a cosine index and inner product for an ip index
(higher is more similar); squared L2 distance for an l2 index (lower is more similar)."""
EPILOG = """examples:
  fc7 query out/index --image photos/cat.jpg -k 5
  fc7 query out/index --id cats/cat1.jpg dogs/dog2.jpg --json
  fc7 query big/index --id cats/cat1.jpg --mmap      # an IVF index larger than memory"""


def main(argv: list[str] | None = None) -> int:
    """`fc7 query`: print the nearest items of each query as a table or JSON."""
    config = parse_config(QueryConfig, argv, "fc7 query", DESCRIPTION, EPILOG)
    index = SimilarityIndex.open(config.index, device=config.device, mmap=config.mmap)
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
                f"ids look like {index.example_id()!r})"
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
    sys.exit(run("query", main, None))
