"""The Ray actor pool of a run: follows the cluster as nodes come and go, and finishes despite
lost workers.

    start      one `ShardEmbedder` actor per slot of the layout (`layout.py`), each pinned to
               its node; shards go only to actors that are up, two queued per actor
    lost       an actor or node that dies (or a shard that raises in an actor) gives the
               actor's shards back to the queue; the surviving actors embed them in the same
               run, and a replacement starts where there is room
    joined     a node that joins gets actors by the same sizing rules, up to --num-workers,
               unless the run is nearly done
    poison     a shard that failed on POISON_WORKERS different actors ends the run, named

Not `ray.util.ActorPool`: it keeps one task per actor, so every actor idles while the driver
hands it the next shard, and a dead actor makes `get_next` raise with no way to give its shard
to another actor.
"""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipeline.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.layout import (
    Node,
    Slot,
    cluster_nodes,
    plan_layout,
    spread,
    worker_slots,
)
from pipeline.extract.plan import (
    PLAN_FOLDER,
    Plan,
    open_inputs,
    remove_temporary_parts,
    run_record_name,
)
from pipeline.extract.worker import ShardEmbedder, ShardStats
from pipeline.fs import resolve

# A shard that failed on this many different actors is the cause, not its actors.
POISON_WORKERS = 3
# How often the driver looks at the cluster's nodes (Ray's own node-death detection takes
# longer than this).
POLL_S = 2.0
# With no worker up for this long (all nodes lost, none with room) the run gives up.
NO_WORKER_TIMEOUT_S = 600.0


class PoisonShardError(PipelineError):
    """A shard failed on several different workers: something in it breaks the worker."""


@dataclass
class _Worker:
    slot: Slot
    handle: object  # ray.actor.ActorHandle
    ready_ref: object | None  # ray.ObjectRef until the actor is up
    name: str
    # Shards sent to this actor, in the order it runs them (a Ray actor runs its calls in turn).
    running: deque = field(default_factory=deque)


@dataclass
class _Attempt:
    worker: str
    node: str
    error: str


