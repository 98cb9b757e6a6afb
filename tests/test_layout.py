"""Where `fc7 extract` puts its model replicas: sized from each node's own resources."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.extract import ExtractConfig
from pipeline.extract.layout import Node, worker_slots


def slots(nodes: list[Node], **options) -> list[tuple[str, int, float]]:
    config = ExtractConfig(source="photos", out="out", **options)
    return [(slot.node_id, slot.cpus, slot.gpus) for slot in worker_slots(config, nodes)]


def cpu_nodes(count: int, cpus: int) -> list[Node]:
    return [Node(f"n{i}", f"10.0.0.{i}", cpus, 0) for i in range(count)]


@pytest.mark.parametrize(
    ("nodes", "options", "expected"),
    [
        # This machine: one replica with both cores.
        (cpu_nodes(1, 2), {}, [("n0", 2, 0)]),
        # Replicas of at most 8 threads; a node's CPUs are shared among its replicas.
        (cpu_nodes(1, 16), {}, [("n0", 8, 0)] * 2),
        (cpu_nodes(1, 12), {}, [("n0", 6, 0)] * 2),
        # Three 1-CPU nodes: one replica each (the totals asked for one replica of 3 CPUs).
        (cpu_nodes(3, 1), {}, [("n0", 1, 0), ("n1", 1, 0), ("n2", 1, 0)]),
        # Ten 4-CPU nodes: ten replicas of 4 (the totals asked for replicas of 8).
        (cpu_nodes(10, 4), {}, [(f"n{i}", 4, 0) for i in range(10)]),
        # --num-workers spreads over the nodes first, and sizes replicas so that they fit.
        (cpu_nodes(3, 1), {"num_workers": 2}, [("n0", 1, 0), ("n1", 1, 0)]),
        (cpu_nodes(2, 8), {"num_workers": 4},
         [("n0", 4, 0), ("n1", 4, 0), ("n0", 4, 0), ("n1", 4, 0)]),
        (cpu_nodes(1, 16), {"num_workers": 3, "cpus_per_worker": 2}, [("n0", 2, 0)] * 3),
        (cpu_nodes(1, 16), {"cpus_per_worker": 4}, [("n0", 4, 0)] * 4),
        # Nodes of different sizes each get their own replica size.
        ([Node("big", "a", 16, 0), Node("small", "b", 4, 0)], {},
         [("big", 8, 0), ("small", 4, 0), ("big", 8, 0)]),
    ],
)
def test_cpu_replicas_fit_each_node(nodes, options, expected):
    assert slots(nodes, **options) == expected


def test_gpu_nodes_get_one_replica_per_gpu_with_their_own_cpus_shared():
    # A CPU-only head beside two GPU nodes: the head's CPUs are not counted per GPU, and the
    # head gets no replica (a run's vectors all come from one precision).
    nodes = [Node("head", "h", 8, 0), Node("g1", "a", 16, 2), Node("g2", "b", 6, 1)]
    assert sorted(slots(nodes)) == [("g1", 8, 1.0), ("g1", 8, 1.0), ("g2", 6, 1.0)]
    assert sorted(slots(nodes, device="cpu")) == sorted(
        [("head", 8, 0), ("g1", 8, 0), ("g1", 8, 0), ("g2", 6, 0)])


def test_more_workers_than_gpus_share_each_gpu():
    nodes = [Node("g1", "a", 32, 4)]
    assert slots(nodes, num_workers=8) == [("g1", 4, 0.5)] * 8


def test_a_worker_larger_than_every_node_fails_at_once_naming_the_nodes():
    with pytest.raises(ConfigError, match=r"no node of the Ray cluster can hold one worker of "
                       r"4 CPU \(nodes: 10.0.0.0 \[n0\] \(2 CPU, 0 GPU\); 10.0.0.1"):
        slots(cpu_nodes(2, 2), cpus_per_worker=4)


def test_cuda_on_a_cluster_without_gpus_fails_before_any_actor_starts():
    with pytest.raises(ConfigError, match="--device cuda: the Ray cluster has no GPU"):
        slots(cpu_nodes(1, 8), device="cuda")
