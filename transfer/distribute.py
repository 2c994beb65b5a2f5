"""Distributed training with TensorFlow's own engine (tf.distribute): strategy choice and chief-only writes.

``--batch-size`` is the global batch: Keras splits each batch across the replicas. Multi-worker training reads
the cluster from ``TF_CONFIG`` as clusters and Kubernetes set it; every worker runs the same command against the
same (shared) artifacts directory, only the chief writes to it, and the others read its checkpoints to resume.
"""

from __future__ import annotations

import json
import os

from transfer.config import STRATEGIES
from transfer.errors import UserError


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


def barrier(strategy) -> None:
    """Multi-worker only: wait until every worker gets here, so none exits while the chief still writes
    (the chief hosts the coordination service; a worker outliving it fails its heartbeat)."""
    if is_multi_worker(strategy):
        import tensorflow as tf

        @tf.function
        def everyone():
            return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

        everyone()


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def patch_keras_for_multi_worker(model, strategy) -> None:
    """Work around Keras 3's MultiWorkerMirroredStrategy bugs (keras-team/keras#20585), for ``model`` only.

    ``Model.fit`` reduces a whole per-replica input batch eagerly just to learn its shapes, and averages scalar
    metric logs over ``axis=0``; both raise under multi-worker collectives. The shapes come from the local batch
    instead, and scalars are averaged without an axis. Nothing changes for any other strategy.
    """
    import types

    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if not is_multi_worker(strategy):
        return

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(local, next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(symbolic_build, model)
    if getattr(tf_trainer.reduce_per_replica, "_transfer_patched", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("mean", "auto") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            def mean(value):
                if not isinstance(value, tf.distribute.DistributedValues):
                    return value
                rank = strategy.experimental_local_results(value)[0].shape.rank
                return strategy.reduce("MEAN", value, axis=0 if rank else None)

            return tree.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._transfer_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica
