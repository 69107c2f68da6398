"""``tfpar-train``: the command-line face of ``tfpar.train.run``.

Flags mirror ``TrainConfig`` field by field. A user mistake prints one line
``tfpar-train: error: ...`` and exits 2, with no traceback.
"""

import dataclasses
import os
import sys

from absl import flags

from tfpar.core import quiet
from tfpar.run.config import AUTOTUNE_FIELDS, DEFAULT_GLOBAL_BATCH, TrainConfig

# Flags are defined on first use: the model list comes from tfpar.models, which imports
# TensorFlow, and TensorFlow must not load before run_main has set its log level.
FLAGS = flags.FlagValues()
_D = TrainConfig()
_HELP = {
    "model": "Model name: {models}.",
    "num_classes": "Classes of the classifier (must match the data: digits 10, cifar10 10, cifar100 100, "
                   "folder = its class folders; ImageNet TFRecords store labels 1-1000, so use 1001).",
    "image_size": "Height and width the images are resized or cropped to.",
    "width_multiplier": "Scales every layer's width (0.125-0.25 for quick runs).",
    "patch_size": "ViT only: side of the square patches (default 16; 4 suits 32 px images). Image size must be "
                  "a multiple of it.",
    "bn_momentum": "BatchNormalization moving-statistics momentum (0.9 suits short runs).",
    "strategy": "auto, one_device, mirrored, multi_worker, tpu, parameter_server, dtensor or pipeline.",
    "virtual_cpus": "Split the CPU into this many logical devices (mirrored or dtensor on a laptop).",
    "precision": "float32 (default, as in Keras), mixed_float16, mixed_bfloat16, or auto: mixed_bfloat16 on "
                 "TPUs and on CPUs with native bfloat16, mixed_float16 on GPUs of compute capability 7.0+, "
                 "else float32 (with --autotune, auto times float32 against the mixed policy these devices run "
                 "and keeps the faster). Left at float32, tfpar-train says when this machine has a faster policy.",
    "data": "Input: digits (scikit-learn's bundled images), synthetic (random, for benchmarks), "
            "folder:PATH (PATH/<class>/<image>.jpg|png, or PATH/train + PATH/val), "
            "tfrecord:GLOB (ImageNet layout image/encoded + image/class/label; files named validation* "
            "or val* are the validation split), cifar10:PATH or cifar100:PATH (the python-pickle archive "
            ".tar.gz or its folder; never downloaded).",
    "batch_size": f"Global batch size over all replicas (default {DEFAULT_GLOBAL_BATCH}); must divide evenly.",
    "per_replica_batch_size": "Batch per replica instead of --batch_size: global = this x replicas.",
    "epochs": "Epochs to train.",
    "steps_per_epoch": "Steps per epoch (default: one pass over the training data; 100 for synthetic).",
    "validation_steps": "Validation steps per epoch (default: the whole validation set; 10 for synthetic); "
                        "0 skips validation.",
    "optimizer": "sgd (with --momentum), adam or adamw (decoupled --weight_decay).",
    "learning_rate": "Learning rate at --lr_reference_batch; scaled linearly to the global batch x "
                     "--grad_accum_steps: peak = learning_rate * batch * accum / lr_reference_batch.",
    "lr_reference_batch": "Batch size --learning_rate is given for (Goyal et al.: 0.1 per 256); 0 = no scaling.",
    "lr_schedule": "After warmup: cosine (to 0 at the end), step (x --lr_decay_rate at --lr_decay_epochs) "
                   "or constant.",
    "warmup_epochs": "Epochs of linear warmup from 0 to the peak learning rate (may be fractional).",
    "lr_decay_epochs": "Comma-separated epochs where lr_schedule=step multiplies the rate by --lr_decay_rate.",
    "lr_decay_rate": "Factor of each step decay.",
    "momentum": "SGD momentum.",
    "label_smoothing": "Label smoothing of the cross-entropy, in [0, 1).",
    "weight_decay": "L2 factor on kernels for sgd/adam; decoupled weight decay for adamw.",
    "grad_accum_steps": "Micro-batches per optimizer update: each step feeds every replica this many batches "
                        "of its share of --batch_size in turn and sums their gradients, then all-reduces once "
                        "(fewer all-reduces per image; memory of one micro-batch). A step is one update.",
    "all_reduce_dtype": "float32, or bfloat16 to sum gradients between replicas in half the bytes (multi-worker "
                        "on CPUs: the all-reduce is ~1/4 of a ResNet-50 step; each summed gradient is rounded "
                        "to ~0.4%, weights and updates stay float32).",
    "all_reduce_bucket_mb": "MiB of gradients per all-reduce bucket under mirrored/multi_worker (default 25): "
                            "the last layers' gradients are summed while the backward pass still computes the "
                            "earlier ones, and BN statistics in one collective; 0 = Keras's one all-reduce "
                            "after the whole backward pass.",
    "jit_compile": "XLA for the per-replica step: auto (the choice --autotune cached for this model and devices, "
                   "else on for GPU/TPU, off for CPU), on or off.",
    "autotune": "Time short trials of the settings left to tfpar (the precision policy with --precision=auto, on "
                "a model built per policy; XLA with --jit_compile=auto; all-reduce bucket "
                "size and dtype with 2+ replicas; micro-batches for models without BatchNormalization) at the "
                "start, keep the fastest and cache it ($TFPAR_CACHE_DIR, else $XDG_CACHE_HOME/tfpar or "
                "~/.cache/tfpar): the next run of the same shape skips the trials. Training is unchanged: weights, "
                "optimizer and data position are restored. A tuned flag given on the command line stays fixed.",
    "autotune_budget": "Steps --autotune may spend on trials: below 1, that fraction of the planned steps "
                       "(default 5%); 1 or more, that many steps. Each trial takes 7 steps (2 to warm up, 5 timed).",
    "autotune_keep": "Comma-separated settings --autotune leaves as given (jit_compile, all_reduce_bucket_mb, "
                     "all_reduce_dtype, grad_accum_steps); flags given on the command line are added.",
    "steps_per_execution": "Training steps run per tf.function call (fewer Python round trips); "
                           "under parameter_server, per function scheduled on a worker.",
    "model_dir": "Where TensorBoard logs, best.weights.h5 and summary.json go.",
    "tensorboard": "Write TensorBoard event files (scalars, throughput) under model_dir.",
    "profile_steps": "Trace steps A to B with the TensorBoard profiler, e.g. 2,3 (needs --tensorboard); "
                     "the trace lands in model_dir/plugins/profile/<run>/.",
    "checkpoint_best": "Keep the best epoch's weights (val accuracy) as model_dir/best.weights.h5 (chief only).",
    "log_all_workers": "Every worker prints its epochs (prefixed by task), not only the chief.",
    "mesh": "DTensor mesh for --strategy=dtensor, e.g. batch=2,model=2.",
    "layout_rules": "DTensor layout rules file for --strategy=dtensor.",
    "layout_map": "A Keras LayoutMap for --strategy=dtensor: module:function called with a "
                  "keras.distribution.DeviceMesh of --mesh (e.g. keras_hub.models:GemmaBackbone.get_layout_map), "
                  "or a JSON file {{regex: [axis or null, ...]}}; strict, like --layout_rules.",
    "stages": "Pipeline stages for --strategy=pipeline: consecutive parts of the model, one per device (with "
              "--schedule=interleaved_1f1b, stage i on device i mod --pipeline_devices); under a "
              "TF_CONFIG cluster of stages x --pipeline_replicas worker tasks, stage i on worker task i.",
    "micro_batches": "Pipeline micro-batches per step: --batch_size splits into this many x --pipeline_replicas; "
                     "one optimizer update per step.",
    "schedule": "Pipeline schedule: 1f1b (at most --stages micro-batches of activations per stage), gpipe, or "
                "interleaved_1f1b (--stages = V x --pipeline_devices, stage s on device s mod D; needs "
                "--micro_batches >= --stages; bubble (D-1)/(V*M+D-1)).",
    "balance": "Where the pipeline cuts: time (measure each part), flops, params, layers, or CUT,CUT,... "
               "(layer names after which stages end).",
    "pipeline_devices": "Devices of one pipeline copy, D (default --stages); below --stages only with "
                        "--schedule=interleaved_1f1b. In a TF_CONFIG cluster the default is its worker tasks / "
                        "--pipeline_replicas, each task holding --stages / D stages.",
    "pipeline_replicas": "Copies of the pipeline (data parallel over stages x copies devices); each stage's "
                         "gradients are summed over its copies.",
    "worker_times": "Under mirrored/multi_worker: time every replica's step (input wait, compute, wait in the "
                    "gradient collectives) with one tiny all-gather per step; TensorBoard "
                    "model_dir/workers_timing/<worker>, summary.json worker_times, and one warning naming a "
                    "worker whose own step time stays above 1.25x the median.",
    "balance_batches": "Under mirrored/multi_worker: give each replica a share of the global batch proportional "
                       "to its measured speed, re-measured every --balance_every steps; the update is still one "
                       "global batch's (same batch, same learning rate). Every worker reads the whole batch.",
    "balance_every": "Steps per measurement window of --worker_times (and per re-balance with --balance_batches).",
    "balance_min_fraction": "With --balance_batches: the smallest share, as a fraction of an even share.",
    "seed": "Random seed for weights, shuffling and augmentation.",
    "verbose": "Progress on the chief (every worker with --log_all_workers). Unset: one line per epoch, plus "
               "Keras's progress bar inside epochs longer than 5 s when one process prints to a terminal; "
               "0: the one line per epoch only; 1: Keras's progress bar always; 2: Keras's own line per epoch too.",
    "backup_dir": "Where backups for resuming go (default: MODEL_DIR/backup; shared storage in a cluster).",
    "backup_freq": "Back up every epoch ('epoch'), every N steps ('N'), or never ('none').",
    "keep_backups": "Keep the backups after a successful finish (default: delete them).",
    "max_per_replica_batch": "Most examples per replica in one micro-batch; a larger share of the global batch is "
                             "trained in gradient-accumulation steps instead (also when a resume on fewer workers "
                             "keeps the global batch). Unset: no cap.",
    "allow_batch_change": "Resume a backup written with another global batch (or accumulation) at this run's batch, "
                          "from the backup's example and step; refused without it.",
    "cluster_timeout": "Seconds a worker waits for the others to come up before it exits with code 69; a peer "
                       "lost mid-run is noticed within a quarter of it (at most 10 s), also exit 69.",
    "launcher": "'' (this process is one task of the cluster) or ray: run --workers Ray Train workers "
                "(TensorflowTrainer, Keras 3) on the Ray cluster in RAY_ADDRESS or a local one (pip install "
                "\"tfpar[ray]\"; docs/ray.md).",
    "workers": "With --launcher=ray: the number of Ray Train workers, or MIN:MAX for Ray Train's elastic scaling "
               "(a backup resumes on however many workers Ray starts, with the same global batch).",
    "use_gpu": "With --launcher=ray: one GPU per Ray Train worker.",
}
# Flags of the command, not of the training run (no TrainConfig field).
TF_LOG_LEVEL_HELP = ("TensorFlow's C++ log level: 0 shows all of it, 1 hides INFO, 2 (default) shows only errors, "
                     "3 only fatal ones; default TF_CPP_MIN_LOG_LEVEL if set. Applies to TF's start-up lines too.")