class ActorPool:
    """Runs `shards` of `plan` on the Ray cluster this process is connected to.

    Args:
        on_shard_done: called with (shard stats, run stats so far) as each part lands.
        log: called with one line each time the pool grows or shrinks (the lines are also in
            the run's record).
    """

    def __init__(
        self,
        config: ExtractConfig,
        plan: Plan,
        shards: list[int],
        on_shard_done: Callable[[ShardStats, ShardStats], None],
        log: Callable[[str], None],
    ):
        import ray

        self._ray = ray
        self.config = config
        self.plan = plan
        self.on_shard_done = on_shard_done
        self.log = log
        self.todo = deque(shards)
        self.retry: deque[int] = deque()  # shards given back by failed workers; first out
        self.workers: dict[tuple[str, int], _Worker] = {}
        self.in_flight: dict = {}  # task ref -> (worker key, shard)
        self.starting: dict = {}  # ready ref -> worker key
        self.nodes: dict[str, Node] = {}
        self.attempts: dict[int, list[_Attempt]] = {}
        self.record: dict = {"shards": {}, "events": [], "nodes": {}}
        self.total = ShardStats()
        self.lost_workers = 0
        self.given_back = 0
        self.last_worker_up = time.monotonic()
        self.actor_class = ray.remote(ShardEmbedder)
        self.layout = None

    def run(self) -> ShardStats:
        """Embed every shard; returns what the run did.

        Raises:
            PoisonShardError: a shard failed on POISON_WORKERS different workers.
            PipelineError: a worker could not start (its error), or no worker was up for
                NO_WORKER_TIMEOUT_S.
            ConfigError: no node of the cluster can hold one worker.
        """
        started = _now()
        outcome = "complete"
        try:
            nodes = cluster_nodes()
            self.layout = plan_layout(self.config, nodes)
            slots = worker_slots(self.config, nodes, self.layout)  # fails when nothing fits
            self.log(f"fc7 extract: {min(len(slots), self._unsent()):,} workers on "
                     f"{len({slot.node_id for slot in slots}):,} of {len(nodes)} nodes "
                     f"({_shape(slots[0])} each)")
            self._follow_cluster(nodes)
            polled = time.monotonic()
            while self.todo or self.retry or self.in_flight:
                refs = list(self.in_flight) + list(self.starting)
                ready = self._ray.wait(refs, num_returns=1, timeout=POLL_S)[0] if refs else []
                if not refs:
                    time.sleep(POLL_S)
                for ref in ready:
                    if ref in self.starting:
                        self._worker_started(ref)
                    elif ref in self.in_flight:
                        self._shard_finished(ref)
                if time.monotonic() - polled >= POLL_S:
                    self._follow_cluster(cluster_nodes())
                    polled = time.monotonic()
            if self.lost_workers:
                self.log(f"fc7 extract: {self.lost_workers} workers lost on the way; "
                         f"{self.given_back} shards given back and redone by others")
            return self.total
        except BaseException as err:
            outcome = f"failed: {type(err).__name__}: {err}"
            raise
        finally:
            for worker in list(self.workers.values()):
                self._ray.kill(worker.handle)
            # A worker killed while writing leaves its hidden temporary part behind.
            remove_temporary_parts(self.plan)
            self._write_record(started, outcome)

    # --- the cluster ---------------------------------------------------------------------

    def _follow_cluster(self, nodes: list[Node]) -> None:
        """Note nodes that joined or left, and start workers where the layout has room."""
        alive = {node.id: node for node in nodes}
        for node_id, node in self.nodes.items():
            if node_id not in alive:
                self._event(f"node {node} left")
                for worker in [w for w in self.workers.values() if w.slot.node_id == node_id]:
                    self._lose(worker, f"its node {node.address} [{node_id[:8]}] left")
        for node_id, node in alive.items():
            if node_id not in self.nodes:
                if self.nodes:  # the first call: the nodes the run starts with
                    self._event(f"node {node} joined")
                self.record["nodes"][node_id] = {"address": node.address, "cpus": node.cpus,
                                                 "gpus": node.gpus, "labels": node.labels}
        self.nodes = alive
        self._start_workers(nodes)
        if not self.workers or all(w.ready_ref is not None for w in self.workers.values()):
            if time.monotonic() - self.last_worker_up > NO_WORKER_TIMEOUT_S:
                raise PipelineError(
                    f"no worker has been up for {NO_WORKER_TIMEOUT_S:.0f} s (nodes: "
                    f"{'; '.join(map(str, nodes)) or 'none'}); what is done stays done: run "
                    "the same command again once the cluster has room"
                )
        else:
            self.last_worker_up = time.monotonic()

    def _start_workers(self, nodes: list[Node]) -> None:
        ready = sum(w.ready_ref is None for w in self.workers.values())
        # Nearly done: the shards left are no more than the running workers would take
        # anyway, so a new worker (seconds to load its model) would only add its start.
        if self.workers and self._unsent() <= 2 * ready:
            return
        free = [
            slot
            for slot in spread([self.layout.node_slots(node) for node in nodes])
            if slot.key not in self.workers
        ]
        room = self.config.num_workers - len(self.workers) if self.config.num_workers else None
        wanted = max(0, min(len(free), self._unsent() - len(self.workers)))
        for slot in free[: wanted if room is None else min(wanted, room)]:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Pinned to its node (soft=False): a worker of a lost node is not restarted by Ray on a
        # node whose room belongs to another slot; the pool starts a replacement itself.
        handle = self.actor_class.options(
            num_cpus=slot.cpus,
            num_gpus=slot.gpus,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
        ).remote(self.config, self.plan, slot.cpus)
        worker = _Worker(slot, handle, handle.__ray_ready__.remote(),
                         f"{slot.node_id[:8]}/{slot.index}.{uuid.uuid4().hex[:6]}")
        self.workers[slot.key] = worker
        self.starting[worker.ready_ref] = slot.key

    def _worker_started(self, ref) -> None:
        key = self.starting.pop(ref)
        worker = self.workers.get(key)
        if worker is None:  # lost while starting
            return
        try:
            self._ray.get(ref)
        except self._ray.exceptions.RayActorError as err:
            if err.actor_init_failed:
                # The model could not load (weights, memory): every worker would fail alike.
                raise PipelineError(
                    f"a worker could not start on node {self._where(worker)}: "
                    f"{_reason(err)}"
                ) from err
            self._lose(worker, _reason(err))
            return
        worker.ready_ref = None
        self._event(f"+1 worker on node {self._where(worker)} ({_shape(worker.slot)}); "
                    + self._up())
        for _ in range(2):  # two queued, so that it never waits for the driver between shards
            self._submit(worker)

    # --- shards --------------------------------------------------------------------------

    def _submit(self, worker: _Worker) -> None:
        shard = self._next_shard()
        if shard is not None:
            ref = worker.handle.__call__.remote(shard)
            self.in_flight[ref] = (worker.slot.key, shard)
            worker.running.append(ref)

    def _next_shard(self) -> int | None:
        # A shard given back goes first (a worker it failed on is gone: see _lose).
        if self.retry:
            return self.retry.popleft()
        return self.todo.popleft() if self.todo else None

    def _shard_finished(self, ref) -> None:
        key, shard = self.in_flight[ref]
        worker = self.workers[key]
        try:
            stats = self._ray.get(ref)
        except self._ray.exceptions.RayError as err:
            # The worker died, or the shard raised in it: either way a new worker takes the
            # worker's place, and other workers take this shard and those queued behind it.
            self._lose(worker, _reason(err))
            return
        del self.in_flight[ref]
        worker.running.remove(ref)
        self.record["shards"][shard] = {"node": worker.slot.node_id, "worker": worker.name,
                                        "attempts": len(self.attempts.get(shard, ())) + 1}
        self.total.merge(stats)
        self.on_shard_done(stats, self.total)
        self._submit(worker)

    def _lose(self, worker: _Worker, why: str) -> None:
        """Stop and forget a failed worker; its shards go back to the queue."""
        self.workers.pop(worker.slot.key, None)
        self.starting.pop(worker.ready_ref, None)
        shards = [self.in_flight.pop(ref)[1] for ref in worker.running if ref in self.in_flight]
        self._ray.kill(worker.handle)  # when it lives on, or only stopped answering
        self.lost_workers += 1
        self._event(
            f"-1 worker on node {self._where(worker)} ({why}); "
            + (f"shard{'s' * (len(shards) > 1)} {', '.join(map(str, shards))} back in the "
               "queue; " if shards else "")
            + self._up()
        )
        if shards:
            # The first shard was the one running when the worker died; those queued behind
            # it are not suspects.
            self._failed(shards[0], worker, why)
        self.retry.extend(shards)
        self.given_back += len(shards)

    def _failed(self, shard: int, worker: _Worker, why: str) -> None:
        attempts = self.attempts.setdefault(shard, [])
        attempts.append(_Attempt(worker.name, worker.slot.node_id, why))
        if len({a.worker for a in attempts}) >= POISON_WORKERS:
            inputs = self._first_inputs(shard)
            raise PoisonShardError(
                f"shard {shard} failed on {POISON_WORKERS} different workers, so the cause is "
                f"in its images (first inputs: {', '.join(inputs)}); last error: {why}. The "
                "other shards' parts are kept: remove or fix the image, or run the same "
                "command again to retry"
            )

    # --- what the run prints and records -------------------------------------------------

    def _first_inputs(self, shard: int, count: int = 3) -> list[str]:
        with open_inputs(self.plan) as inputs:
            paths = inputs.read_row_group(shard, columns=["path"])
        return paths.column("path").to_pylist()[:count]

    def _where(self, worker: _Worker) -> str:
        node = self.nodes.get(worker.slot.node_id)
        return f"{node.address} [{worker.slot.node_id[:8]}]" if node else worker.slot.node_id[:8]

    def _up(self) -> str:
        return f"workers up: {sum(w.ready_ref is None for w in self.workers.values())}"

    def _unsent(self) -> int:
        return len(self.todo) + len(self.retry)

    def _event(self, message: str) -> None:
        self.record["events"].append({"at": _now(), "event": message})
        self.log(f"fc7 extract: {message}")

    def _write_record(self, started: str, outcome: str) -> None:
        """`_plan/run-<start>.json`: which node and worker embedded each shard, the pool's
        events, and how the run ended."""
        fs, out = resolve(self.plan.out)
        record = {"runner": "ray", "started": started, "finished": _now(), "outcome": outcome,
                  "lost_workers": self.lost_workers, **self.record}
        name = run_record_name(started)
        with fs.open_output_stream(f"{out}/{PLAN_FOLDER}/{name}") as stream:
            stream.write(json.dumps(record, indent=1).encode())


def _shape(slot: Slot) -> str:
    return f"{slot.cpus} CPU" + (f", {slot.gpus:g} GPU" if slot.gpus else "")


def _reason(err: BaseException) -> str:
    """Ray's error in one short line: for a dead actor, its cause without Ray's list of common
    causes; for an exception raised in the shard, its last line (not the traceback)."""
    import ray

    if isinstance(err, ray.exceptions.RayActorError):
        text = " ".join(str(err).split()).split(" Some common causes")[0]
    else:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {textwrap.shorten(text, 300)}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
