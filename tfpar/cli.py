"""``tfpar-train``: the command-line face of ``tfpar.train.run``.

Flags mirror ``TrainConfig`` field by field. A user mistake prints one line
``tfpar-train: error: ...`` and exits 2, with no traceback.
"""

import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of the CLI

from absl import flags

from tfpar.train import TrainConfig

FLAGS = flags.FlagValues()
_D = TrainConfig()
_HELP = {
    "model": "Model name from tfpar.models.names().",
    "num_classes": "Classes of the classifier.",
    "image_size": "Height and width the images are resized to.",
    "width_multiplier": "Scales every layer's width (0.25 for quick runs).",
    "bn_momentum": "BatchNormalization moving-statistics momentum.",
    "strategy": "auto, one_device, mirrored, multi_worker, tpu or parameter_server.",
    "virtual_cpus": "Split the CPU into this many logical devices (for mirrored on a laptop).",
    "precision": "auto, float32, mixed_float16 or mixed_bfloat16.",
    "data": "Input source: digits (scikit-learn's bundled images).",
    "batch_size": "Global batch size, split across replicas.",
    "epochs": "Epochs to train.",
    "steps_per_epoch": "Steps per epoch (default: one pass over the training data).",
    "validation_steps": "Validation steps per epoch (default: the whole validation set).",
    "optimizer": "sgd (with momentum), adam or adamw.",
    "learning_rate": "Peak learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 factor on kernels (decoupled decay for adamw).",
    "model_dir": "Where TensorBoard logs and summary.json go.",
    "tensorboard": "Write TensorBoard event files under model_dir.",
    "seed": "Random seed for weights, shuffling and dropout.",
    "verbose": "Keras fit verbosity on the chief: 0, 1 or 2.",
    "backup_dir": "Where backups for resuming go (default: MODEL_DIR/backup; shared storage in a cluster).",
    "backup_freq": "Back up every epoch ('epoch'), every N steps ('N'), or never ('none').",
    "keep_backups": "Keep the backups after a successful finish (default: delete them).",
    "cluster_timeout": "Seconds a worker waits for the others to come up before it exits with code 69.",
}


def _define_flags():
    for field in dataclasses.fields(TrainConfig):
        default, help_text = getattr(_D, field.name), _HELP[field.name]
        kind = getattr(field.type, "__name__", str(field.type))  # "int | None" for optionals
        if kind == "bool":
            flags.DEFINE_boolean(field.name, default, help_text, flag_values=FLAGS)
        elif kind == "float":
            flags.DEFINE_float(field.name, default, help_text, flag_values=FLAGS)
        elif "int" in kind:
            flags.DEFINE_integer(field.name, default, help_text, flag_values=FLAGS)
        else:
            flags.DEFINE_string(field.name, default, help_text, flag_values=FLAGS)


_define_flags()


def config_from_flags(argv):
    """Parse ``argv`` (program name first) into a validated ``TrainConfig``."""
    rest = FLAGS(argv)
    if len(rest) > 1:
        raise ValueError(f"Unexpected argument(s): {' '.join(rest[1:])}.")
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values).validate()


def fail(message):
    print(f"tfpar-train: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv or "--helpfull" in argv:
        print("usage: tfpar-train [--flag=value ...]\n\nTrain a tfpar model.\n")
        print(FLAGS.get_help())
        return 0
    try:
        config = config_from_flags(argv)
    except (flags.Error, ValueError) as err:
        return fail(str(err))
    from tfpar import train

    try:
        summary = train.run(config)
    except ValueError as err:
        return fail(str(err))
    print(
        f"done: val_accuracy={summary['val_accuracy']:.4f} val_loss={summary['val_loss']:.4f} "
        f"examples/sec={summary['examples_per_sec'] or 0:.1f} summary={config.model_dir}/summary.json"
    )
    return 0


def run_main():
    """Console-script entry point."""
    sys.exit(main())
