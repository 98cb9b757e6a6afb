"""Running the shards of a plan: in this process, or on Ray with one `ShardEmbedder` actor per
model replica (`pool.ActorPool`, laid out by `layout.py`); a summary at the end. Both runners
run the same shard code and write the same part files.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from pipeline.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.layout import local_nodes, plan_layout
from pipeline.extract.plan import Plan
from pipeline.extract.pool import ActorPool
from pipeline.extract.worker import ShardEmbedder, ShardStats
from pipeline.model import Weights

# Below this many images a job runs in this process even where Ray would start several
# workers: Ray's start and a model load per actor cost about 10 s, what 1,000 images take on
# one CPU replica.
SMALL_JOB_IMAGES = 1000


def summary(stats: ShardStats, plan: Plan, seconds: float, skipped_shards: int) -> str:
    """The lines printed at the end of a run."""
    lines = [
        f"fc7 extract: {plan.out}",
        f"  images in plan: {plan.inputs:,} in {plan.shards:,} shards"
        + (f" ({skipped_shards:,} already done)" if skipped_shards else ""),
        f"  this run: seen {stats.seen:,}, embedded {stats.embedded:,}, failed {stats.failed:,}",
        f"  time: {seconds:.1f} s in all, {stats.seen / max(seconds, 1e-9):.1f} images/s; "
        f"{stats.seen / max(stats.finished - stats.started, 1e-9):.1f} images/s once the "
        f"workers were up",
    ]
    for reason, count in stats.reasons.most_common(5):
        lines.append(f"  failed: {count:,} x {reason}")
    return "\n".join(lines)


def start_ray(object_store_memory: int | None = None, dashboard: bool = False) -> bool:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray of our
    own; returns whether this call started one (then `stop_ray` stops it).

    `object_store_memory` sizes the object store of a local Ray (default: Ray's, 30% of the
    memory); objects beyond it are spilled to disk. A cluster's is set by `ray start`.
    `dashboard` starts a local Ray's dashboard, whose state API Ray Train asks (off by
    default: on a laptop its processes take CPU from the model, about 5% on 2 cores).

    Never joins a Ray that `ray start` left on this machine unless RAY_ADDRESS says so: that
    one runs in another Python environment, and when its head is dead `ray.init` waits forever.

    Raises:
        PipelineError: RAY_ADDRESS names a cluster that does not answer.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _require_answering(address)
        ray.init(logging_level="WARNING")
        return False
    # Local workers import `pipeline` from this checkout even when it is not installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",
        object_store_memory=object_store_memory,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        include_dashboard=dashboard,
        logging_level="WARNING",
    )
    return True


def stop_ray() -> None:
    """Stop the local Ray that `start_ray` started; a second Ctrl-C meanwhile is not an error."""
    import ray

    try:
        ray.shutdown()
    except KeyboardInterrupt:
        pass


RAY_CONNECT_TIMEOUT_S = 10


def _require_answering(address: str) -> None:
    """Refuse a RAY_ADDRESS whose host does not take a connection, in seconds instead of
    `ray.init`'s endless retries."""
    if address == "auto":
        import ray._private.services as services  # how `ray.init` itself resolves "auto"

        try:
            found = services.canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as err:
            raise PipelineError(f"RAY_ADDRESS=auto: no running Ray cluster found ({err})") from err
        if found is None:
            raise PipelineError("RAY_ADDRESS=auto: no running Ray cluster found on this machine")
        address = found
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return  # not host:port; let Ray say what it makes of it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise PipelineError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({err.strerror or err}); "
            "start it (ray start --head), or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def choose_runner(config: ExtractConfig, images: int) -> str:
    """`local` or `ray` for `--runner` and a job of `images` images.

    `auto` runs in this process when no cluster is given (no RAY_ADDRESS, which `ray job
    submit` always sets, and no Ray already started here) and a local Ray would start a single
    worker anyway, or the job is small; everything else goes to Ray.
    """
    if config.runner != "auto":
        return config.runner
    if os.environ.get("RAY_ADDRESS") or _ray_is_initialized():
        return "ray"
    (machine,) = local_nodes()
    workers = plan_layout(config, [machine]).node_slots(machine)[: config.num_workers]
    return "local" if len(workers) <= 1 or images < SMALL_JOB_IMAGES else "ray"


def _ray_is_initialized() -> bool:
    import sys

    # Only a Ray this process imported can be running in it; importing it costs a second.
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_shards(
    config: ExtractConfig,
    plan: Plan,
    shards: list[int],
    on_shard_done,
    runner: str = "ray",
    weights: Weights | None = None,
    log: Callable[[str], None] | None = None,
) -> ShardStats:
    """Embed `shards` in this process (`runner="local"`, with `weights` if already loaded) or
    on Ray actors that follow the cluster (`pool.ActorPool`); calls `on_shard_done(stats,
    total)` as each part lands, and `log(line)` when the Ray pool grows or shrinks."""
    if runner == "local":
        return _run_here(config, plan, shards, on_shard_done, weights)
    started = start_ray()
    try:
        return ActorPool(config, plan, shards, on_shard_done, log or _recorded_only).run()
    finally:
        if started:
            stop_ray()


def _recorded_only(line: str) -> None:
    """The pool's lines when the caller shows none: they stay in `_plan/run-*.json`."""


def _run_here(config: ExtractConfig, plan: Plan, shards: list[int], on_shard_done, weights):
    # The same ShardEmbedder as a Ray actor runs, with every core of this machine: the model
    # in this thread, decoding in its thread pool.
    threads = config.cpus_per_worker or local_nodes()[0].cpus
    embed_shard = ShardEmbedder(config, plan, threads, weights)
    total = ShardStats()
    try:
        for shard in shards:
            stats = embed_shard(shard)
            total.merge(stats)
            on_shard_done(stats, total)
    finally:
        embed_shard.close()
    return total
