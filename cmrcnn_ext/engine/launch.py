"""Start single- or multi-process training: torchrun, Detectron2's launcher, or CPU workers.

:func:`launch` has the signature of ``detectron2.engine.launch`` and picks one of four ways:

1. **Started by torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR`` and ``MASTER_PORT``): this process is already one worker. It joins the
   process group (``env://`` rendezvous; NCCL with CUDA, gloo without), sets its CUDA device,
   creates Detectron2's per-machine process group and calls ``main_func``. ``--num-gpus``,
   ``--num-machines``, ``--machine-rank`` and ``--dist-url`` are then ignored: torchrun's
   ``--nproc_per_node``, ``--nnodes``, ``--node_rank`` and ``--master_addr/--master_port``
   decide.
2. **CUDA available**: delegates to ``detectron2.engine.launch`` (NCCL, one process per GPU).
3. **No CUDA, more than one process**: spawns ``num_gpus_per_machine`` CPU worker processes
   (``--num-gpus N`` means N CPU processes here) that join a gloo process group.
4. **One process**: calls ``main_func`` directly.

Detectron2 v0.6's own ``launch`` asserts CUDA and always uses NCCL, so it cannot start CPU
workers; and neither v0.6 nor the main branch starts workers under torchrun.

Pre-emption (:mod:`cmrcnn_ext.engine.preemption`): where workers are spawned (2 and 3), a stop
signal (SIGTERM, SIGUSR1, SIGUSR2) that reaches only this launching process is passed on to the
workers, and workers that stopped on one exit with code 75, which this process turns into
:class:`~cmrcnn_ext.engine.preemption.Preempted` (``train_net.py`` then exits with 75 too).
"""

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from cmrcnn_ext import compat
from cmrcnn_ext.engine.preemption import EXIT_PREEMPTED, Preempted

__all__ = [
    "DEFAULT_TIMEOUT",
    "LostProcessError",
    "TORCHRUN_ENV_VARS",
    "launch",
    "launch_with_args",
    "started_by_torchrun",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)

#: Environment variables torchrun (torch.distributed.run) sets for every worker.
TORCHRUN_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def started_by_torchrun():
    """Whether this process is a worker started by torchrun (all of TORCHRUN_ENV_VARS set)."""
    return all(os.environ.get(k) for k in TORCHRUN_ENV_VARS)


def default_backend():
    """``"nccl"`` where CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    backend=None,
):
    """Run ``main_func(*args)`` in one or more processes (see the module docstring).

    Args:
        main_func: called as ``main_func(*args)`` in every worker. With more than one process
            started here it must be picklable (a module-level function).
        num_gpus_per_machine (int): processes per machine: GPUs, or CPU processes without CUDA.
        num_machines (int): number of machines.
        machine_rank (int): rank of this machine.
        dist_url (str or None): rendezvous URL, e.g. ``tcp://10.0.0.1:29500``; ``None`` or
            ``"auto"`` picks a free local port (single machine only).
        args (tuple): arguments of ``main_func``.
        timeout (timedelta): timeout of collective operations.
        backend (str or None): process-group backend; default NCCL with CUDA, else gloo.

    Returns:
        What ``main_func`` returns where it runs in this process (one process or torchrun);
        ``None`` where workers were spawned.
    """
    if started_by_torchrun():
        return _torchrun_worker(
            main_func, args, num_gpus_per_machine, num_machines, timeout, backend
        )

    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:  # what Detectron2's launch does for one process, too
        return main_func(*args)
    with _stop_signals_to_workers():
        try:
            return _launch_workers(
                main_func,
                world_size,
                num_gpus_per_machine,
                num_machines,
                machine_rank,
                dist_url,
                args,
                timeout,
                backend,
            )
        except mp.ProcessExitedException as e:
            if e.exit_code == EXIT_PREEMPTED:
                raise Preempted() from None
            rank = machine_rank * num_gpus_per_machine + e.error_index
            raise LostProcessError(
                f"training process of rank {rank} (pid {e.error_pid}) died: "
                f"{e.signal_name or f'exit code {e.exit_code}'}; the other processes of this "
                "machine were stopped. Continue with the same command plus --resume (from the "
                "checkpoint last_checkpoint names)."
            ) from None


def _launch_workers(
    main_func,
    world_size,
    num_gpus_per_machine,
    num_machines,
    machine_rank,
    dist_url,
    args,
    timeout,
    backend,
):
    """Ways 2 and 3 of :func:`launch` (Detectron2's launcher with CUDA, gloo CPU workers), for
    ``world_size`` > 1 processes."""
    if torch.cuda.is_available() and backend in (None, "nccl"):
        from detectron2.engine import launch as d2_launch

        if dist_url is None:
            dist_url = "auto"
        return d2_launch(
            _ExitOnPreempted(main_func),
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )

    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError(
                "Multi-machine training needs --dist-url tcp://<address of machine 0>:<port> "
                "(the same on every machine); 'auto' only works on one machine."
            )
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    backend = backend or "gloo"
    logger.info(
        "Starting %d %s worker processes on this machine (machine %d of %d, world size %d, "
        "rendezvous %s).",
        num_gpus_per_machine,
        backend,
        machine_rank,
        num_machines,
        world_size,
        dist_url,
    )
    mp.spawn(
        _spawned_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            backend,
        ),
        daemon=False,
    )
    return None


class LostProcessError(RuntimeError):
    """A training process died (killed, out of memory, crashed in native code) and the launcher
    stopped the others; ``train_net.py`` prints the message and exits with code 1."""


class _ExitOnPreempted:
    """``main_func`` for a spawned worker: a pre-empted run exits with :data:`EXIT_PREEMPTED`
    (after leaving the process group), which the launching process recognises."""

    def __init__(self, main_func):
        self.main_func = main_func

    def __call__(self, *args):
        try:
            return self.main_func(*args)
        except Preempted:
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.exit(EXIT_PREEMPTED)


@contextlib.contextmanager
def _stop_signals_to_workers(signals=("SIGTERM", "SIGUSR1", "SIGUSR2")):
    """While workers run, pass stop signals received by this process on to them (a scheduler
    may signal only the process it started); each worker's own handling then applies."""

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except OSError:  # already gone
                pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in signals:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_with_args(main_func, args):
    """:func:`launch` ``main_func(args)`` with the process options of a command line parsed by
    Detectron2's ``default_argument_parser`` (``--num-gpus``, ``--num-machines``,
    ``--machine-rank``, ``--dist-url``) and the collective timeout of its config
    (``SOLVER.CMRCNN.COLLECTIVE_TIMEOUT`` minutes: how long the processes wait for one that
    stopped answering before they stop too)."""
    timeout = DEFAULT_TIMEOUT
    if getattr(args, "config_file", None) and (
        started_by_torchrun() or args.num_gpus * args.num_machines > 1
    ):
        from cmrcnn_ext.config.setup import load_config
        from cmrcnn_ext.config.validate import check_values
        from cmrcnn_ext.engine.setup import command_line_opts

        minutes = load_config(
            args.config_file, command_line_opts(args)
        ).SOLVER.CMRCNN.COLLECTIVE_TIMEOUT
        check_values({"SOLVER.CMRCNN.COLLECTIVE_TIMEOUT": minutes})
        timeout = timedelta(minutes=float(minutes))
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timeout,
    )


