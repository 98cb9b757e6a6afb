"""Extraction: plan the inputs into shards, embed each shard, write one atomic part per shard.

    config   ExtractConfig, the options of `fc7 extract`
    plan     the plan of a run and the output folder it owns (resume, --overwrite)
    worker   ShardEmbedder: embeds one shard into its part file
    layout   where the model replicas go, from each node's own resources
    pool     the Ray actors of a run: follow the cluster, survive lost workers
    runner   runs the shards in this process or on Ray, and sums up what they did
    dryrun   --dry-run: the plan summed up one shard at a time, the layout, an estimated time
"""

from pipeline.extract.config import ExtractConfig
from pipeline.extract.layout import cluster_nodes, local_nodes, worker_slots
from pipeline.extract.plan import Plan, pending_shards, prepare_output, write_plan
from pipeline.extract.runner import (
    choose_runner,
    run_shards,
    start_ray,
    stop_ray,
    summary,
)
from pipeline.extract.worker import ShardEmbedder, ShardStats

__all__ = [
    "ExtractConfig",
    "choose_runner",
    "Plan",
    "ShardEmbedder",
    "ShardStats",
    "pending_shards",
    "prepare_output",
    "run_shards",
    "start_ray",
    "stop_ray",
    "summary",
    "worker_slots",
    "cluster_nodes",
    "local_nodes",
    "write_plan",
]
