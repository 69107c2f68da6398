"""``tfpar-launch --hosts FILE``: the workers a cluster should have, read again at every restart.

An operator (or a cluster manager) edits the file while the run goes on: a
host that is gone is taken out, one that is back is added, and the next
whole-cluster restart starts that many workers (at most ``--max_workers``);
training resumes its backup on them (``tfpar.runtime.elastic``). One host per
line; blank lines and ``#`` comments are ignored. The names are labels only:
this launcher starts every worker on 127.0.0.1.
"""


def read(path):
    """The hosts listed in ``path``; ``ValueError`` (one sentence) when it cannot be read or lists none."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ValueError(f"The hosts file {path} cannot be read ({err.strerror or err}).") from None
    hosts = [line.split("#", 1)[0].strip() for line in lines]
    hosts = [h for h in hosts if h]
    if not hosts:
        raise ValueError(f"The hosts file {path} lists no host; put one host per line.")
    return hosts


def worker_count(path, max_workers=None):
    """How many workers the next (re)start gets: the hosts listed, at most ``max_workers``."""
    hosts = read(path)
    return min(len(hosts), max_workers) if max_workers else len(hosts)
