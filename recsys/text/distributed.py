"""Fine-tuning the text tower on several processes (Lightning DDP); the rest of the job runs once.

``trainer=ddp trainer.devices=N`` trains on N processes: gloo on CPUs, NCCL (beside gloo) on GPUs.
Only ``fine_tune`` is distributed. Rank 0 is always the process that runs the job: it loads the
data, holds the MLflow run, fits CF (after fine-tuning), and when it reaches fine-tuning it sends the other ranks
what ``fine_tune`` needs (the network, the data module, the module's and the trainer's settings)
over the process group, then trains with them; after ``fit`` the other ranks exit and rank 0
carries on alone. Lightning's own DDP launcher re-executes the whole command on every rank, which
would load the data, fit CF, open an MLflow run and register a model N times.

* One machine (no launcher): rank 0 starts the other ranks itself when it reaches fine-tuning, as
  fresh ``spawn`` processes (a ``fork`` of a process that has used OpenMP hangs in the child's
  first parallel region).
* Several machines: a launcher (``torchrun``) starts the command once per device on every node and
  sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``... Ranks above 0 go straight to ``serve_worker``:
  they load nothing and wait for rank 0's fine-tuning job.

Inside ``fit`` every rank draws its own training examples (``datamodule.EpochSampler``), encodes
its share of the catalogue (``encode_sharded``, gathered to all), and scores its share of the
validation users; the metric's sums and counts are summed over the ranks (``sum_over_ranks``), so
every rank sees the same validation NDCG and early stopping stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from recsys.errors import ConfigError, require_whole
from recsys.threads import usable_cores

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "single_device")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
# How long a rank waits for the others in a collective (the rendezvous included). Under a
# launcher, ranks above 0 wait at the rendezvous while rank 0 loads the data and fits CF.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Ranks:
    """The process layout of fine-tuning: ``world_size`` processes, this one is ``rank``.

    ``launched``: a launcher (``torchrun``) started every process and every process runs the
    command; otherwise this process starts the other ranks itself at fine-tuning time.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    launched: bool = False
    backend: str = "gloo"

    @property
    def is_worker(self) -> bool:
        """A rank above 0 under a launcher: it runs only fine-tuning."""
        return self.launched and self.rank > 0


def check_trainer(trainer: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Ranks:
    """The fine-tuning process layout of ``trainer`` (the Trainer's config), or a ``ConfigError``
    for settings that cannot work, before any data is loaded."""
    env = os.environ if env is None else env
    strategy = trainer.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not supported: use trainer=ddp (strategy 'ddp') for several "
            f"processes, or one of {list(STRATEGIES)}"
        )
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    for name, v in (("devices", devices), ("num_nodes", nodes)):
        require_whole(f"trainer.{name}", v)
    # The text tower's length in validations (the presets fix it): Lightning asserts on anything
    # else only once training starts, after the data and CF.
    epochs = trainer.get("max_epochs")
    if epochs is not None and epochs != -1:
        try:
            require_whole("trainer.max_epochs", epochs)
        except ConfigError:
            raise ConfigError(
                f"trainer.max_epochs must be a whole number >= 1, -1 (unbounded) or null, got {epochs!r}"
            ) from None
    accelerator = trainer.get("accelerator", "auto")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ConfigError(f"trainer.accelerator must be one of cpu, gpu, cuda, auto; got {accelerator!r}")
    if gpu:
        have = torch.cuda.device_count()  # counts without initialising CUDA
        if devices > have:
            raise ConfigError(
                f"trainer.devices={devices} GPU processes but this machine has {have} CUDA device(s): "
                f"set trainer.devices<={have}" + (" or trainer.accelerator=cpu" if not have else "")
            )
    else:
        have = usable_cores()
        if devices > have:
            raise ConfigError(
                f"trainer.devices={devices} CPU processes but this process may use {have} CPU core(s): "
                f"set trainer.devices<={have}"
            )
    world = devices * nodes
    if world > 1 and strategy != "ddp":
        raise ConfigError(f"trainer.devices={devices}, trainer.num_nodes={nodes} need trainer=ddp (strategy 'ddp')")
    backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
    if "WORLD_SIZE" in env and "RANK" in env:
        launched_world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        if launched_world != world:
            raise ConfigError(
                f"the launcher started {launched_world} processes (WORLD_SIZE) but trainer.devices x "
                f"trainer.num_nodes = {devices} x {nodes} = {world}: make them equal (torchrun --nproc_per_node"
                f"={devices} --nnodes={nodes})"
            )
        return Ranks(world, rank, int(env.get("LOCAL_RANK", rank % devices)), launched=True, backend=backend)
    if nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={nodes} needs a launcher that starts the command once per device on every node "
            f"(torchrun --nnodes={nodes} --nproc_per_node={devices} ...; README 'On a cluster')"
        )
    return Ranks(world, 0, 0, launched=False, backend=backend)


@dataclass
class TrainerSpec:
    """What every rank builds its ``lightning.Trainer`` from: the resolved Trainer config (a
    ``_target_`` mapping), its callbacks (fresh: each rank gets its own copy) and ``max_time``."""

    config: dict[str, Any]
    callbacks: list[Any]
    max_time: timedelta | None = None

    def build(self, logger: Any) -> Any:
        from hydra.utils import instantiate

        from recsys.quiet import quiet_lightning

        quiet_lightning()
        return instantiate(self.config, callbacks=self.callbacks, logger=logger, max_time=self.max_time)