def _define_tf_log_level(flag_values):
    flags.DEFINE_integer("tf_log_level", None, TF_LOG_LEVEL_HELP, lower_bound=0, upper_bound=3,
                         flag_values=flag_values)


def _define_flags():
    if "model" in FLAGS:
        return
    from tfpar import models

    for field in dataclasses.fields(TrainConfig):
        default, help_text = getattr(_D, field.name), _HELP[field.name].format(models=", ".join(models.names()))
        kind = getattr(field.type, "__name__", str(field.type))  # "int | None" for optionals
        if kind == "bool":
            flags.DEFINE_boolean(field.name, default, help_text, flag_values=FLAGS)
        elif kind == "float":
            flags.DEFINE_float(field.name, default, help_text, flag_values=FLAGS)
        elif "int" in kind and "str" not in kind:
            flags.DEFINE_integer(field.name, default, help_text, flag_values=FLAGS)
        else:
            flags.DEFINE_string(field.name, default, help_text, flag_values=FLAGS)
    _define_tf_log_level(FLAGS)


def config_from_flags(argv):
    """Parse ``argv`` (program name first) into a validated ``TrainConfig``."""
    _define_flags()
    FLAGS.unparse_flags()  # a second call in one process starts from the defaults again
    rest = FLAGS(argv)
    if len(rest) > 1:
        raise ValueError(f"Unexpected argument(s): {' '.join(rest[1:])}.")
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)}
    given = [name for name in AUTOTUNE_FIELDS if FLAGS[name].present]  # --autotune keeps what was given
    values["autotune_keep"] = ",".join(n for n in (values["autotune_keep"] or "").split(",") + given if n)
    return TrainConfig(**values).validate()


