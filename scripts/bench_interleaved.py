"""Benchmark cases for interleaved 1F1B beside 1F1B at the same micro-batch count M and devices D.

Interleaving V = 2 stages per device shortens the bubble from (D-1)/(M+D-1)
to (D-1)/(2M+D-1) at the price of twice the cuts per micro-batch (each
device sends and receives at both of its stages). ``scripts/benchmark.py``
measures these cases with the rest of ``pipeline`` and in
``pipeline_interleaved_processes`` (one stage copy per one-core process).
"""


def _pipeline(case, name, stages, micro, schedule, **options):
    return dict(case, name=name, kind="tfpar", strategy="pipeline", pipeline_trace=True,
                train_options=dict(case.get("train_options", {}), stages=stages, micro_batches=micro,
                                   schedule=schedule, balance="time", **options))


def one_process(case, micro=8):
    """On 2 logical CPUs of one process: 2 stages with 1F1B, then 4 stages (2 a device) interleaved."""
    model = case["model"]
    return [dict(_pipeline(case, f"{model} 2 stages, 1f1b, {micro} micro-batches", 2, micro, "1f1b"),
                 virtual_cpus=2),
            dict(_pipeline(case, f"{model} 4 stages on 2 devices, interleaved_1f1b, {micro} micro-batches", 4, micro,
                           "interleaved_1f1b", pipeline_devices=2), virtual_cpus=2)]


def two_processes(quick, model="resnet18", micro=8, image=32, batch=None, train_options=None, schedules=("1f1b",),
                  data_parallel=False):
    """1 process; then 2 one-core processes: 2 stages (each of ``schedules``), 4 stages (2 a task) interleaved.

    Every pipelined case runs M = ``micro`` micro-batches of the 1-process batch. ``data_parallel`` adds 2
    workers data parallel on the same global batch (a ``micro``-fold batch per worker), for images/sec
    against the pipeline on the same processes.
    """
    one = dict(windows=1 if quick else 2, warmup_windows=1, steps=3 if quick else 4, classes=10, model=model,
               image=image, batch=batch or (8 if quick else 16), pin=True, strategy="one_device", kind="tfpar",
               train_options=dict(train_options or {}))
    piped = dict(one, workers=2, batch=micro * one["batch"], steps=3)
    cases = [dict(one, name=f"{model} 1 process, 1 core")]
    if data_parallel:
        cases.append(dict(piped, strategy="multi_worker",
                          name=f"{model} 2 processes, data parallel, {micro * one['batch'] // 2} a worker"))
    cases += [_pipeline(piped, f"{model} 2 processes, 2 stages, {schedule}, {micro} micro-batches of {one['batch']}",
                        2, micro, schedule) for schedule in schedules]
    cases.append(_pipeline(piped, f"{model} 2 processes, 4 stages (2 a process), interleaved_1f1b, {micro} "
                           f"micro-batches of {one['batch']}", 4, micro, "interleaved_1f1b"))
    return cases
