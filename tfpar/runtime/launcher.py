"""``tfpar-launch``: run a small TensorFlow cluster of local processes on 127.0.0.1.

Each task is one process with its own ``TF_CONFIG``; their output is streamed
with a ``[worker-0]`` prefix. When a task fails (or on Ctrl-C / SIGTERM) every
process group is stopped and the launcher exits with the first failure's code.

Structure: ``plan()`` builds the tasks, ``Supervisor`` starts them and
watches them, and on each failure asks its ``restart_policy`` whether to
start the task again. ``--restarts K`` (``restart_up_to(K)``) restarts the
*whole cluster* (MultiWorkerMirroredStrategy cannot take back one worker:
its peers are stuck in collectives with the dead one), on fresh ports, up to
K times; training resumes from its backup (``tfpar.runtime.backup``).
"""

import argparse
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from tfpar.core import quiet
from tfpar.runtime import hostsfile, peers, server

HOST = "127.0.0.1"
STOP_GRACE_SEC = 5.0  # after a task failed: its peers are stuck in collectives, no save is coming
PREEMPT_GRACE_SEC = 30.0  # after the launcher itself got SIGTERM/Ctrl-C: tfpar-train saves a backup (25 s grace)
EXIT_TIMEOUT = 124

DESCRIPTION = """\
Run COMMAND as a TensorFlow cluster of processes on 127.0.0.1.

Topologies (every process gets TF_CONFIG with the whole cluster and its own task):
  --workers N            N tasks worker:0..N-1, each runs COMMAND
                         (MultiWorkerMirroredStrategy; worker 0 is the chief).
  --workers N --ps M     chief:0 runs COMMAND (the ParameterServerStrategy
                         coordinator), plus worker:0..N-1 and ps:0..M-1, which run
                         a built-in tf.distribute.Server until the chief is done
                         (--servers=command makes them run COMMAND instead).
The run succeeds when every COMMAND task exits 0; servers are then stopped.
If any task fails, or on Ctrl-C/SIGTERM, all process groups are stopped and
the exit code is the first failure's (128+N for a signal, 124 for --timeout).
With --restarts K, a failure (any exit code but 2, a user error) instead
stops every task and starts the whole cluster again, up to K times; exit
code 75 is tfpar-train's "preempted, backup saved".
With --min_workers K as well, a worker that fails again right after a restart
caused by it (its host is gone) is left out: the cluster restarts without it,
renumbered, and tfpar-train resumes its backup on the smaller cluster with the
same global batch. Below K workers the launcher stops with exit code 69.
With --hosts FILE (one host per line) instead of --workers, the worker count
is the number of hosts listed, at most --max_workers, and FILE is read again
at each restart: a host added to it joins the cluster at the next restart, a
host taken out of it leaves; tfpar-train resumes its backup on the new count.
"""


@dataclasses.dataclass
class Task:
    """One process of the cluster."""

    task_type: str
    index: int
    address: str
    argv: list
    is_server: bool = False  # runs until stopped; its exit is a failure, never success

    @property
    def name(self):
        return f"{self.task_type}-{self.index}"


def free_ports(count, host=HOST):
    """``count`` distinct ports the OS reports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def server_argv():
    """The command a built-in server task runs: ``python -m tfpar.runtime.launcher --serve``."""
    return [sys.executable, "-m", "tfpar.runtime.launcher", "--serve"]


def plan(command, workers, ps=0, port_base=None, servers="builtin", host=HOST):
    """The tasks of the cluster, each with its address and command line."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}.")
    if ps < 0:
        raise ValueError(f"--ps must be 0 or more, got {ps}.")
    if not command:
        raise ValueError("No COMMAND given; put it after '--', e.g. tfpar-launch --workers 2 -- tfpar-train ...")
    if servers not in ("builtin", "command"):
        raise ValueError(f"--servers must be 'builtin' or 'command', got {servers!r}.")
    layout = [("chief", 1)] if ps else []
    layout += [("worker", workers)] + ([("ps", ps)] if ps else [])
    total = sum(n for _, n in layout)
    if port_base is not None:
        if not 1024 <= port_base <= 65535 - total:
            raise ValueError(f"--port-base must leave room for {total} ports in 1024..65535, got {port_base}.")
        ports = list(range(port_base, port_base + total))
    else:
        ports = free_ports(total, host)
    tasks, port = [], iter(ports)
    for task_type, count in layout:
        builtin_server = bool(ps) and task_type != "chief" and servers == "builtin"
        for index in range(count):
            tasks.append(Task(task_type, index, f"{host}:{next(port)}",
                              server_argv() if builtin_server else list(command),
                              is_server=bool(ps) and task_type != "chief"))
    return tasks


