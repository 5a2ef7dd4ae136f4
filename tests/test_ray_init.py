"""The local Ray cluster that `init_ray` starts."""

from __future__ import annotations

import importlib.util
import logging

from trustray.actors.cluster import TRAIN_CLEANER_LOGGER


def test_local_cluster_logs_only_errors_of_ray_trains_placement_group_cleaner(ray_local):
    """Without a dashboard Ray Train's cleaner (a detached actor) would warn once a second, for the whole run, that
    the state API is down; every worker of the local cluster, detached actors included, keeps only its errors."""
    import ray

    assert importlib.util.find_spec(TRAIN_CLEANER_LOGGER) is not None, "Ray moved the cleaner: rename the logger"

    @ray.remote(num_cpus=0)
    class LoggerLevels:
        def levels(self) -> tuple[int, int]:
            return (logging.getLogger(TRAIN_CLEANER_LOGGER).getEffectiveLevel(),
                    logging.getLogger("ray.train").getEffectiveLevel())

    detached = LoggerLevels.options(lifetime="detached", name="trustray-test-logger-levels").remote()
    try:
        cleaner_level, train_level = ray.get(detached.levels.remote())
    finally:
        ray.kill(detached)
    assert cleaner_level == logging.ERROR
    assert train_level < logging.ERROR
