"""Connecting to Ray: an existing cluster when one is given or running, else a local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os

import ray

from trustray.runtime import OFFLINE_DEFAULTS, apply_offline_defaults

logger = logging.getLogger(__name__)


def worker_env() -> dict[str, str]:
    """Environment for every Ray worker: offline hub, loopback, and one thread per worker process unless the
    actor sets its own (two processes oversubscribing 2 cores run many times slower)."""
    env = {key: os.environ.get(key, value) for key, value in OFFLINE_DEFAULTS.items()}
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("TRUSTRAY_CACHE", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


# Ray Train's placement-group cleaner asks the dashboard's state API once a second whether the train controller is
# alive. The local cluster starts no dashboard (2 cores), so every ask fails with a warning, for the whole run. With
# no state API it can never clean up anyway; the local cluster frees a dead controller's placement groups when it
# stops.
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_train_cleaner() -> None:
    """Worker setup hook of the local cluster: only errors from Ray Train's placement-group cleaner."""
    logging.getLogger(TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connect to `address` (or `$RAY_ADDRESS`); without one, start a local cluster bound to 127.0.0.1.

    Token auth is turned off only for the local cluster started here; a remote cluster keeps its own auth.
    """
    if ray.is_initialized():
        return
    apply_offline_defaults()
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logger.info("starting a local Ray cluster on 127.0.0.1")
    runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_train_cleaner"
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
