"""`summary`: the text `fc7 index` prints after a build or an --add (the job prints it)."""

from __future__ import annotations

from pipeline.index.build import BuildResult
from pipeline.index.config import IndexConfig
from pipeline.index.plan import human_size
from pipeline.resources import peak_rss


def summary(config: IndexConfig, result: BuildResult) -> str:
    """The lines `fc7 index` prints: counts, kind, time, memory, recall and latency.

    Example:
        >>> print(summary(config, build_index(config, data)))  # doctest: +SKIP
        indexed 12 rows from out/emb (0 skipped with errors, 0 duplicate ids) -> out/index ...
    """
    m = result.manifest
    pca = f"PCA {m['pca']['dim']}" if m["pca"] else "no PCA"
    skipped = "already in the index" if config.add else "duplicate ids"
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items() if k != "total")
    lines = [
        f"{'added' if config.add else 'indexed'} {result.added:,} rows from {config.embeddings}"
        f" ({result.skipped_errors:,} skipped with errors, {result.skipped_duplicates:,} "
        f"{skipped}) -> {config.out} ({m['count']:,} vectors)",
        f"  kind {m['kind']} ({m['factory']}), metric {m['metric']}, dim {m['dim']}, {pca}",
        f"  time {result.seconds['total']:.1f} s"
        + (f" ({steps})" if steps else "")
        + (" on GPU" if result.on_gpu else "")
        + (" (vectors added by Ray tasks)" if result.runner == "ray" else ""),
        f"  memory: index file {human_size(m['index_bytes'])}, peak RSS of this process "
        f"{human_size(peak_rss())}"
        + (f" (--max-memory {human_size(config.max_memory)})" if config.max_memory else ""),
    ]
    params = ", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "exact"
    missed = not config.add and not result.evaluation.reached_target
    note = f"  (target {m['target_recall']} NOT reached)" if missed else ""
    before_add = (
        f" (measured at {m['recall_measured_at_count']:,} vectors, before --add)"
        if config.add
        else ""
    )
    lines.append(
        f"  recall@10 {m['recall_at_10']:.3f} vs exact search on {m['recall_queries']:,} "
        f"held-out queries at {params}{note}{before_add}"
    )
    exact = m.get("exact_queries_per_second")
    speedup = (
        f" ({m['queries_per_second'] / exact:,.1f}x exact search's {exact:,.1f})"
        if exact and not config.add
        else ""
    )
    lines.append(
        f"  latency: {m['queries_per_second']:,.0f} queries/s batched{speedup}, "
        f"{m['latency_ms']:.2f} ms per single query"
    )
    return "\n".join(lines)