def cluster_spec(tasks):
    spec = {}
    for task in tasks:
        spec.setdefault(task.task_type, []).append(task.address)
    return spec


def tf_config(tasks, task):
    return json.dumps({"cluster": cluster_spec(tasks), "task": {"type": task.task_type, "index": task.index}})


# --- restart policies: (task, exit_code, restarts_so_far) -> bool -----------

def never_restart(task, exit_code, restarts):
    """The default policy: a failed task ends the run."""
    return False


EXIT_USAGE = 2  # tfpar-train's "you asked for something wrong": restarting cannot help


def restart_up_to(limit):
    """``--restarts K``: restart after any failure but a usage error, at most ``limit`` times in all."""
    def policy(task, exit_code, restarts):
        return exit_code != EXIT_USAGE and restarts < limit

    return policy


def with_fresh_ports(tasks, host=HOST):
    """The same tasks on newly free ports (a restarted cluster must not meet its old sockets)."""
    ports = free_ports(len(tasks), host)
    return [dataclasses.replace(t, address=f"{host}:{port}") for t, port in zip(tasks, ports)]


def exit_code_of(returncode):
    """A shell-style exit code: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Starts the tasks, streams their output, and stops them all on the first failure."""

    def __init__(self, tasks, env=None, timeout=None, restart_policy=never_restart, out=None, fresh_ports=True,
                 tf_log_level=None, min_workers=None, hosts=None, max_workers=None):
        self.tasks = tasks
        self.hosts, self.max_workers = hosts, max_workers  # --hosts FILE, read again at each restart
        self.min_workers = min_workers  # leave out a worker that fails again right after its restart, down to this
        self.last_failed = None  # the task whose failure caused the last restart
        self.env = dict(os.environ if env is None else env)
        # The tasks' TensorFlow C++ log level (tfpar.core.quiet): --tf_log_level, else the user's, else 2.
        self.tf_log_level = quiet.level(tf_log_level, self.env)
        self.env[quiet.ENV] = str(self.tf_log_level)
        self.timeout = timeout
        self.restart_policy = restart_policy
        self.out = out or sys.stdout
        self.procs = {}  # task name -> Popen
        self.restarts = 0  # whole-cluster restarts so far
        self.fresh_ports = fresh_ports
        self.stop_grace = STOP_GRACE_SEC  # SIGTERM-to-SIGKILL wait; longer when the launcher is preempted
        self._lock = threading.Lock()
        self._readers = []

    def _print(self, line):
        with self._lock:
            self.out.write(line)
            self.out.flush()

    def _stream(self, task, proc):
        prefix = f"[{task.name}] "
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if quiet.keep(line, self.tf_log_level):
                self._print(prefix + line + "\n")
        proc.stdout.close()

    def start(self, task):
        env = dict(self.env, TF_CONFIG=tf_config(self.tasks, task), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(task.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[task.name] = proc
        reader = threading.Thread(target=self._stream, args=(task, proc), daemon=True)
        reader.start()
        self._readers.append(reader)
        return proc

    def stop_all(self):
        """SIGTERM every live process group, then SIGKILL what is left after a grace period."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in live:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (self.stop_grace if sig == signal.SIGTERM else STOP_GRACE_SEC)
            while time.monotonic() < deadline and any(p.poll() is None for p in live):
                time.sleep(0.05)
            live = [p for p in live if p.poll() is None]
            if not live:
                break
        for proc in self.procs.values():  # a finished leader may leave children in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for reader in self._readers:
            reader.join(timeout=2.0)

    def run(self):
        """Run to completion; return the launcher's exit code."""
        try:
            for task in self.tasks:
                self.start(task)
            return self._watch()
        finally:
            self.stop_all()

    def _restart_all(self):
        """Stop every task, then start the whole cluster again (on fresh ports unless --port-base)."""
        self.stop_all()
        self.procs.clear()
        if self.fresh_ports:
            self.tasks = with_fresh_ports(self.tasks)
        for task in self.tasks:
            self.start(task)

    def _resize(self):
        """With --hosts: the workers of the next restart, from the file as it is now; an exit code to stop."""
        if not self.hosts:
            return None
        try:
            wanted = hostsfile.worker_count(self.hosts, self.max_workers)
        except ValueError as err:
            self._print(f"[launcher] {err} Stopping all tasks.\n")
            return peers.EXIT_UNREACHABLE
        workers = [t for t in self.tasks if t.task_type == "worker"]
        if wanted == len(workers):
            return None
        if self.min_workers and wanted < self.min_workers:
            self._print(f"[launcher] the hosts file {self.hosts} lists {wanted} worker(s), below --min_workers "
                        f"{self.min_workers}; stopping all tasks\n")
            return peers.EXIT_UNREACHABLE
        resized = [dataclasses.replace(workers[min(i, len(workers) - 1)], index=i) for i in range(wanted)]
        self._print(f"[launcher] the hosts file {self.hosts} lists {wanted} worker(s): workers "
                    f"{', '.join(t.name for t in workers)} -> {', '.join(t.name for t in resized)}\n")
        self.tasks = [t for t in self.tasks if t.task_type != "worker"] + with_fresh_ports(resized)
        return None

    def _leave_out(self, lost):
        """``lost`` failed again right after the restart it caused: restart without it, or stop below the minimum."""
        workers = [t for t in self.tasks if t.task_type == "worker"]
        before = ", ".join(t.name for t in workers)
        if len(workers) - 1 < self.min_workers:
            self._print(f"[launcher] {lost.name} failed again after a restart; {len(workers) - 1} worker(s) would be "
                        f"below --min_workers {self.min_workers}; lost: {lost.name}; stopping all tasks\n")
            return peers.EXIT_UNREACHABLE
        kept = [t for t in workers if t.name != lost.name]
        renumbered = [dataclasses.replace(t, index=i) for i, t in enumerate(kept)]
        after = ", ".join(t.name for t in renumbered)
        self._print(f"[launcher] {lost.name} failed again after a restart; left out: workers {before} -> {after}\n")
        self.tasks = [t for t in self.tasks if t.task_type != "worker"] + renumbered
        self.last_failed = None
        self._restart_all()
        return self._watch()

    def _watch(self):
        if getattr(self, "_deadline", None) is None and self.timeout:
            self._deadline = time.monotonic() + self.timeout  # one deadline for the whole run, restarts included
        deadline = getattr(self, "_deadline", None)
        pending = {t.name for t in self.tasks if not t.is_server}
        by_name = {t.name: t for t in self.tasks}
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                self._print(f"[launcher] timeout after {self.timeout:g} s; stopping all tasks\n")
                return EXIT_TIMEOUT
            for name, proc in list(self.procs.items()):
                returncode = proc.poll()
                if returncode is None:
                    continue
                task = by_name[name]
                if returncode == 0 and not task.is_server:
                    pending.discard(name)
                    del self.procs[name]
                    continue
                code = exit_code_of(returncode) or 1  # a server that exits, even with 0, is a failure
                if self.min_workers and name == self.last_failed and code != EXIT_USAGE:
                    return self._leave_out(task)
                if self.restart_policy(task, code, self.restarts):
                    self.last_failed = name
                    self.restarts += 1
                    self._print(f"[launcher] {name} exited with {code}; restarting all tasks (restart {self.restarts})\n")
                    stop = self._resize()
                    if stop is not None:
                        return stop
                    self._restart_all()
                    pending = {t.name for t in self.tasks if not t.is_server}
                    by_name = {t.name: t for t in self.tasks}
                    break
                self._print(f"[launcher] {name} failed with exit code {code}; stopping all tasks\n")
                return code
            time.sleep(0.1)
        return 0


def serve():
    """``tfpar-launch --serve``: the built-in server of a worker or ps task (its TF_CONFIG), until killed."""
    quiet.start_tensorflow()
    server.serve(line="serving {job}:{index} at {target}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tfpar-launch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s (--workers N | --hosts FILE [--max_workers M]) [--ps M] [--port-base P] "
                                           "[--timeout S] [--restarts K [--min_workers K]] "
                                           "[--tf_log_level L] -- COMMAND...")
    parser.add_argument("--workers", type=int, default=None, help="worker tasks (default 2)")
    parser.add_argument("--hosts", default=None, metavar="FILE",
                        help="instead of --workers: one worker per host listed in FILE (one a line), read again at "
                             "each restart, so a host added to FILE joins at the next restart")
    parser.add_argument("--max_workers", type=int, default=None,
                        help="with --hosts: at most M workers, whatever FILE lists")
    parser.add_argument("--ps", type=int, default=0, help="parameter-server tasks; adds a chief that runs COMMAND")
    parser.add_argument("--port-base", type=int, default=None,
                        help="use consecutive ports from P (chief, workers, ps); default: free ports")
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after S seconds (exit 124)")
    parser.add_argument("--restarts", type=int, default=0,
                        help="restart the whole cluster after a task fails, up to K times (default 0)")
    parser.add_argument("--min_workers", type=int, default=None,
                        help="with --restarts: leave out a worker that fails again right after the restart it "
                             "caused, down to K workers (then exit 69); training resumes on the others")
    parser.add_argument("--servers", default="builtin", choices=("builtin", "command"),
                        help="with --ps: what worker and ps tasks run (default: a built-in tf.distribute.Server)")
    parser.add_argument("--tf_log_level", type=int, default=None, choices=quiet.LEVELS,
                        help="TensorFlow's C++ log level for every task: 0 all, 1 no INFO, 2 errors only (default, "
                             "or TF_CPP_MIN_LOG_LEVEL if set), 3 fatal only")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program every COMMAND task runs, after '--'")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.hosts is not None and not args.serve:
        if args.workers is not None or args.ps:
            parser.error("--hosts sets the number of workers; drop --workers and --ps")
        if args.max_workers is not None and args.max_workers < 1:
            parser.error(f"--max_workers must be at least 1, got {args.max_workers}")
        try:
            args.workers = hostsfile.worker_count(args.hosts, args.max_workers)
        except ValueError as err:
            parser.error(str(err))
    elif args.max_workers is not None:
        parser.error("--max_workers needs --hosts FILE (the workers a restart may add)")
    if args.workers is None:
        args.workers = 2
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    if args.restarts < 0:
        parser.error(f"--restarts must be 0 or more, got {args.restarts}")
    if args.min_workers is not None:
        if not 1 <= args.min_workers <= args.workers:
            parser.error(f"--min_workers must be between 1 and --workers ({args.workers}), got {args.min_workers}")
        if args.ps or not args.restarts:
            parser.error("--min_workers needs --restarts of at least 1 and no --ps (a worker is left out when it "
                         "fails again after a restart)")
    return parser, args


def main(argv=None):
    parser, args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve:
        serve()
        return 0
    try:
        tasks = plan(args.command, args.workers, args.ps, args.port_base, args.servers)
    except ValueError as err:
        parser.error(str(err))
    policy = restart_up_to(args.restarts) if args.restarts else never_restart
    supervisor = Supervisor(tasks, timeout=args.timeout, restart_policy=policy,
                            fresh_ports=args.port_base is None, tf_log_level=args.tf_log_level,
                            min_workers=args.min_workers, hosts=args.hosts, max_workers=args.max_workers)

    def on_signal(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):  # one stop is enough; stop_all escalates itself
            signal.signal(sig, signal.SIG_IGN)
        supervisor._print(f"[launcher] got signal {signum}; stopping all tasks (they may save a backup first)\n")
        supervisor.stop_grace = PREEMPT_GRACE_SEC
        raise SystemExit(128 + signum)  # unwinds through Supervisor.run's finally: stop_all

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    for task in tasks:
        supervisor._print(f"[launcher] {task.name} at {task.address}: {shlex.join(task.argv)}\n")
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
