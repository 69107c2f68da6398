"""One worker of the 2-worker stragglers test (run by test_stragglers through tfpar-launch).

Usage: python mw_stragglers.py OUT_DIR
In one cluster start-up: a balanced fit with unequal fixed shares (5 and 11
of 16) next to the one-device fit of the same global batches, then two timed
fits, an even pair and one with worker 1 slowed by the test-only seam
TFPAR_TEST_SLOW_REPLICA. Writes OUT_DIR/<task>.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import test_stragglers as t  # noqa: E402
from helpers import write_worker_result  # noqa: E402
from tfpar.runtime import strategies  # noqa: E402


def main(out_dir):
    strategy = strategies.create("multi_worker")
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    result = {"initial": t._weights(t._model()), "reference": t.reference()["weights"]}
    model, _, _ = t.balanced(strategy, t.UNEQUAL)
    result["balanced"] = t._weights(model)
    chief = task["index"] == 0

    even = t.timed(strategy, "*:2", names=["worker 0", "worker 1"], print_fn=print if chief else None)
    slow = t.timed(strategy, "1:4", names=["worker 0", "worker 1"], print_fn=print if chief else None)
    result.update(even_warning=even["straggler_warning"], slow_warning=slow["straggler_warning"],
                  slow_workers=slow["workers"])
    write_worker_result(out_dir, task, result)


if __name__ == "__main__":
    main(sys.argv[1])
