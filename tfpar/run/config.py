"""``TrainConfig``: every setting of one training run, validated once with one clear sentence per mistake."""

import dataclasses
import os
import re

OPTIMIZERS = ("sgd", "adam", "adamw")
JIT_COMPILE = ("auto", "on", "off")
LAUNCHERS = ("", "ray")
# --autotune: the strategies it times on (one process's devices), and the fields a user can keep fixed.
AUTOTUNE_STRATEGIES = ("auto", "one_device", "mirrored")
AUTOTUNE_FIELDS = {"all_reduce_bucket_mb": "bucket_mb", "all_reduce_dtype": "all_reduce_dtype",
                   "grad_accum_steps": "micro_batches"}
DEFAULT_GLOBAL_BATCH = 64


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. ``validate()`` checks it once.

    The CLI defines one flag per field, so a field's comment in ``cli._HELP``
    is its documentation.
    """

    model: str = "resnet18"
    num_classes: int = 10
    image_size: int = 32
    width_multiplier: float = 1.0
    patch_size: int | None = None  # ViT only; None: the builder's 16
    bn_momentum: float = 0.9
    strategy: str = "auto"
    virtual_cpus: int | None = None
    precision: str = "float32"
    data: str = "digits"
    batch_size: int | None = None  # global; DEFAULT_GLOBAL_BATCH when neither batch flag is given
    per_replica_batch_size: int | None = None
    epochs: int = 5
    steps_per_epoch: int | None = None
    validation_steps: int | None = None  # 0: no validation
    optimizer: str = "sgd"
    learning_rate: float = 0.1  # at lr_reference_batch; see tfpar.run.schedules
    lr_reference_batch: int = 256
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay_epochs: str | None = None  # "30,60,80" for lr_schedule=step
    lr_decay_rate: float = 0.1
    momentum: float = 0.9
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    all_reduce_dtype: str = "float32"  # "bfloat16": half the gradient bytes between replicas (tfpar.step.all_reduce)
    all_reduce_bucket_mb: float = 25.0  # gradients all-reduced in buckets overlapping backward; 0: Keras's one batch
    jit_compile: str = "auto"
    # tfpar.run.autotune: time the settings left to tfpar at the start of the run, keep the fastest
    autotune: bool = False
    autotune_budget: float = 0.05  # < 1: this fraction of the planned steps; >= 1: this many steps
    autotune_keep: str = ""  # comma-separated fields --autotune leaves as given (the CLI adds flags given)
    steps_per_execution: int = 1
    model_dir: str = "runs/default"
    tensorboard: bool = True
    profile_steps: str | None = None  # "A,B"
    checkpoint_best: bool = True
    log_all_workers: bool = False
    mesh: str | None = None  # dtensor only, e.g. "batch=2,model=2"
    layout_rules: str | None = None  # dtensor only: a file of layout rules
    layout_map: str | None = None  # dtensor only: "module:function" making a keras LayoutMap, or a JSON file
    # pipeline only (tfpar.pipeline): stages x micro-batches per step, schedule, cuts, copies
    stages: int = 2
    micro_batches: int = 4
    schedule: str = "1f1b"
    balance: str = "time"
    pipeline_replicas: int = 1
    pipeline_devices: int | None = None  # D per copy; None: --stages (interleaved_1f1b: the cluster's tasks / copies)
    # stragglers (tfpar.step.stragglers): every replica's times; batches balanced by measured speed
    worker_times: bool = True
    balance_batches: bool = False
    balance_every: int = 20
    balance_min_fraction: float = 0.25
    seed: int = 0
    verbose: int | None = None  # None: tfpar.run.callbacks picks a progress bar or one line per epoch
    # fault tolerance (tfpar.runtime.backup, tfpar.runtime.preemption)
    backup_dir: str = ""  # default: model_dir/backup
    backup_freq: str = "epoch"  # "epoch", a number of steps, or "none"
    keep_backups: bool = False
    cluster_timeout: float = 300.0
    # elastic resume (tfpar.runtime.elastic): a backup resumes on another number of workers, same global batch
    max_per_replica_batch: int | None = None  # cap; more gradient accumulation steps instead
    allow_batch_change: bool = False  # resume a backup with another global batch
    # engines (tfpar.ray)
    launcher: str = ""  # "" (this process is one task) or "ray"
    workers: int | str = "2"  # with launcher=ray: Ray Train workers, N or "MIN:MAX" (Ray's elastic scaling)
    use_gpu: bool = False  # with launcher=ray: one GPU per worker

    def validate(self):
        """Raise ``ValueError`` with one clear sentence for the first bad field."""
        from tfpar.step import all_reduce
        from tfpar.run import data, schedules
        from tfpar import models
        from tfpar.runtime import precision, strategies

        names = strategies.NAMES + ("dtensor", "pipeline")
        if self.model not in models.names():
            raise ValueError(f"Unknown model {self.model!r}; choose one of: {', '.join(models.names())}.")
        if self.strategy not in names:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(names)}.")
        if self.precision not in precision.POLICIES:
            raise ValueError(f"Unknown precision {self.precision!r}; choose one of: {', '.join(precision.POLICIES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        if self.lr_schedule not in schedules.KINDS:
            raise ValueError(f"Unknown lr_schedule {self.lr_schedule!r}; choose one of: {', '.join(schedules.KINDS)}.")
        if self.all_reduce_dtype not in all_reduce.DTYPES:
            raise ValueError(f"all_reduce_dtype must be one of: {', '.join(all_reduce.DTYPES)}; "
                             f"got {self.all_reduce_dtype!r}.")
        bucket = self.all_reduce_bucket_mb
        if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not 0 <= bucket < float("inf"):
            raise ValueError(f"all_reduce_bucket_mb must be a number >= 0 (MiB of gradients per all-reduce; "
                             f"0: one all-reduce after the backward pass), got {bucket!r}.")
        if self.grad_accum_steps > 1 and self.strategy in ("parameter_server", "dtensor"):
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} works with Keras fit strategies; "
                             f"{self.strategy} trains with its own loop, so use grad_accum_steps=1.")
        if self.max_per_replica_batch is not None and self.strategy in ("parameter_server", "dtensor", "pipeline"):
            raise ValueError(f"max_per_replica_batch works with Keras fit strategies (it adds gradient accumulation "
                             f"steps); {self.strategy} cannot accumulate, so leave it unset.")
        if self.all_reduce_dtype != "float32" and self.strategy in ("parameter_server", "dtensor"):
            raise ValueError(f"all_reduce_dtype={self.all_reduce_dtype} works with mirrored and multi_worker "
                             f"training; {self.strategy} does not all-reduce gradients.")
        if self.jit_compile not in JIT_COMPILE:
            raise ValueError(f"jit_compile must be one of: {', '.join(JIT_COMPILE)}; got {self.jit_compile!r}.")
        for name in ("num_classes", "image_size", "epochs", "grad_accum_steps", "steps_per_execution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("batch_size", "per_replica_batch_size", "steps_per_epoch", "validation_steps", "virtual_cpus",
                     "max_per_replica_batch"):
            value, least = getattr(self, name), 0 if name == "validation_steps" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{name} must be {'an integer >= 0' if least == 0 else 'a positive integer'} "
                                 f"when given, got {value!r}.")
        if self.batch_size is not None and self.per_replica_batch_size is not None:
            raise ValueError("Give batch_size (global) or per_replica_batch_size, not both.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if not isinstance(self.lr_reference_batch, int) or self.lr_reference_batch < 0:
            raise ValueError(f"lr_reference_batch must be an integer >= 0 (0: no scaling), got {self.lr_reference_batch!r}.")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be >= 0 and less than epochs ({self.epochs}), got {self.warmup_epochs!r}.")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"lr_decay_rate must be in (0, 1], got {self.lr_decay_rate!r}.")
        self.decay_boundaries_epochs()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive, got {self.width_multiplier!r}.")
        self._validate_patches()
        if self.verbose not in (None, 0, 1, 2):
            raise ValueError(f"verbose must be unset (auto), 0, 1 or 2, got {self.verbose!r}.")
        self.profile_range()
        data.parse(self.data)
        self._validate_fault_tolerance()
        if self.strategy == "dtensor":
            self._validate_dtensor()
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of: {', '.join(repr(n) for n in LAUNCHERS)}; got {self.launcher!r}.")
        if self.launcher:
            self.worker_counts()
        if self.strategy == "pipeline":
            self._validate_pipeline()
        self._validate_balance()
        self._validate_autotune()
        return self

    def worker_counts(self):
        """``workers`` as Ray Train takes it: N, or (MIN, MAX) from "MIN:MAX" (elastic)."""
        value, counts = self.workers, None
        if isinstance(value, int) and not isinstance(value, bool):
            counts = [value]
        elif isinstance(value, str) and re.fullmatch(r"\d+(:\d+)?", value.strip()):
            counts = [int(v) for v in value.strip().split(":")]
        if not counts or counts[0] < 1 or counts[0] > counts[-1]:
            raise ValueError(f"workers must be a positive integer, or MIN:MAX with 1 <= MIN <= MAX, with "
                             f"launcher={self.launcher}; got {value!r}.")
        return counts[0] if len(counts) == 1 else tuple(counts)

    def _validate_patches(self):
        from tfpar import models

        vit = "patch_size" in models.options(self.model)
        if self.patch_size is not None and not vit:
            raise ValueError(f"patch_size applies only to ViT models (vit_ti16, vit_s16, vit_b16, vit_l16); "
                             f"{self.model} does not cut images into patches.")
        if not vit:
            return
        patch = 16 if self.patch_size is None else self.patch_size
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch!r}.")
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {patch}; "
                             f"{self.model} cuts images into whole {patch}x{patch} patches.")

    def autotune_settings(self):
        """The settings ``--autotune`` times: those left at tfpar's choice and not kept."""
        keep = {name.strip() for name in self.autotune_keep.split(",") if name.strip()}
        defaults = {"all_reduce_bucket_mb": 25.0, "all_reduce_dtype": "float32", "grad_accum_steps": 1}
        tuned = ["precision"] if self.precision == "auto" else []  # timed on a model per policy, then the rest
        tuned += ["xla"] if self.jit_compile == "auto" and "jit_compile" not in keep else []
        for field, setting in AUTOTUNE_FIELDS.items():
            if field not in keep and getattr(self, field) == defaults[field]:
                tuned.append(setting)
        if self.balance_batches and "micro_batches" in tuned:
            tuned.remove("micro_batches")  # balanced shares are cut into the micro-batches chosen by hand
        return tuned

    def _validate_autotune(self):
        budget = self.autotune_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
            raise ValueError(f"autotune_budget must be a positive fraction of the run (< 1) or a number of steps, "
                             f"got {budget!r}.")
        keep = [name.strip() for name in self.autotune_keep.split(",") if name.strip()]
        unknown = [name for name in keep if name not in AUTOTUNE_FIELDS and name != "jit_compile"]
        if unknown:
            raise ValueError(f"autotune_keep names {', '.join(unknown)}; it takes: jit_compile, "
                             f"{', '.join(AUTOTUNE_FIELDS)}.")
        if not self.autotune:
            return
        if self.strategy not in AUTOTUNE_STRATEGIES or self.launcher:
            raise ValueError(f"--autotune times trials on one process's devices (strategy "
                             f"{', '.join(AUTOTUNE_STRATEGIES)}); {self.strategy}"
                             f"{' with launcher=' + self.launcher if self.launcher else ''} is not tuned yet.")
        if not self.autotune_settings():
            raise ValueError("--autotune has nothing to tune: precision, jit_compile, all_reduce_bucket_mb, "
                             "all_reduce_dtype and grad_accum_steps are all fixed; leave one to tfpar (e.g. "
                             "--jit_compile=auto or --precision=auto) or drop --autotune.")

    def _validate_balance(self):
        if not isinstance(self.balance_every, int) or isinstance(self.balance_every, bool) or self.balance_every < 1:
            raise ValueError(f"balance_every must be a positive number of steps, got {self.balance_every!r}.")
        if not 0 < self.balance_min_fraction <= 1:
            raise ValueError(f"balance_min_fraction must be in (0, 1] (of an even share), "
                             f"got {self.balance_min_fraction!r}.")
        if not self.balance_batches:
            return
        if self.strategy not in ("mirrored", "multi_worker"):
            raise ValueError(f"balance_batches works with strategy mirrored or multi_worker, got {self.strategy!r}.")
        for name, ok, fix in (("steps_per_execution", self.steps_per_execution == 1, "1"),
                              ("jit_compile", self.jit_compile != "on", "auto or off")):
            if not ok:
                raise ValueError(f"balance_batches needs {name}={fix}, got {getattr(self, name)!r}.")

    def _validate_fault_tolerance(self):
        from tfpar.runtime import backup

        if self.backup_freq not in ("none", "off"):
            backup.parse_freq(self.backup_freq)
        if not self.cluster_timeout > 0:
            raise ValueError(f"cluster_timeout must be a positive number of seconds, got {self.cluster_timeout!r}.")

    def _validate_pipeline(self):
        from tfpar.parallel.pipeline import balance, schedules as pipeline_schedules

        for name in ("stages", "micro_batches", "pipeline_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.pipeline_devices is not None and (not isinstance(self.pipeline_devices, int) or isinstance(
                self.pipeline_devices, bool) or self.pipeline_devices < 1):
            raise ValueError(f"pipeline_devices must be a positive integer, got {self.pipeline_devices!r}.")
        interleaved = self.schedule == "interleaved_1f1b"  # without --pipeline_devices, only M >= S is checked here
        pipeline_schedules.check_shape(self.schedule, self.stages,
                                       self.pipeline_devices or (1 if interleaved else self.stages), self.micro_batches)
        balance.check(self.balance)
        if self.grad_accum_steps > 1:
            raise ValueError("grad_accum_steps does not apply to --strategy=pipeline; its --micro_batches already "
                             "sum the gradients of several micro-batches per update.")
        if self.jit_compile == "on":
            raise ValueError("jit_compile=on does not apply to --strategy=pipeline (its stages run on different "
                             "devices); use jit_compile=auto or off.")
        if self.all_reduce_dtype != "float32":
            raise ValueError("all_reduce_dtype applies to mirrored and multi_worker; --strategy=pipeline sums its "
                             "copies' gradients in float32.")
        per_step = self.micro_batches * self.pipeline_replicas
        if self.batch_size is not None and self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} does not split into {self.micro_batches} micro-batches "
                             f"x {self.pipeline_replicas} pipeline copies; use a multiple of {per_step}.")
        if self.per_replica_batch_size is not None:
            raise ValueError("--strategy=pipeline takes --batch_size (the batch of one step), not "
                             "--per_replica_batch_size.")

    def _validate_dtensor(self):
        if self.mesh is not None and not re.fullmatch(r"[A-Za-z_]\w*=[1-9]\d*(,[A-Za-z_]\w*=[1-9]\d*)*", self.mesh):
            raise ValueError(f"mesh must look like 'batch=2,model=2' (axis=size, comma-separated), got {self.mesh!r}.")
        if self.layout_rules is not None and not os.path.isfile(self.layout_rules):
            raise ValueError(f"layout_rules file {self.layout_rules!r} does not exist.")
        if self.layout_map is not None:
            if self.layout_rules is not None:
                raise ValueError("Give --layout_map or --layout_rules, not both.")
            if not (os.path.isfile(self.layout_map) or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", self.layout_map)):
                raise ValueError(f"layout_map must be module:function (a Keras LayoutMap factory such as "
                                 f"keras_hub.models:GemmaBackbone.get_layout_map) or a JSON file, got {self.layout_map!r}.")

    def profile_range(self):
        """``profile_steps`` "A,B" (or "A") -> ``(A, B)`` with 1 <= A <= B; ``None`` when unset."""
        if not self.profile_steps:
            return None
        parts = str(self.profile_steps).split(",")
        try:
            first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
        except ValueError:
            first = last = None
        if first is None or not 1 <= first <= last:
            raise ValueError(
                f"profile_steps must be 'A,B' with 1 <= A <= B (steps to trace), got {self.profile_steps!r}."
            )
        return first, last

    def decay_boundaries_epochs(self):
        """``lr_decay_epochs`` "30,60,80" -> [30.0, 60.0, 80.0] (increasing, within the run)."""
        if not self.lr_decay_epochs:
            if self.lr_schedule == "step":
                raise ValueError("lr_schedule=step needs lr_decay_epochs, e.g. --lr_decay_epochs=30,60,80.")
            return []
        try:
            values = [float(v) for v in str(self.lr_decay_epochs).split(",")]
        except ValueError:
            values = None
        if not values or values != sorted(values) or values[0] <= 0:
            raise ValueError(f"lr_decay_epochs must be increasing positive epochs like '30,60,80', got {self.lr_decay_epochs!r}.")
        return values

    def global_batch_size(self, replicas):
        """The global batch for ``replicas``: per-replica x replicas, or ``batch_size`` if it divides evenly."""
        if self.per_replica_batch_size is not None:
            return self.per_replica_batch_size * replicas
        batch = self.batch_size or DEFAULT_GLOBAL_BATCH
        if batch % replicas:
            raise ValueError(
                f"batch_size {batch} does not divide evenly over {replicas} replicas; "
                f"use a multiple of {replicas} or --per_replica_batch_size."
            )
        return batch
