"""Every private Keras / TensorFlow API tfpar touches, in one list.

tfpar fixes Keras 3 by wrapping or calling a few of its internals
(``keras.src...``, ``tensorflow.python...``, underscore attributes). Each is a
liability: a new release may rename it, and the failure would show up deep in
a training run. ``HOOKS`` names each one, says how tfpar uses it and, where
it matters, the parameters tfpar relies on. ``tests/test_internals.py`` checks
every hook in the installed versions, so a Keras that moved one fails one
test named after the hook; ``python -m tfpar.core.internals`` prints the same
check on any machine (e.g. a Colab runtime).

Adding a hook is one line in ``HOOKS``::

    Hook("short_name", "module.path:Attr.path", "calls", "param_a, param_b", used_by="tfpar/x.py"),

Targets: ``"module:attr.path"`` for an importable object, ``"@sample:attr"``
for an attribute of one of the sample objects ``samples()`` makes (a
compiled model, its optimizer, a ``CallbackList``). How tfpar uses it:

* ``calls``: tfpar calls or reads it; ``params`` lists the parameters tfpar
  passes, each of which must be accepted.
* ``wraps``: tfpar replaces it by a function of its own that delegates to it;
  ``params`` is the exact parameter list the replacement mirrors (``None``
  when the replacement takes ``*args, **kwargs``).
* ``source``: a compat probe reads its source code (``inspect.getsource``).
* ``sets``: tfpar assigns the attribute and Keras reads it; ``read_by`` is the
  Keras function whose source must still mention it.

Modules get their private objects with ``get(name)`` where that is easy, so
the registry and the code cannot drift apart.
"""

import dataclasses
import importlib
import inspect

HOW = ("calls", "wraps", "source", "sets")


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    target: str
    how: str
    params: str | None = None
    used_by: str = ""
    read_by: str | None = None


_TRAINER = "keras.src.backend.tensorflow.trainer"
_TF_OPTIMIZER = "keras.src.backend.tensorflow.optimizer:TFOptimizer"

