"""A LocalCluster in a process of its own, for the Dask tests: prints its scheduler's address,
then runs until its stdin closes.

    python tests/dask_cluster.py N_WORKERS

Out of the test process, its threads, connections and multiprocessing's resource tracker do
not mix with the suite's checks for leaked fds and children.
"""

from __future__ import annotations

import sys

from distributed import LocalCluster

if __name__ == "__main__":
    with LocalCluster(
        n_workers=int(sys.argv[1]),
        threads_per_worker=2,
        host="127.0.0.1",
        dashboard_address=":0",  # a free port: several clusters may run at once
    ) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the test closes it