def fail(message):
    print(f"tfpar-train: error: {message}", file=sys.stderr)
    return 2


USAGE = """usage: tfpar-train [--flag=value ...] [--flagfile=FILE]

Train an image classifier with a tf.distribute strategy and write TensorBoard
logs and summary.json to --model_dir. Flags may also come from --flagfile
(one --flag=value per line). Mistakes exit with status 2 and one sentence.
"""


def help_text():
    """The --help text: usage and every flag with its default."""
    _define_flags()
    return USAGE + "\nflags:\n" + FLAGS.get_help(include_special_flags=False) + (
        "\n  --flagfile: Read flags from this file, one --flag=value per line.\n")


def _sentence(err):
    """absl's messages can span lines or sentences ('Did you mean'); the CLI shows one sentence."""
    if isinstance(err, flags.UnrecognizedFlagError):
        _, _, suggestions = str(err).partition("Did you mean: ")
        hint = f" (did you mean --{suggestions.rstrip(' ?').split(',')[0].strip()}?)" if suggestions else ""
        return f"Unknown command line flag '{err.flagname}'{hint}; see tfpar-train --help."
    text = " ".join(str(err).split()).removeprefix("ERROR:: ")
    return text if text.endswith(".") else text + "."


def _precision_offer(config):
    """The chief's one line about a faster policy, when --precision was left at its float32 default."""
    if FLAGS["precision"].present or config.precision != "float32":
        return None
    from tfpar.runtime import cluster, precision

    try:
        info = cluster.detect()
    except ValueError:
        return None  # train.run reports the bad cluster
    if not info.is_chief:
        return None
    on_tpu = config.strategy == "tpu" or (config.strategy == "auto" and info.source == "tpu")
    return precision.offer("tpu" if on_tpu else config.strategy)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull", "-?", "--helpshort") for a in argv[1:]):
        print(help_text())
        return 0
    try:
        config = config_from_flags(argv)
    except flags.Error as err:
        return fail(_sentence(err))
    except ValueError as err:
        return fail(str(err))
    from tfpar.run import driver as train

    faster = _precision_offer(config)
    if faster:
        print(f"precision float32 (the default, as in Keras); {faster}")
    try:
        if config.launcher == "ray":
            from tfpar.run import ray as tfpar_ray

            summary = tfpar_ray.train(config, num_workers=config.worker_counts(), use_gpu=config.use_gpu)
        else:
            summary = train.run(config)
    except ValueError as err:
        return fail(str(err))
    chief = summary.get("is_chief", True)
    if not (chief or config.log_all_workers):
        return 0  # in a cluster only the chief speaks, unless asked
    shown = {k: summary.get(k) for k in ("val_accuracy", "val_loss", "train_accuracy", "train_loss")}
    metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items() if isinstance(v, (int, float)))
    written = "summary.json" if chief else f"summary.{summary.get('task')}.json"
    print(f"done: {metrics} examples/sec={summary.get('examples_per_sec') or 0:.1f} "
          f"summary={os.path.join(config.model_dir, written)}")
    return 0


def tf_log_level_from(argv):
    """``--tf_log_level`` from ``argv`` (flag files included) before TensorFlow loads; None if absent or bad.

    A bad value is left for ``main`` to report as a usage error.
    """
    early = flags.FlagValues()
    _define_tf_log_level(early)
    try:
        early(list(argv), known_only=True)
    except flags.Error:
        return None
    return early.tf_log_level


def run_main():
    """Console-script entry point: TensorFlow's C++ log quiet (``tfpar.core.quiet``), then ``main``."""
    quiet.start_tensorflow(quiet.level(tf_log_level_from(sys.argv)))
    sys.exit(main())


if __name__ == "__main__":
    run_main()