def _find_free_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _spawned_worker(
    local_rank,
    main_func,
    world_size,
    num_per_machine,
    machine_rank,
    dist_url,
    args,
    timeout,
    backend,
):
    """Body of a worker spawned by :func:`launch` on a machine without CUDA."""
    global_rank = machine_rank * num_per_machine + local_rank
    _limit_cpu_threads(num_per_machine)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Could not join the process group at %s (rank %d).", dist_url, global_rank)
        raise
    _after_init(num_per_machine, local_rank, backend)
    _ExitOnPreempted(main_func)(*args)
    _shut_down()


def _torchrun_worker(main_func, args, num_gpus_per_machine, num_machines, timeout, backend):
    """This process was started by torchrun: join its process group and run ``main_func``."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    # torchrun sets LOCAL_WORLD_SIZE (= --nproc_per_node); other launchers may not.
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", num_gpus_per_machine))
    if world_size % local_size != 0:
        raise ValueError(
            f"WORLD_SIZE={world_size} is not a multiple of the processes per machine "
            f"({local_size}; LOCAL_WORLD_SIZE or --num-gpus): every machine must run the same "
            "number of processes."
        )
    expected = ((1, 1), (local_size, world_size // local_size))
    if rank == 0 and (num_gpus_per_machine, num_machines) not in expected:
        logger.warning(
            "Started by torchrun (%d processes per machine, world size %d): --num-gpus %d / "
            "--num-machines %d are ignored.",
            local_size,
            world_size,
            num_gpus_per_machine,
            num_machines,
        )
    backend = backend or default_backend()
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        _limit_cpu_threads(local_size)
    initialized_here = not dist.is_initialized()
    if initialized_here:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    _after_init(local_size, local_rank, backend)
    result = main_func(*args)
    if initialized_here:
        _shut_down()
    return result


def _after_init(num_per_machine, local_rank, backend):
    """Set the CUDA device, create Detectron2's local process group, then a barrier."""
    if backend == "nccl":
        assert num_per_machine <= torch.cuda.device_count(), (
            f"{num_per_machine} processes per machine but only {torch.cuda.device_count()} GPUs"
        )
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    # Detectron2's DefaultTrainer wraps the model with device_ids=[local_rank], which
    # DistributedDataParallel rejects for a model on the CPU.
    compat.allow_cpu_ddp()
    create_local_process_group(num_per_machine)
    comm.synchronize()
    assert comm.get_local_rank() == local_rank, (comm.get_local_rank(), local_rank)


def _shut_down():
    """After a successful ``main_func``: wait for the other ranks, then release the group."""
    comm.synchronize()
    dist.destroy_process_group()


def create_local_process_group(num_workers_per_machine):
    """Create the process group of the ranks on this machine, for ``comm.get_local_rank()``.

    Must be called by every rank, after ``init_process_group``. Uses Detectron2's
    ``comm.create_local_process_group`` where it exists (the main branch); Detectron2 v0.6 has no
    public function for it (its ``launch()`` sets a private module attribute), see
    :func:`cmrcnn_ext.compat.set_local_process_group_v06`.
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_workers_per_machine)
        return
    world_size = dist.get_world_size()
    assert world_size % num_workers_per_machine == 0, (world_size, num_workers_per_machine)
    machine_rank = dist.get_rank() // num_workers_per_machine
    local_group = None
    for i in range(world_size // num_workers_per_machine):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)  # collective: every rank creates every group
        if i == machine_rank:
            local_group = group
    compat.set_local_process_group_v06(local_group)


def _limit_cpu_threads(num_processes_per_machine):
    """Share the CPU cores among the processes of this machine (unless OMP_NUM_THREADS is set)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // num_processes_per_machine)
    torch.set_num_threads(threads)