HOOKS = (
    # --- Keras trainer (tfpar/kerasfix/compat.py, tfpar/step/) -----------------------------
    Hook("trainer_class", f"{_TRAINER}:TensorFlowTrainer", "calls",
         used_by="compat.py, step/builder.py (is train_step/test_step/predict_step the default one?)"),
    Hook("maybe_symbolic_build", f"{_TRAINER}:TensorFlowTrainer._maybe_symbolic_build", "wraps",
         "self, iterator=None, data_batch=None", used_by="compat.py symbolic_build_reduce"),
    Hook("reduce_per_replica", f"{_TRAINER}:reduce_per_replica", "wraps",
         "values, strategy, reduction", used_by="compat.py scalar_log_reduce"),
    Hook("trainer_distribute_strategy", "@model:_distribute_strategy", "calls",
         used_by="compat.py symbolic_build_reduce"),
    Hook("trainer_compute_loss", "keras.src.trainers.trainer:Trainer._compute_loss", "calls",
         "x, y, y_pred, sample_weight, training", used_by="step/pieces.py, step/builder.py"),
    Hook("trainer_loss_tracker", "@model:_loss_tracker.update_state", "calls",
         "values, sample_weight", used_by="step/builder.py"),
    Hook("model_supports_jit", "keras.src.trainers.trainer:model_supports_jit", "calls", "model",
         used_by="step/xla.py"),
    Hook("unscale_loss_for_distribution", "keras.src.losses.loss:unscale_loss_for_distribution", "calls",
         "value", used_by="step/builder.py, step/pieces.py"),
    Hook("unpack_x_y_sample_weight",
         "keras.src.trainers.data_adapters.data_adapter_utils:unpack_x_y_sample_weight", "calls", "data",
         used_by="step/pieces.py"),
    Hook("initial_epoch", "@model:_initial_epoch", "sets", read_by=f"{_TRAINER}:TensorFlowTrainer.fit",
         used_by="runtime/backup.py, parameter_server.py, kerasfix/saving.py (resume at the backed-up epoch)"),
    Hook("tree_map_structure", "keras.src.tree:map_structure", "calls", "func", used_by="compat.py"),
    # --- Keras layers ---------------------------------------------------------------------
    Hook("call_has_training_arg", "@model:_call_has_training_arg", "calls", used_by="step/pieces.py"),
    Hook("flatten_layers", "keras.src.layers.layer:Layer._flatten_layers", "calls",
         "include_self, recursive", used_by="step/xla.py, sharding/layers.py, run/autotune.py"),
    Hook("batch_norm_build", "keras.layers:BatchNormalization.build", "source",
         used_by="compat.py bn_moving_stats_mean (is aggregation set?)"),
    Hook("batch_norm_add_weight", "keras.layers:BatchNormalization.add_weight", "wraps",
         used_by="compat.py bn_moving_stats_mean"),
    Hook("name_scope_current_path", "keras.src.backend.common.name_scope:current_path", "calls",
         used_by="sharding/variables.py"),
    # --- Keras optimizers -----------------------------------------------------------------
    Hook("loss_scale_check_finite", "keras.src.optimizers.loss_scale_optimizer:LossScaleOptimizer.check_finite",
         "wraps", "self, grads", used_by="compat.py loss_scale_finite_agreement"),
    Hook("all_reduce_sum_gradients", f"{_TF_OPTIMIZER}._all_reduce_sum_gradients", "wraps",
         "self, grads_and_vars", used_by="step/reduce.py (one wrapper per optimizer: bfloat16, buckets)"),
    Hook("distributed_tf_update_step", f"{_TF_OPTIMIZER}._distributed_tf_update_step", "wraps",
         "self, distribution, grads_and_vars, learning_rate", used_by="kerasfix/ps_variables.py"),
    Hook("apply_weight_decay", f"{_TF_OPTIMIZER}._apply_weight_decay", "wraps", "self, variables",
         used_by="kerasfix/ps_variables.py"),
    Hook("use_weight_decay", "keras.src.optimizers.base_optimizer:BaseOptimizer._use_weight_decay", "calls",
         "variable", used_by="kerasfix/ps_variables.py"),
    # --- Keras callbacks ------------------------------------------------------------------
    Hook("callback_list_history", "@callbacks:_history", "calls", used_by="sharding/trainer.py"),
    # --- Keras saving across workers (tfpar/kerasfix/saving.py) -----------------------
    Hook("saving_api_save_model", "keras.src.saving.saving_api:save_model", "source",
         used_by="compat.py model_save_chief_only (does Keras ask for the chief?)"),
    Hook("saving_api_save_weights", "keras.src.saving.saving_api:save_weights", "source",
         used_by="compat.py model_save_chief_only"),
    Hook("model_checkpoint_save_model", "keras.callbacks:ModelCheckpoint._save_model", "wraps",
         "self, epoch, batch, logs", used_by="kerasfix/saving.py install_model_checkpoint"),
    Hook("backup_save_model", "keras.callbacks:BackupAndRestore._save_model", "wraps", "self",
         used_by="kerasfix/saving.py"),
    Hook("backup_load_model", "keras.callbacks:BackupAndRestore._load_model", "wraps", "self",
         used_by="kerasfix/saving.py install_backup_resume"),
    Hook("backup_weights_path", "keras.callbacks:BackupAndRestore.__init__", "source",
         used_by="kerasfix/saving.py (_weights_path, _training_metadata_path, _prev_*_path, _current_epoch)"),
    # --- Keras fit under ParameterServerStrategy (tfpar/ps_fit.py) -------------------------
    Hook("trainer_fit", f"{_TRAINER}:TensorFlowTrainer.fit", "source", used_by="compat.py parameter_server_fit"),
    Hook("trainer_evaluate", f"{_TRAINER}:TensorFlowTrainer.evaluate", "calls",
         used_by="compat.py parameter_server_fit (wrapped)"),
    Hook("pythonify_logs", "keras.src.utils.python_utils:pythonify_logs", "calls", "logs", used_by="ps_fit.py"),
    Hook("maybe_symbolic_build_call", "@model:_maybe_symbolic_build", "calls", "data_batch",
         used_by="ps_fit.py"),
    Hook("assert_compile_called", "@model:_assert_compile_called", "calls", used_by="ps_fit.py"),
    Hook("flatten_metrics_in_order", "@model:_flatten_metrics_in_order", "calls", "logs", used_by="ps_fit.py"),
    Hook("compile_metrics", "@model:_compile_metrics", "calls", used_by="step/pieces.py tracked_metrics (ps_fit.py)"),
    # --- DTensor through Keras fit (tfpar/parallel/sharding/keras_steps.py) -------------
    Hook("symbolic_build", "@model:_symbolic_build", "calls", "data_batch", used_by="sharding/keras_steps.py"),
    Hook("compile_loss", "@model:_compile_loss", "calls", used_by="pipeline/stages.py"),
    # --- keras.distribution on TensorFlow (tfpar/parallel/sharding/keras_distribution.py) -----
    Hook("tf_distribution_lib", "keras.src.backend.tensorflow:distribution_lib", "calls",
         used_by="keras_distribution.py (its missing functions are set: initialize, distribute_tensor, ...)"),
    Hook("tf_variable_class", "keras.src.backend.tensorflow.core:Variable", "calls", used_by="keras_distribution.py"),
    Hook("tf_variable_initialize", "keras.src.backend.tensorflow.core:Variable._initialize", "wraps", "self, value",
         used_by="keras_distribution.py (variables made under a distribution are DTensor variables)"),
    Hook("trainer_base_class", "keras.src.trainers.trainer:Trainer", "calls", used_by="keras_distribution.py"),
    Hook("trainer_compile", "keras.src.trainers.trainer:Trainer.compile", "wraps", None,
         used_by="keras_distribution.py (a model compiled under a distribution gets DTensor steps)"),
    Hook("trainer_make_predict_function", f"{_TRAINER}:TensorFlowTrainer.make_predict_function", "wraps",
         "self, force=False", used_by="keras_distribution.py"),
    Hook("model_class", "keras.src.models.model:Model", "calls", used_by="keras_distribution.py (Model.__call__)"),
    Hook("model_parallel_layout_map", "keras.src.distribution.distribution_lib:ModelParallel.__init__", "source",
         used_by="keras_distribution.py reads ModelParallel._layout_map"),
    # --- Pipeline stages (tfpar/parallel/pipeline/) ---------------------------------------
    Hook("functional_class", "keras.src.models.functional:Functional", "calls",
         used_by="pipeline/partition.py (a graph to cut?)"),
    Hook("layer_inbound_nodes", "@model:_inbound_nodes", "calls",
         used_by="pipeline/partition.py (refuse a layer called twice)"),
    Hook("functional_operation_fn", "keras.src.models.functional:operation_fn", "calls", "operation",
         used_by="pipeline/graph.py (call each op as Functional.call does: training)"),
    Hook("functional_nodes_by_depth", "@model:_nodes_by_depth", "calls",
         used_by="pipeline/graph.py (a graph's nodes in execution order)"),
    Hook("functional_inputs_struct", "@model:_inputs_struct", "calls",
         used_by="pipeline/graph.py (the structure of a model's inputs)"),
    Hook("functional_outputs_struct", "@model:_outputs_struct", "calls",
         used_by="pipeline/graph.py (the structure of a model's outputs)"),
    Hook("symbolic_arguments_fill_in", "keras.src.ops.symbolic_arguments:SymbolicArguments.fill_in", "calls",
         "self, tensor_dict", used_by="pipeline/graph.py (a node's call arguments for computed values)"),
    Hook("tf_variable_value", "@optimizer:iterations._value", "calls",
         used_by="pipeline/placement.py (replaced to move a variable onto its stage's device)"),
    # --- TensorFlow -----------------------------------------------------------------------
    Hook("in_multi_worker_mode",
         "tensorflow.python.distribute.collective_all_reduce_strategy:CollectiveAllReduceExtended._in_multi_worker_mode",
         "calls", "self", used_by="strategies.py is_multi_worker"),
    Hook("sharded_variable", "tensorflow:__internal__.distribute.ShardedVariable", "calls",
         used_by="step/pieces.py shards, kerasfix/ps_variables.py"),
    Hook("slurm_expand_hostlist",
         "tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver:expand_hostlist", "calls",
         "hostlist", used_by="cluster.py"),
    Hook("slurm_expand_tasks_per_node",
         "tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver:expand_tasks_per_node", "calls",
         "tasks_per_node", used_by="cluster.py"),
    Hook("eager_context", "tensorflow.python.eager.context:context", "calls", used_by="peers.py"),
    Hook("coordination_service", "tensorflow.python.eager.context:Context.coordination_service", "calls",
         used_by="peers.py"),
    Hook("configure_coordination_service", "tensorflow.python.eager.context:Context.configure_coordination_service",
         "calls", "service_type, service_leader, coordinated_jobs, cluster_register_timeout_in_ms",
         used_by="peers.py"),
    Hook("coordination_leader", "tensorflow.python.distribute.multi_worker_util:coordination_leader", "calls",
         "cluster_spec", used_by="peers.py"),
    Hook("coordinated_job", "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2:CoordinatedJob", "calls",
         used_by="peers.py"),
    Hook("xplane_pb2", "tensorflow.tsl.profiler.protobuf.xplane_pb2:XSpace", "calls", used_by="trace.py"),
)

