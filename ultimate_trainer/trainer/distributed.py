"""Several training processes (ranks): the launch through torchrun, and what each rank does differently.

PyTorch distributed does the work (``torch.distributed.run``, the Trainer's DDP through accelerate;
FSDP and DeepSpeed through the Trainer's own options); this module only decides and wires:

- ``relaunch``: ``train.py`` with ``training.num_processes`` above 1 runs itself again under
  torchrun on this machine (c10d rendezvous on 127.0.0.1, a free port) and supervises the agent,
  so the daemon and users keep one command. A stop (SIGTERM, ^C) is forwarded to the workers, not
  to the agent: torchrun answers a signal by killing its workers after 30 s, which may be mid-save.
- exit codes cross torchrun through files: torchrun turns any failing worker into exit 1, but the
  daemon needs 2 (configuration), 3 (data), 4 (model), 5 (the guard stopped the run: every rank
  stops at the same step, trainer/guard.py); each worker writes its code to
  ``UT_EXIT_DIR/rank-<r>.code`` and the launcher returns rank 0's. A rank that left no code was
  killed or died hard, and says so.
- rank 0 alone writes ``status/``, the history, reports and checkpoint markers and evaluates;
  ``World`` says who this process is, ``barrier`` and ``gather`` are the collectives the recipe uses.
- ``accumulation``: a step keeps meaning ``batch_size x gradient_accumulation_steps`` examples when
  the accumulation divides by the world size (each rank accumulates its share); otherwise the step
  grows by the world size, with a warning, and the run plan and marker say so.

Under a torchrun started by the user (several machines: docs/TRAINING.md, "Several GPUs and
machines") ``train.py`` finds ``WORLD_SIZE``/``RANK`` in its environment and runs as a worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from ultimate_trainer.core.config import REPO_DIR, Config
from ultimate_trainer.core.exitcodes import SETUP_ERRORS, Exit
from ultimate_trainer.core.launch import launch
from ultimate_trainer.core.records import CheckpointMarker
from ultimate_trainer.core.status import atomic_write_text

log = logging.getLogger(__name__)

EXIT_DIR_ENV = "UT_EXIT_DIR"
SHARDED = ("fsdp", "deepspeed")  # optimizer states split across ranks: they do not load under another world size


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (torchrun's environment; one process when absent)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_path(self, path: Path) -> Path:
        """``path`` for rank 0, ``path-rank<r>`` for the others: scratch that ranks must not share."""
        return path if self.is_main else path.with_name(f"{path.name}-rank{self.rank}")


def under_launcher() -> bool:
    """Whether torchrun (or accelerate launch) started this process as one of its workers."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def processes_wanted(cfg: Config) -> int:
    """``training.num_processes`` as a number: auto = the visible CUDA GPUs, 1 on the CPU."""
    n = cfg.training.num_processes
    if n != "auto":
        return int(n)
    if cfg.training.device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def setup_problem(cfg: Config) -> str | None:
    """A one-line reason the configured engine cannot run here (exit 2), else None."""
    if cfg.training.distributed == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return "training.distributed is 'deepspeed' but the deepspeed package is not installed " \
                   "(pip install deepspeed, or set training.distributed to ddp or fsdp)"
    return None


def accumulation(gradient_accumulation_steps: int, world_size: int) -> tuple[int, int]:
    """``(accumulation per rank, step scale)``: scale 1 keeps a step at batch_size x accumulation examples."""
    if world_size <= 1:
        return gradient_accumulation_steps, 1
    if gradient_accumulation_steps % world_size == 0:
        return gradient_accumulation_steps // world_size, 1
    return gradient_accumulation_steps, world_size


# --------------------------------------------------------------------------- launching (the outer train.py)

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, script_args: list[str], port: int) -> list[str]:
    """torchrun on this machine alone: ``nproc`` workers, c10d rendezvous on loopback, no restarts."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=ut-{os.getpid()}",
            "--max-restarts=0", str(REPO_DIR / "train.py"), *script_args]


def _workers(agent_pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(agent_pid).children()]
    except psutil.Error:
        return []


def relaunch(nproc: int, script_args: list[str], work_dir: Path) -> int:
    """Run ``train.py script_args`` as ``nproc`` workers under torchrun; the run's exit code."""
    exit_dir = work_dir / f"launch-{os.getpid()}"
    exit_dir.mkdir(parents=True, exist_ok=True)
    for old in exit_dir.glob("rank-*.code"):
        old.unlink()
    port = free_port()
    log.info("%d processes: launching through torchrun (rendezvous 127.0.0.1:%d)", nproc, port)
    cmd = torchrun_command(nproc, script_args, port)
    # Its own session: a terminal ^C reaches this launcher only, which forwards it once as below.
    # SIGTERM to the agent when this launcher dies (core/launch.py).
    agent = launch(cmd, env={**os.environ, EXIT_DIR_ENV: str(exit_dir)})
    stops = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        if stops == 1:  # every worker finishes its step, they agree on the stop, rank 0 saves
            log.warning("%s received: asking the %d ranks to finish the step and save",
                        signal.Signals(signum).name, nproc)
            for pid in _workers(agent.pid):
                _kill(pid, signal.SIGTERM)
        elif signum == signal.SIGINT:  # a second ^C: torchrun tears the workers down
            _kill(agent.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = agent.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return _run_exit(code, exit_dir, nproc)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _run_exit(agent_code: int, exit_dir: Path, nproc: int) -> int:
    """The run's exit code from torchrun's and the ranks' own (``rank-<r>.code``)."""
    codes: dict[int, int] = {}
    for f in exit_dir.glob("rank-*.code"):
        try:
            codes[int(f.stem.split("-")[1])] = int(f.read_text().strip())
        except (ValueError, OSError):
            continue
    missing = sorted(set(range(nproc)) - set(codes))
    if agent_code == 0:
        return codes.get(0, Exit.OK)
    if codes.get(0) in SETUP_ERRORS or codes.get(0) in (Exit.DATA, Exit.DIVERGED):
        return codes[0]
    if missing:
        print(f"error: rank {', '.join(map(str, missing))} of {nproc} ended without an exit code (killed, out of "
              f"memory, or a hard crash); torchrun stopped the others (exit {agent_code})", file=sys.stderr)
    else:
        print(f"error: the distributed run failed (torchrun exit {agent_code}; rank exit codes {codes})",
              file=sys.stderr)
    return Exit.CRASH


def report_exit(code: int, world: World) -> None:
    """A worker's exit code, for the launcher (torchrun itself only says 0 or 1)."""
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if exit_dir and world.size > 1:
        try:
            atomic_write_text(Path(exit_dir) / f"rank-{world.rank}.code", f"{int(code)}\n")
        except OSError:
            pass


# --------------------------------------------------------------------------- in a worker

def init_process_group(cfg: Config, world: World, device: str) -> None:
    """The process group every collective uses, with the collective timeout (a dead rank fails the run).

    Set up here, before the Trainer, so that rank 0 can prepare things the others wait for; the
    Trainer (accelerate) finds the group initialised and uses it.
    """
    import torch
    import torch.distributed as dist

    if world.size <= 1 or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=timedelta(seconds=cfg.training.collective_timeout_seconds))
    log.info("rank %d of %d (local %d) joined the process group", world.rank, world.size, world.local_rank)


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one process: ``[obj]``)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


COLLECTIVE_FAILURES = ("timeout", "timed out", "pair closure", "connection closed", "connection reset",
                       "broken pipe", "nccl")


def collective_failure(reason: str, cfg: Config, world: World) -> str | None:
    """The one-line reason for a failed collective (a dead or hung rank), else None."""
    if world.size <= 1 or not any(k in reason.lower() for k in COLLECTIVE_FAILURES):
        return None
    return (f"rank {world.rank}: another rank stopped answering, so the run of {world.size} processes fails "
            f"(training.collective_timeout_seconds = {cfg.training.collective_timeout_seconds}): {reason}")


def rank_report(world: World) -> dict[str, Any]:
    """This rank's figures for ``training_status.json``'s ``ranks``."""
    import psutil
    import torch

    report: dict[str, Any] = {"rank": world.rank, "local_rank": world.local_rank, "host": socket.gethostname(),
                              "pid": os.getpid(), "rss_bytes": int(psutil.Process().memory_info().rss),
                              "device": "cpu", "device_memory_allocated_bytes": None,
                              "device_memory_reserved_bytes": None, "device_memory_peak_bytes": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        i = torch.cuda.current_device()
        report.update(device=f"cuda:{i}", device_memory_allocated_bytes=int(torch.cuda.memory_allocated(i)),
                      device_memory_reserved_bytes=int(torch.cuda.memory_reserved(i)),
                      device_memory_peak_bytes=int(torch.cuda.max_memory_allocated(i)))
    return report


def optimizer_state_problem(marker: CheckpointMarker, world_size: int, engine: str) -> str | None:
    """Why a checkpoint's optimizer state cannot be loaded under this world size and engine, else None.

    DDP keeps a whole optimizer state on every rank, so it loads under any world size; FSDP and
    DeepSpeed shard it per rank.
    """
    saved_size = marker.world_size or 1
    saved_engine = marker.distributed or "ddp"
    saved_sharded = saved_size > 1 and saved_engine in SHARDED
    now_sharded = world_size > 1 and engine in SHARDED
    if not (saved_sharded or now_sharded) or (saved_size, saved_engine) == (world_size, engine):
        return None
    return (f"the optimizer state of {saved_size} x {saved_engine if saved_size > 1 else 'one process'} cannot be "
            f"re-sharded for {world_size} x {engine if world_size > 1 else 'one process'}: continuing the global "
            f"step with a fresh optimizer (warm-up again)")


def engine_arguments(cfg: Config, world: World, model: Any) -> dict[str, Any]:
    """Extra ``TrainingArguments`` for the configured engine (none for DDP or one process)."""
    if world.size <= 1 or cfg.training.distributed == "ddp":
        return {}
    if cfg.training.distributed == "fsdp":
        layers = sorted(set(getattr(getattr(model, "base_model", model), "_no_split_modules", None) or []))
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"use_orig_params": True, "sync_module_states": True, "cpu_ram_efficient_loading": True,
                                "state_dict_type": "FULL_STATE_DICT", "offload_params": False,
                                **({"transformer_layer_cls_to_wrap": layers} if layers else {})}}
    return {"deepspeed": {"zero_optimization": {"stage": cfg.training.deepspeed_stage},
                          "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}}
