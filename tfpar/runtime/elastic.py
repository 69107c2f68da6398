"""Elastic worker counts: a backup written by N workers resumes on M, with the same updates.

What stays the same across the change is what the optimizer sees: the examples
of one update (the global batch times the gradient-accumulation steps), their
order in the data stream, and the step count the learning-rate schedule reads.
What may change is how one update is cut up: ``plan_batch`` splits it evenly
over the new replicas, in the fewest gradient-accumulation steps that keep a
replica's share under ``max_per_replica_batch`` (fewer workers mean more
examples each). Only the synchronous
data-parallel strategies can do this; a parameter-server, pipeline or DTensor
backup is tied to its cluster shape or its layouts, so it is refused in one
sentence (``check``). No TensorFlow here.
"""

FAMILIES = {"auto": "data_parallel", "one_device": "data_parallel", "mirrored": "data_parallel",
            "multi_worker": "data_parallel", "tpu": "data_parallel",
            "parameter_server": "parameter_server", "pipeline": "pipeline", "dtensor": "dtensor"}
ELASTIC = ("data_parallel",)  # the families whose backups resume on another number of workers
REMEDY = "use a new model_dir or backup_dir, or delete that backup to start over"


def family(strategy_name):
    """The strategy family a backup records: runs of one family share a checkpoint's meaning."""
    return FAMILIES.get(strategy_name, strategy_name)


def check(backup, directory, this_family, num_workers, wanted_update=None, allow_batch_change=False):
    """Raise ``ValueError`` (one sentence) when ``backup`` cannot resume in this run.

    ``wanted_update``: the examples per update this run asks for explicitly
    (None when it only gave a per-replica batch, which follows the backup's).
    """
    recorded = backup.run or {}
    theirs = recorded.get("family")
    if theirs is not None and theirs != this_family:
        raise ValueError(f"The backup in {directory} was written by a {theirs} run but this run is {this_family}; "
                         f"{REMEDY}.")
    if backup.num_workers is not None and backup.num_workers != num_workers:
        if theirs not in ELASTIC or this_family not in ELASTIC:
            raise ValueError(
                f"The backup in {directory} was written by {backup.num_workers} worker(s) but this cluster has "
                f"{num_workers}, and only one_device, mirrored and multi_worker backups resume on another number "
                f"of workers; restart with {backup.num_workers} workers, or delete that backup to start over.")
    update = recorded.get("examples_per_update")
    if update and wanted_update and wanted_update != update and not allow_batch_change:
        raise ValueError(
            f"The backup in {directory} trained with {update} examples per update but this run asks for "
            f"{wanted_update}; resume with the same --batch_size and --grad_accum_steps, or pass "
            f"--allow_batch_change to continue with the new batch.")


def plan_batch(examples_per_update, replicas, max_per_replica=None, accum=1):
    """(global batch, accumulation steps) that make ``examples_per_update`` on ``replicas`` replicas.

    The fewest accumulation steps from ``accum`` up whose micro-batch splits
    evenly over the replicas and holds at most ``max_per_replica`` per replica.
    """
    for steps in range(max(1, accum), examples_per_update + 1):
        if examples_per_update % steps:
            continue
        batch = examples_per_update // steps
        if batch % replicas == 0 and (not max_per_replica or batch // replicas <= max_per_replica):
            return batch, steps
    raise ValueError(f"{examples_per_update} examples per update cannot be split evenly over {replicas} replicas; "
                     f"resume on a number of replicas that divides {examples_per_update}.")


def resume_line(backup, num_workers, global_batch, accum):
    """The one line a run resumed on another worker count prints."""
    per_worker = global_batch // max(1, num_workers)
    kept = f"{per_worker} per worker" if accum == 1 else f"{accum} x {per_worker} per worker (gradient accumulation)"
    return (f"resuming epoch {backup.epoch + 1} step {backup.batch} on {num_workers} worker(s) (backup written by "
            f"{backup.num_workers}): global batch {global_batch * accum} kept as {kept}")
