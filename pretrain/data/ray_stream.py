"""Ray reader actors feeding one training rank, and the Ray instance the ranks share.

Each rank owns ``data.readers_per_rank`` actors (declared with ``num_cpus=0`` so that on a
small machine they never wait for CPUs held by training workers). Batch i goes to actor
i mod A; the rank keeps ``data.prefetch_batches`` batches in flight and consumes them in
order, so the stream is identical to the in-process one. A reader that dies is replaced
and its batch resubmitted: batches are pure functions of their cursor, so nothing is lost
or duplicated. Every wait has a hard timeout. On a cluster, ``data.reader_resource`` pins the
readers to the nodes that advertise that custom resource (CPU-only reader nodes).

Batch composition (property sampling, length grouping, hard negatives) is decided by the rank's
:class:`~pretrain.data.stream.EpochPlan` before a batch is submitted: readers only receive sample
refs, so both loaders deliver the same batches.
"""

from __future__ import annotations

import logging
import os

import ray
import torch.distributed as dist

from pretrain.config import Config, config_from_dict
from pretrain.data.stream import BatchSource, BatchStream, Cursor, EpochPlan

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ShardReaderActor:
    """Decodes, featurises and collates batches for one rank."""

    def __init__(self, cfg_dict: dict, views: dict[str, bool]):
        # Torch inside an actor would otherwise start one thread per core for every actor.
        import torch

        torch.set_num_threads(1)
        self.source = BatchSource(config_from_dict(cfg_dict), views, train=True)
        # One line per actor (streamed to the job's driver): where the readers run on a cluster.
        print(f"align-pro: reader actor on Ray node {ray.get_runtime_context().get_node_id()}", flush=True)

    def build(self, refs, rng_key):
        return self.source.build(refs, rng_key)

    def pid(self) -> int:
        return os.getpid()


class _ReaderPool:
    def __init__(self, cfg: Config, views: dict[str, bool]):
        self.cfg_dict, self.views = cfg.to_dict(), views
        self.timeout = cfg.data.ray_timeout_s
        self.actors = [self._spawn() for _ in range(cfg.data.readers_per_rank)]
        self.restarts = 0

    def _spawn(self):
        # With data.reader_resource set, readers land only on nodes advertising that resource
        # (the CPU reader nodes of a cluster); the autoscaler adds such nodes when they run out.
        name = self.cfg_dict["data"]["reader_resource"]
        actor = ShardReaderActor.options(resources={name: 1}) if name else ShardReaderActor
        return actor.remote(self.cfg_dict, self.views)

    def submit(self, slot: int, refs, rng_key):
        i = slot % len(self.actors)
        actor = self.actors[i]
        ref = actor.build.remote(refs, rng_key)

        def wait():
            nonlocal ref, actor
            for attempt in range(3):
                try:
                    return ray.get(ref, timeout=self.timeout)
                except ray.exceptions.GetTimeoutError:
                    raise RuntimeError(
                        f"reader actor gave no batch within data.ray_timeout_s={self.timeout}s"
                    ) from None
                except ray.exceptions.RayActorError as e:
                    if self.actors[i] is actor:  # first to notice: replace it (other batches it held reuse the new one)
                        log.warning("reader actor %d died (%s); replacing it (attempt %d)", i, e, attempt + 1)
                        self.actors[i] = self._spawn()
                        self.restarts += 1
                    actor = self.actors[i]
                    ref = actor.build.remote(refs, rng_key)
            raise RuntimeError("reader actors keep dying; giving up after 3 replacements")

        return wait

    def close(self):
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class RayBatchStream(BatchStream):
    """A :class:`BatchStream` whose batches are built by this rank's Ray reader actors."""

    def __init__(self, cfg: Config, plan: EpochPlan, cursor: Cursor, views: dict[str, bool]):
        self.pool = _ReaderPool(cfg, views)
        super().__init__(plan, cursor, self.pool.submit, prefetch=cfg.data.prefetch_batches)

    def close(self):
        self.pool.close()


def connect_ray() -> str:
    """Start or join the Ray instance shared by this job's ranks.

    Returns ``"external"`` when Ray was already initialised (a Ray Train worker: leave it alone),
    ``"started"`` on the rank that started it, ``"joined"`` on the ranks that joined it.

    ``RAY_ADDRESS`` set: every rank joins that cluster. Otherwise rank 0 starts a new local Ray (more
    logical CPUs than cores, small object store; never a cluster that ``ray start`` left on the node,
    which a bare ``ray.init()`` would join) and broadcasts its GCS address; the other ranks
    join that exact address. Ray >= 2.59 enables token authentication for local clusters and a
    process joining by address must be in token mode (``RAY_AUTH_MODE=token`` before Ray is
    imported, as ``launch/pretrain.py`` sets it; token read from ``~/.ray/auth_token``) or it is
    refused with InvalidAuthToken.
    (``address="auto"`` would also work but can pick another Ray instance on a shared node.)
    """
    if ray.is_initialized():
        return "external"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return "joined"
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    info: list[dict] = [{}]
    if rank == 0:
        ctx = ray.init(
            address="local",  # a new instance: without it ray.init joins a `ray start` cluster it finds on the node
            num_cpus=max(4, (os.cpu_count() or 1) * 2),
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
        )
        info = [{"address": ctx.address_info["gcs_address"]}]
    if distributed:
        dist.broadcast_object_list(info, src=0)
    if rank != 0:
        ray.init(address=info[0]["address"], log_to_driver=False)
    return "started" if rank == 0 else "joined"