BY_NAME = {hook.name: hook for hook in HOOKS}


def _walk(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get(name):
    """The object the hook ``name`` points to (``"module:attr"`` targets only)."""
    hook = BY_NAME[name]
    module, _, path = hook.target.partition(":")
    return _walk(importlib.import_module(module), path)


def samples():
    """The objects ``@sample:attr`` targets are looked up on: a compiled, fitted tiny model and friends."""
    import keras
    import numpy as np

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.BatchNormalization()(inputs)))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32"), epochs=1, verbose=0)
    callbacks = keras.callbacks.CallbackList([], add_history=True, model=model)
    return {"model": model, "optimizer": model.optimizer, "callbacks": callbacks}


def _parameters(obj):
    target = obj.fget if isinstance(obj, property) else obj
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None


def _format(parameters):
    return ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters.values())


def _unwrap(obj):
    """Keras's own function under any tfpar wrappers (each keeps the one it wraps as ``__tfpar_original__``)."""
    while hasattr(obj, "__tfpar_original__"):
        obj = obj.__tfpar_original__
    return obj


def check(hook, sample_objects=None):
    """Problems with ``hook`` in the installed Keras/TensorFlow: a list of sentences, empty when all is well."""
    where, _, path = hook.target.partition(":")
    try:
        if where.startswith("@"):
            objects = sample_objects if sample_objects is not None else samples()
            obj = _walk(objects[where[1:]], path)
        else:
            obj = _walk(importlib.import_module(where), path)
    except (ImportError, AttributeError) as err:
        return [f"{hook.target} is gone ({type(err).__name__}: {err})"]
    obj = _unwrap(obj)  # compat may have installed its wrappers already
    problems = []
    if hook.params is not None:
        parameters = _parameters(obj)
        if parameters is None:
            return [f"{hook.target} has no readable signature"]
        if hook.how == "wraps":
            if _format(parameters) != hook.params:
                problems.append(f"{hook.target} now takes ({_format(parameters)}); "
                                f"tfpar's replacement mirrors ({hook.params})")
        else:
            varkw = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            missing = [n.strip() for n in hook.params.split(",") if n.strip() not in parameters and not varkw]
            if missing:
                problems.append(f"{hook.target} no longer takes {', '.join(missing)}: ({_format(parameters)})")
    if hook.how in ("source", "wraps") and not where.startswith("@"):
        try:
            inspect.getsource(obj)
        except (OSError, TypeError) as err:
            if hook.how == "source":
                problems.append(f"the source of {hook.target} cannot be read ({err})")
    if hook.how == "sets":
        reader = hook.read_by.partition(":")
        attribute = path.rpartition(".")[2]
        try:
            source = inspect.getsource(_unwrap(_walk(importlib.import_module(reader[0]), reader[2])))
        except (ImportError, AttributeError, OSError, TypeError) as err:
            problems.append(f"{hook.read_by}, which reads {attribute}, is gone ({err})")
        else:
            if attribute not in source:
                problems.append(f"{hook.read_by} no longer reads {attribute}, so setting it does nothing")
    return problems


def report():
    """``(hook, problems)`` for every hook, in order."""
    objects = samples()
    return [(hook, check(hook, objects)) for hook in HOOKS]


def main():
    import keras
    import tensorflow as tf

    results = report()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}: {len(HOOKS)} private hooks")
    for hook, problems in results:
        print(f"{'ok ' if not problems else 'BAD'} {hook.name:32} {hook.target}")
        for problem in problems:
            print(f"      {problem}")
    return 1 if any(problems for _, problems in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
