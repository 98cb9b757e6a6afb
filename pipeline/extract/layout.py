"""Where the model replicas of a run go: sized from each node's own CPUs and GPUs, never from
the cluster's totals, so that no replica asks for more than one node has.

    GPU nodes   one replica per GPU (or k per GPU when --num-workers asks for more replicas
                than there are GPUs), the node's CPUs shared among them
    CPU nodes   replicas of at most 8 threads each, the node's CPUs shared among them

With GPUs in the cluster (and --device auto or cuda) only GPU nodes get replicas: a run's
vectors all come from one precision (fp16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.extract.config import ExtractConfig

# AlexNet's GEMMs scale well to about 8 threads; past that, more replicas do better.
MAX_THREADS_PER_REPLICA = 8


@dataclass(frozen=True)
class Node:
    """One machine of the cluster, as Ray reports it (or this machine, for the local runner)."""

    id: str
    address: str
    cpus: int
    gpus: int
    labels: tuple[str, ...] = ()  # the node's custom Ray resources, which name it to people

    def __str__(self) -> str:
        return f"{self.address} [{self.id[:8]}] ({self.cpus} CPU, {self.gpus} GPU)"


@dataclass(frozen=True)
class Slot:
    """A place for one model replica: a node and the share of it the replica asks Ray for."""

    node_id: str
    index: int  # the replica's number on its node
    cpus: int
    gpus: float

    @property
    def key(self) -> tuple[str, int]:
        return self.node_id, self.index


@dataclass(frozen=True)
class Layout:
    """The sizing rules of one run, fixed when it starts; nodes that join later get replicas by
    the same rules."""

    on_gpu: bool
    replicas_per_gpu: int = 1
    cpus_per_replica: int | None = None  # None: each CPU node's CPUs shared by its replicas

    def node_slots(self, node: Node) -> list[Slot]:
        """The replicas that `node` can hold under these rules (none when it has no room)."""
        if self.on_gpu:
            replicas = node.gpus * self.replicas_per_gpu
            if replicas == 0:
                return []
            cpus = self.cpus_per_replica or max(1, node.cpus // replicas)
            gpus = 1 / self.replicas_per_gpu
        else:
            if self.cpus_per_replica:
                cpus = self.cpus_per_replica
                replicas = node.cpus // cpus
            else:
                replicas = math.ceil(node.cpus / MAX_THREADS_PER_REPLICA)
                cpus = node.cpus // replicas if replicas else 0
            gpus = 0.0
        replicas = min(replicas, node.cpus // cpus) if cpus else 0
        return [Slot(node.id, index, cpus, gpus) for index in range(replicas)]


def plan_layout(config: ExtractConfig, nodes: list[Node]) -> Layout:
    """The sizing rules for `config` on the nodes a run starts with.

    Raises:
        ConfigError: --device cuda without a GPU in the cluster.
    """
    gpus = sum(node.gpus for node in nodes) if config.device != "cpu" else 0
    if config.device == "cuda" and gpus == 0:
        # Checked here, before any actor starts: an actor would fail only after loading.
        raise ConfigError("--device cuda: the Ray cluster has no GPU; use --device auto or cpu")
    if gpus:
        # --num-workers above the GPU count shares each GPU between replicas (bench/
        # gpu_check.sh measures whether two replicas per GPU beat one).
        per_gpu = math.ceil(config.num_workers / gpus) if config.num_workers else 1
        return Layout(True, per_gpu, config.cpus_per_worker)
    size = config.cpus_per_worker
    if size is None and config.num_workers:
        # As many threads per replica as still lets --num-workers replicas fit the nodes.
        size = next(
            (
                size
                for size in range(MAX_THREADS_PER_REPLICA, 0, -1)
                if sum(node.cpus // size for node in nodes) >= config.num_workers
            ),
            1,
        )
    return Layout(False, cpus_per_replica=size)


def worker_slots(config: ExtractConfig, nodes: list[Node], layout: Layout | None = None):
    """The replicas a run starts on `nodes`: every node's slots, at most --num-workers of them,
    taken one per node in turn so that they spread over the nodes.

    Raises:
        ConfigError: no node can hold one replica (the message lists the nodes), or --device
            cuda without a GPU.

    Example:
        >>> config = ExtractConfig(source="photos", out="emb")
        >>> [slot.cpus for slot in worker_slots(config, [Node("a", "10.0.0.1", 16, 0)])]
        [8, 8]
    """
    layout = layout or plan_layout(config, nodes)
    per_node = [layout.node_slots(node) for node in nodes]
    slots = spread(per_node)
    if not slots:
        shown = "; ".join(str(node) for node in nodes) or "none"
        need = (
            f"{layout.cpus_per_replica or 1} CPU" + (" and a GPU" if layout.on_gpu else "")
        )
        raise ConfigError(
            f"no node of the Ray cluster can hold one worker of {need} (nodes: {shown}); "
            "lower --cpus-per-worker, or add a larger node"
        )
    return slots[: config.num_workers] if config.num_workers else slots


def spread(per_node: list[list[Slot]]) -> list[Slot]:
    """The slots of every node, taken one per node in turn: the first N spread over the nodes.

    Example:
        >>> a, b = [Slot("a", 0, 8, 0), Slot("a", 1, 8, 0)], [Slot("b", 0, 4, 0)]
        >>> [slot.key for slot in spread([a, b])]
        [('a', 0), ('b', 0), ('a', 1)]
    """
    rounds = range(max(map(len, per_node), default=0))
    return [slots[index] for index in rounds for slots in per_node if index < len(slots)]


def local_nodes() -> list[Node]:
    """This machine as one node: the CPUs and GPUs an embedded local Ray would see."""
    import torch

    return [Node("local", "this machine", len(os.sched_getaffinity(0)),
                 torch.cuda.device_count())]


def cluster_nodes() -> list[Node]:
    """The live nodes of the Ray cluster this process is connected to, in Ray's order."""
    import ray

    return [
        Node(
            node["NodeID"],
            node["NodeManagerAddress"],
            int(node["Resources"].get("CPU", 0)),
            int(node["Resources"].get("GPU", 0)),
            tuple(sorted(name for name in node["Resources"] if not _is_builtin(name))),
        )
        for node in ray.nodes()
        if node["Alive"]
    ]


def _is_builtin(resource: str) -> bool:
    return resource in ("CPU", "GPU", "memory", "object_store_memory") or ":" in resource
