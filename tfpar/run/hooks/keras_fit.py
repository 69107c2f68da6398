"""``KerasFit``: the tf.distribute strategies Keras ``fit`` drives (one_device, mirrored, multi_worker, tpu, auto).

What it adds to the skeleton: a backup that resumes at the exact example, peers waited for
and watched (``tfpar.runtime.peers``), each worker reading its shard, and tfpar's step
installers after ``compile`` (all-reduce dtype, XLA, accumulation, buckets, worker timing).
"""

import dataclasses
import os

from tfpar.run.config import AUTOTUNE_STRATEGIES
from tfpar.run.hooks.base import Hook


class KerasFit(Hook):
    compile_options = {"jit_compile": False}  # tfpar.step.xla compiles per replica instead (DESIGN item 15)

    def __init__(self, config, info, print_fn=print):
        super().__init__(config, info, print_fn)
        self.backup = None  # the run's BackupAndRestore, or None with backups off
        self.jit = False
        self.timing = None  # the stragglers.WorkerTimes callback, or None
        self.reduce_dtype = self.bucket_mb = None
        self._batch = None  # the global batch once planned
        self.elastic_line = None  # "resuming epoch ... on M workers (backup written by N) ..."
        self.micro = config.grad_accum_steps  # micro-batches per update (--autotune may choose another)
        self.autotune = None  # what --autotune (or its cache, for jit_compile=auto) decided, for summary.json
        self.precision_tuned = None  # --precision=auto --autotune: the precision trials' report
        self.budget_spent = 0  # steps of --autotune_budget the precision trials took

    def connect(self):
        from tfpar.runtime import backup, elastic

        # Refuse a foreign or damaged backup before anything is written.
        self.backup = backup.for_run(self.config, self.info, print_fn=self.print_fn,
                                     family=elastic.family(self.config.strategy))
        self.strategy = self._make_strategy()
        self.replicas = self.strategy.num_replicas_in_sync

    def global_batch(self):
        """The global batch of one micro-batch; a backup's examples per update are kept (``tfpar.runtime.elastic``).

        When the update has to be cut up otherwise than the config says (a resume on
        another worker count, ``max_per_replica_batch``), ``self.config`` becomes a
        copy with that batch and accumulation, which the rest of the run reads.
        """
        if self._batch is None:
            self._batch = self._plan_batch()
        return self._batch

    def _plan_batch(self):
        from tfpar.runtime import elastic

        config, backup = self.config, self.backup
        theirs = backup.resumed_update() if backup is not None else None
        if elastic.family(config.strategy) not in elastic.ELASTIC or not (theirs or config.max_per_replica_batch):
            batch = super().global_batch()
        else:
            update = theirs
            if not theirs or config.allow_batch_change:
                update = config.global_batch_size(self.replicas) * config.grad_accum_steps
            batch, accum = elastic.plan_batch(update, self.replicas, config.max_per_replica_batch,
                                              config.grad_accum_steps if update % config.grad_accum_steps == 0 else 1)
            self.config = dataclasses.replace(config, batch_size=batch, per_replica_batch_size=None,
                                              grad_accum_steps=accum)
        if backup is not None:
            backup.examples_per_update = batch * self.config.grad_accum_steps
            resume = backup.resume
            if resume is not None and resume.num_workers not in (None, self.info.num_workers):
                self.elastic_line = elastic.resume_line(resume, self.info.num_workers, batch,
                                                        self.config.grad_accum_steps)
        return batch

    def _make_strategy(self):
        from tfpar.runtime import peers, strategies

        with peers.within(self.config.cluster_timeout, self.info):  # never wait forever for peers
            return strategies.create(self.config.strategy, virtual_cpus=self.config.virtual_cpus)

    def _readers(self):
        """How many processes split the data: with balance_batches every worker reads the whole stream."""
        return 1 if self.config.balance_batches else self.info.num_workers

    def reading(self):
        readers = self._readers()
        skip = self.backup.examples_before() if self.backup is not None else 0
        return dict(num_workers=readers, worker_index=self.info.task_index if readers > 1 else 0,
                    micro_batches=self.config.grad_accum_steps,
                    skip_examples=skip)  # resumes at the backup's exact example

    def _resolve_jit(self):
        from tfpar.step import xla

        return xla.resolve(self.config.jit_compile, self.strategy)

    def install(self, model, global_batch):
        from tfpar.step import all_reduce, steps, xla

        config = self.config
        self.jit = self._resolve_jit()
        if config.jit_compile == "auto" and not config.autotune and config.strategy in AUTOTUNE_STRATEGIES:
            self._cached_jit(model)
        self.reduce_dtype = all_reduce.apply(model.optimizer, config.all_reduce_dtype, self.replicas)
        xla.enable(model, self.jit)  # per-replica XLA steps; Keras's own jit fails under strategies
        steps.accumulate(model, config.grad_accum_steps)  # one all-reduce per accum micro-batches
        self.bucket_mb = all_reduce.buckets(model, config.all_reduce_bucket_mb)  # overlap the backward pass

    def _cached_jit(self, model):
        """``jit_compile=auto``: an earlier ``--autotune`` of this model on these devices decides, else the rule."""
        from tfpar.run import autotune

        found = autotune.cached_xla(model)
        if found is not None:
            self.jit, path = found
            self.autotune = {"cached": path, "choice": {"xla": self.jit}}
            if self.speaks:
                self.print_fn(f"jit_compile=auto: XLA {'on' if self.jit else 'off'}, as --autotune chose for this "
                              f"model and devices ({path}).")

    def tune_precision(self, remake, trial_model):
        """``--precision=auto --autotune``: time a model built under each policy this machine can run."""
        from tfpar.run import autotune
        from tfpar.runtime import precision

        config = self.config
        if not (config.autotune and config.precision == "auto"):
            return config.precision
        policies = precision.candidates(self.strategy)
        if len(policies) < 2:
            if self.speaks:
                self.print_fn(f"autotune: precision auto is {policies[0]} here; these devices run no other policy "
                              f"fast, so it is not timed.")
            return policies[0]
        pipes = remake()
        planned = config.epochs * pipes.steps_per_epoch
        max_trials = autotune.budget_trials(config.autotune_budget, planned)
        policy, self.precision_tuned = autotune.tune_precision(
            lambda name: trial_model(name, pipes), lambda: pipes.train, policies,
            batch_size=self.global_batch() * config.grad_accum_steps, max_trials=max_trials,
            print_fn=self.print_fn if self.speaks else None)
        if self.precision_tuned["cached"] is None:
            self.budget_spent = len(self.precision_tuned["trials"]) * autotune.TRIAL_STEPS
        return policy

    def tune(self, model, pipes, remake):
        """``--autotune``: time the settings left to tfpar on this model, pipeline and strategy; keep the fastest."""
        from tfpar.core import tuning
        from tfpar.run import autotune

        config = self.config
        settings = [name for name in config.autotune_settings() if name != "precision"]
        if not config.autotune or not settings:
            self._record()
            return
        planned = config.epochs * pipes.steps_per_epoch
        budget = config.autotune_budget
        if self.budget_spent:  # the precision trials spent part of it: the rest, in steps
            left = autotune.budget_steps(budget, planned) - self.budget_spent
            if left < autotune.TRIAL_STEPS:
                if self.speaks:
                    self.print_fn("autotune: the budget went to the precision trials; the other settings keep "
                                  "tfpar's choice (raise --autotune_budget to time them).")
                self._record()
                return
            budget = left
        try:
            self.autotune = autotune.autotune(
                model, self.strategy, lambda: remake().train, batch_size=self.global_batch() * config.grad_accum_steps,
                tune=settings, budget=budget, planned_steps=planned, print_fn=self.print_fn if self.speaks else None)
        except tuning.NothingToTune as nothing:
            if self.precision_tuned is None:
                raise
            if self.speaks:  # the precision was tuned; the model leaves nothing else to time
                self.print_fn(f"autotune: {str(nothing)[0].lower()}{str(nothing)[1:]}")
        now = autotune.current_setting(model)
        self.jit, self.micro = now["xla"], now["micro_batches"]
        self.reduce_dtype, self.bucket_mb = now["all_reduce_dtype"], now["bucket_mb"]
        self._record()

    def _record(self):
        """The autotune report in summary.json and, on the chief, TensorBoard's text tab."""
        from tfpar.run import callbacks

        if self.precision_tuned is not None:
            self.autotune = {**(self.autotune or {}), "precision": self.precision_tuned}
        if self.autotune is None or not self.config.autotune:
            return
        if self.info.is_chief and self.config.tensorboard:
            lines = []
            for report in (self.precision_tuned, self.autotune if "trials" in self.autotune else None):
                if report is not None:
                    lines += (report["table"] or [f"cached: {report['cached']}"]) + [f"chosen: {report['choice']}", ""]
            callbacks.write_text(self.model_dir, "autotune", "\n".join("    " + line for line in lines))

    def callbacks(self, model, global_batch, pipes, extra):
        from tfpar.run import callbacks
        from tfpar.core import devices

        config, info = self.config, self.info
        cbs, self.throughput = callbacks.for_run(
            config, self.model_dir, info.is_chief, global_batch * config.grad_accum_steps, pipes.val is not None,
            print_fn=self.print_fn, task_name=info.task_name,
            multi_worker=devices.is_multi_worker(self.strategy))
        cbs.extend(extra)
        cbs.extend(self._more_callbacks())
        self.timing = self._worker_times(model, global_batch)
        if self.timing is not None:
            cbs.append(self.timing)
        if self.backup is not None:
            cbs.insert(0, self.backup)  # first: it sets the initial epoch before the others begin
        return cbs

    def _more_callbacks(self):
        return []

    def _timing_unsupported(self, model):
        """Why worker timing cannot run here (a phrase), or None."""
        from tfpar.step import stragglers

        return stragglers.supported(model)

    def _worker_times(self, model, global_batch):
        """``tfpar.step.stragglers``: the timed (with balance_batches, sliced) step and its callback, or None."""
        from tfpar.step import stragglers

        config, info = self.config, self.info
        reason = self._timing_unsupported(model)
        if reason and config.balance_batches:
            raise ValueError(f"balance_batches cannot be used here: {reason}.")
        if reason or not (config.worker_times or config.balance_batches):
            return None
        examples = global_batch * config.grad_accum_steps  # one update's examples: shares hold whole micro-batches
        state = stragglers.enable(model, examples, balance=config.balance_batches)
        replicas = self.replicas
        local = max(1, replicas // max(1, info.num_workers))
        if info.num_workers > 1:
            names = [f"worker {i // local}" + (f" replica {i % local}" if local > 1 else "") for i in range(replicas)]
        else:
            names = [f"replica {i}" for i in range(replicas)]
        return stragglers.WorkerTimes(
            state, names, every=config.balance_every,
            minimum=stragglers.minimum_share(examples, replicas, config.balance_min_fraction),
            log_dir=os.path.join(self.model_dir, "workers_timing") if config.tensorboard and info.is_chief else None,
            print_fn=self.print_fn if info.is_chief else None)

    def fit_options(self, pipes):
        options = super().fit_options(pipes)
        if self.timing is not None and self.config.balance_batches:
            from tfpar.step import stragglers

            options["x"] = stragglers.distribute(self.strategy, options["x"])
        return options

    def start_lines(self, global_batch, policy, peak, pipes):
        accum = self.micro
        global_batch = global_batch * self.config.grad_accum_steps // accum  # --autotune keeps the update's batch
        summed = f", gradients summed in {self.reduce_dtype}" if self.replicas > 1 else ""
        summed += f" in {self.bucket_mb:g} MiB buckets" if summed and self.bucket_mb else ""
        micro = f" x {accum} micro-batches per update" if accum > 1 else ""
        first = [self.elastic_line] if self.elastic_line else []  # a resume on another worker count
        return first + [f"{self.name()}: global batch {global_batch}{micro}{summed}, precision {policy}, "
                        f"peak learning rate {peak:.4g}, {pipes.steps_per_epoch} steps/epoch"]

    def guard(self):
        from tfpar.runtime import peers

        return peers.stay(self.info, self.config.cluster_timeout)  # a peer lost mid-run: one line, exit 69

    def epochs_before(self):
        resumed = self.backup.resumed if self.backup is not None else None
        return resumed["epoch"] if resumed else 0

    def _examples_seen(self):
        """Examples trained in the whole run, resumed ones once: one update's examples per step."""
        if self.backup is not None:
            return self.backup.examples()
        steps = sum(epoch["steps"] for epoch in self.throughput.epochs)
        return steps * self.global_batch() * self.config.grad_accum_steps

    def summary(self, model, history, pipes):
        from tfpar.step import xla

        return {
            **super().summary(model, history, pipes),
            "examples_per_update": self.global_batch() * self.config.grad_accum_steps,
            "all_reduce_dtype": self.reduce_dtype,
            "all_reduce_bucket_mb": self.bucket_mb,
            "jit_compile": self.jit,
            **({"autotune": self.autotune} if self.autotune is not None else {}),
            "xla_steps": xla.state(model),
            "resumed_from": self.backup.resumed if self.backup is not None else None,
            "examples_seen": self._examples_seen(),
            "throughput": self.throughput.epochs,  # per epoch: examples_per_sec, step_time_ms, steps
            **({"worker_times": self.timing.report()} if self.timing is not None else {}),
        }
