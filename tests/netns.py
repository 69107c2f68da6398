"""Hosts as Linux network namespaces: a small cluster with real addresses on one machine.

``make(count)`` creates ``count`` namespaces ("hosts"), each with one
interface ``eth0`` at ``198.18.0.<i+1>/24``, joined by veth pairs to a bridge
that lives in a namespace of its own. Nothing is added to the machine's own
network namespace, and 198.18.0.0/24 (RFC 2544 benchmarking space) exists only
between these namespaces, so no test traffic can leave the machine.

Names carry the creating process's pid (``tfpar-<pid>-<tag>-...``), so a run
that crashed before its clean-up is recognised by the next one and removed
(``remove_stale()``); concurrent runs never collide. Every process a test
starts in a host is in its own session and is SIGKILLed with its group in
``Cluster.close()``, which also deletes the namespaces.
"""

import os
import re
import secrets
import shutil
import subprocess

from helpers import reap

PREFIX = "tfpar"
SUBNET = "198.18.0"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(br|h\d+)$")


class Unavailable(Exception):
    """Namespaces cannot be made here; the message says why (the tests skip with it)."""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason():
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed; apt-get install iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, e.g. in the CI container)"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-br"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode:
        return f"'ip netns add' failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "delete", probe, check=False)
    return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces():
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale():
    """Delete tfpar namespaces whose creating process is gone (a crashed or killed earlier run)."""
    removed = []
    for name in list_namespaces():
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


class Cluster:
    """``count`` hosts on one bridge; ``start()`` runs a command in a host; ``close()`` removes everything."""

    def __init__(self, count):
        tag = secrets.token_hex(3)
        base = f"{PREFIX}-{os.getpid()}-{tag}"
        self.bridge_ns = f"{base}-br"
        self.hosts = [f"{base}-h{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.procs = []
        self._made = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        self.exec_ip(self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self.exec_ip(self.bridge_ns, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(zip(self.hosts, self.addresses)):
            _ip("netns", "add", host)
            self._made.append(host)
            # veth pair: "port<i>" on the bridge, "eth0" in the host.
            self.exec_ip(self.bridge_ns, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0",
                         "netns", host)
            self.exec_ip(self.bridge_ns, "link", "set", f"port{i}", "master", "br0")
            self.exec_ip(self.bridge_ns, "link", "set", f"port{i}", "up")
            self.exec_ip(host, "addr", "add", f"{address}/24", "dev", "eth0")
            self.exec_ip(host, "link", "set", "eth0", "up")
            self.exec_ip(host, "link", "set", "lo", "up")

    @staticmethod
    def exec_ip(namespace, *args, check=True):
        return _ip("-n", namespace, *args, check=check)

    def run(self, index, argv, timeout=30):
        """Run ``argv`` in host ``index`` to completion; return its stdout."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[index], *argv], capture_output=True, text=True,
                              timeout=timeout, check=True).stdout

    def start(self, index, argv, env=None, **kwargs):
        """Start ``argv`` in host ``index`` in its own session (killed by ``close()``)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[index], *argv], env=env, text=True,
                                start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    def cut(self, index):
        """Pull host ``index``'s cable: its bridge port goes down (both ends lose carrier)."""
        self.exec_ip(self.bridge_ns, "link", "set", f"port{index}", "down")

    def mend(self, index):
        self.exec_ip(self.bridge_ns, "link", "set", f"port{index}", "up")

    def listening(self, index):
        """``[(local address, port)]`` of the TCP sockets listening in host ``index`` (``ss -ltn``)."""
        out = self.run(index, ["ss", "-Hltn"])
        found = []
        for line in out.splitlines():
            local = line.split()[3]
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port)))
        return found

    def close(self):
        for proc in self.procs:
            reap(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs = []
        for name in reversed(self._made):  # deleting a host's namespace removes its veth pair too
            _ip("netns", "delete", name, check=False)
        self._made = []
