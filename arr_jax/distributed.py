"""Start-up of JAX's distributed runtime: one process per host (TPU pod slices, multi-node GPU).

`distributed_init` runs before anything touches a device when ``ARR_JAX_DISTRIBUTED=1`` (set by
`launch/tpu_pod.sh` and `launch/gpu_multihost.sh`; every entry point calls it through
`arr_jax.cli.run_main`):

* explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``, all three or none;
* automatic otherwise: JAX's own cluster detection (Cloud TPU pod slices, Slurm, Open MPI).

On CPU (``JAX_PLATFORMS=cpu``) it selects JAX's gloo CPU collectives, so several processes with
a few fake CPU devices each behave like hosts of a pod (how the tests run it).

How a run stops when one process fails (`arr_jax.cli.run_main`; tests/test_multiprocess_exit.py):

* a Python exception, a user error or SIGTERM / SIGINT / SIGHUP: that process prints its error and
  leaves at once (it does not enter JAX's shutdown barrier, which would wait for peers that wait in
  the next collective);
* its peers' next collective then fails at once ("Connection closed by peer"); they say that
  another process has probably died and leave (exit 1);
* a process that is killed (SIGKILL) closes its sockets: the same;
* a process that hangs as a whole (SIGSTOP, a frozen host) stops sending heartbeats: JAX's
  coordination service stops the others after ``ARR_JAX_HEARTBEAT_TIMEOUT`` seconds (default 60)
  with "Terminating process because the JAX distributed service detected fatal errors. This most
  likely indicates that another task died" (an abort, exit status 134).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_init() -> dict:
    """Initialise ``jax.distributed`` when ``ARR_JAX_DISTRIBUTED=1``; returns what it found.

    Returns ``{"processes", "process_index", "local_devices", "global_devices", "platform"}`` and
    prints one line saying so (on every process). Raises ``ValueError`` naming the variables when
    only some of the explicit ones are set.
    """
    import jax

    if os.environ.get("ARR_JAX_DISTRIBUTED") != "1":
        return _facts(jax)
    given = {k: os.environ.get(k) for k in _ENV if os.environ.get(k)}
    if given and len(given) != len(_ENV):
        missing = [k for k in _ENV if k not in given]
        raise ValueError(f"ARR_JAX_DISTRIBUTED=1 with {sorted(given)} set but {missing} missing: set all three "
                         "(or none, for automatic detection on TPU pods, Slurm and Open MPI)")
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if given:
        kw = dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(given["JAX_NUM_PROCESSES"]), process_id=int(given["JAX_PROCESS_ID"]))
    timeout = int(os.environ.get("ARR_JAX_HEARTBEAT_TIMEOUT", "60"))
    jax.distributed.initialize(**kw, heartbeat_timeout_seconds=timeout,
                               initialization_timeout=int(os.environ.get("ARR_JAX_INIT_TIMEOUT", "300")))
    facts = _facts(jax)
    print(f"distributed: process {facts['process_index']} of {facts['processes']}, "
          f"{facts['local_devices']} local / {facts['global_devices']} global {facts['platform']} devices"
          + (f" (coordinator {kw['coordinator_address']})" if kw else " (detected)"), flush=True)
    return facts


def _facts(jax) -> dict:
    return {"processes": jax.process_count(), "process_index": jax.process_index(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "platform": jax.devices()[0].platform}
