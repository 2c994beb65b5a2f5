"""Distributed training with TensorFlow's own engine (tf.distribute): strategy choice and chief-only writes.

``--batch-size`` is the global batch: Keras splits each batch across the replicas. Multi-worker training reads
the cluster from ``TF_CONFIG`` as clusters and Kubernetes set it; every worker runs the same command against the
same (shared) artifacts directory, only the chief writes to it, and the others read its checkpoints to resume.
"""

from __future__ import annotations

import json
import os

from transfer.errors import UserError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")


def make_strategy(name: str):
    """The tf.distribute strategy for ``--strategy``; ``auto`` mirrors over GPUs when there are several."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise UserError(f"--strategy '{name}' (choices: {', '.join(STRATEGIES)})")
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multi-worker needs TF_CONFIG (cluster and task) in the environment; "
                            "see the README's scaling-out section")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as exc:
            raise UserError(f"TF_CONFIG is not valid JSON ({exc}); fix the environment variable") from exc
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def is_chief(strategy) -> bool:
    """Whether this process writes the run directory (always, except on non-chief multi-worker tasks)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if has_chief:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def shard_by_data(dataset):
    """In-memory datasets cannot be sharded by file: shard by element across workers."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