@dataclass
class FineTuneJob:
    """``fine_tune``'s arguments, as rank 0 sends them to the other ranks."""

    net: Any
    datamodule: Any
    module_factory: Callable[..., Any]
    trainer: TrainerSpec
    resume_dir: Path | None

    def run(self, logger: Any = False) -> tuple[Any, dict[str, float], list[tuple[int, float, float]]]:
        from recsys.text.fit import fine_tune

        return fine_tune(self.net, self.datamodule, self.module_factory, self.trainer.build(logger), self.resume_dir)


def fine_tune_ranks(job: FineTuneJob, logger: Any) -> tuple[Any, dict[str, float], list[tuple[int, float, float]]]:
    """``fine_tune`` on the layout of ``job.trainer`` (``check_trainer``); called by rank 0, which
    returns the result. One process: the plain ``fine_tune``."""
    ranks = check_trainer(job.trainer.config)
    if ranks.world_size == 1:
        return job.run(logger)
    log.info("fine-tuning on %d processes (%s)", ranks.world_size, ranks.backend)
    threads = torch.get_num_threads()  # Lightning lowers it per process; the job continues after fit
    try:
        with process_group(ranks):
            broadcast_job(job)
            return job.run(logger)
    finally:
        torch.set_num_threads(threads)


def serve_worker(trainer: Mapping[str, Any]) -> None:
    """A rank above 0 under a launcher: join the group, take rank 0's fine-tuning job, run it."""
    ranks = check_trainer(trainer)
    with process_group(ranks):
        job = broadcast_job(None)
        log.info("rank %d/%d: fine-tuning", ranks.rank, ranks.world_size)
        job.run()


@contextlib.contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """The default process group of ``ranks`` while the block runs. Without a launcher, rank 0
    first starts ranks 1..N-1 (``spawn``) with the environment a launcher would give them."""
    saved = {k: os.environ.get(k) for k in ENV}
    procs: list[Any] = []
    stop = threading.Event()
    ok = False
    try:
        if not ranks.launched:
            port = _free_port()
            os.environ.update(
                {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks.world_size)}
            )
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"})
            procs = _start_ranks(ranks, port)
            threading.Thread(target=_watch, args=(procs, stop), daemon=True).start()
        # Lightning's DDP takes this group as it is (a launched environment: LOCAL_RANK is set).
        torch.distributed.init_process_group(
            ranks.backend, init_method="env://", rank=ranks.rank, world_size=ranks.world_size, timeout=TIMEOUT
        )
        yield
        ok = True
    finally:
        stop.set()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        failed = []
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
            if p.exitcode != 0:
                failed.append(f"{p.name} exited with code {p.exitcode}")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if failed:
            message = "a fine-tuning process failed (its traceback is above): " + "; ".join(failed)
            if ok:
                raise RuntimeError(message)
            log.error(message)  # beside the error in flight


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_ranks(ranks: Ranks, port: int) -> list[Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for r in range(1, ranks.world_size):
        p = ctx.Process(target=_spawned_rank, args=(r, ranks, port), name=f"recsys-finetune-rank-{r}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _spawned_rank(rank: int, ranks: Ranks, port: int) -> None:
    """Rank ``rank`` started by rank 0 on the same machine."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks.world_size)})
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
    logging.basicConfig(level=logging.WARNING)
    mine = Ranks(ranks.world_size, rank, rank, launched=True, backend=ranks.backend)
    with process_group(mine):
        broadcast_job(None).run()


def _watch(procs: list[Any], stop: threading.Event) -> None:
    """Stop the job when a rank it started dies: a collective waiting for a dead NCCL rank, or
    the rendezvous waiting for one that never came, would otherwise wait for ``TIMEOUT``. Gloo
    notices a dead peer at once; the grace period leaves that path its clear error."""
    while not stop.wait(1.0):
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead and not stop.wait(30.0):
            log.error("%s exited with code %s: stopping the job", dead[0].name, dead[0].exitcode)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def broadcast_job(job: FineTuneJob | None) -> FineTuneJob:
    """Rank 0's ``job`` on every rank (pickled over gloo, on the CPU)."""
    box = [job]
    torch.distributed.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


# -- what the module and the data module call inside fit ------------------------------------------
def world() -> tuple[int, int]:
    """``(rank, world size)`` of the running fine-tuning; ``(0, 1)`` outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (``t`` itself in one process)."""
    if world()[1] > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def encode_sharded(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``encode(ids, lengths)`` of the whole catalogue, each rank encoding every N-th item by
    length (equal work per rank), the parts gathered to every rank. On the CPU, in input order."""
    rank, size = world()
    if size == 1:
        return encode(ids, lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    mine = order[rank::size]
    part = encode(ids[mine], lengths[mine]).float()
    width = -(-len(ids) // size)
    padded = torch.zeros(width, part.shape[1], device=device)
    padded[: len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty(len(ids), part.shape[1])
    for r, p in enumerate(parts):
        rows = order[r::size]
        out[rows] = p[: len(rows)].cpu()
    return out
