"""The distributed engine for `cpm4 data filter`: PySpark.

Why Spark rather than Ray Data:

* Mapping. Our unit of work and of resume is an input partition with exactly one output part file. Spark
  runs `sc.parallelize(partitions, len(partitions))` as one task per partition, nothing more. Ray Data's unit is
  a block: `read_json`/`read_parquet` split and merge files into blocks and its writers name files per block,
  so keeping "one input partition -> one part file" and resuming would mean dropping to core Ray tasks, i.e.
  not using Ray Data at all.
* Failures. Spark retries a failed task (`spark.task.maxFailures` on a cluster) and can run speculative
  copies; both are safe here because a task writes under a temporary name, renames, then writes its finished
  marker, and a rerun of a partition produces the same bytes.
* Resume. Neither engine resumes a job by itself; resume is ours (manifest + finished markers, see
  `cpm4.data.filter`) and shared with the local engine, so a run interrupted on one engine can be finished
  on the other.
* Where it runs. The paper ran its large UltraClean jobs on Spark, and data-processing clusters (YARN,
  Kubernetes, standalone) mostly run Spark already.
* Cost. Start-up on the 2-core machine, measured by benchmarks/data_filter.py: 4-8 s for a `local[N]` session
  plus its first Python workers (which import cpm4 and load the model once, then are reused); Ray's
  `ray.init(num_cpus=2)` is of the same order (not measured here) and also runs a GCS, a raylet, a dashboard
  and a shared-memory object store. Install weight is Spark's weak side: pyspark 4.3 is ~490 MB installed and
  needs Java 17+, against an ~80 MB Ray wheel (plus pandas/pyarrow for Ray Data). So it is an optional extra,
  imported only when `--engine spark` is chosen. Once started, Spark's rate is within ~10% of the local
  engine's (see the benchmark): both are bound by normalization and fastText in the Python workers.

On a cluster the executors need the same Python with cpm4 and fastText installed, and the input, the output
directory and the model must be on a filesystem every executor sees under the same path (NFS, Lustre, a FUSE
mount), since tasks rename files there (S3-style stores have no atomic rename).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence

from .filter import FilterJob, marker_path, part_name, run_partition
from .io import Partition

_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",  # keeps each worker's loaded model across its tasks
    "spark.task.maxFailures": "4",
    "spark.driver.host": "127.0.0.1",  # local runs stay on the loopback interface
    "spark.driver.bindAddress": "127.0.0.1",
}


def _task(item: tuple[FilterJob, Partition]) -> dict:
    job, part = item
    try:
        return run_partition(job, part)
    except (ValueError, FileNotFoundError) as e:
        # Bad input fails the same way on every retry: report it instead of letting Spark retry it.
        return {"error": type(e).__name__, "message": str(e)}


def spark_session(master: str):
    """(session, created): the running SparkSession, or a new one on `master` that the caller must stop."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is not None:  # the caller's session (a notebook, a test): reuse it
        return SparkSession.builder.getOrCreate(), False
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers must use this interpreter (and venv)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # a local run binds to the loopback interface only
    builder = SparkSession.builder.master(master).appName("cpm4-data-filter")
    conf = dict(_CONF)
    if not master.startswith("local"):
        conf.pop("spark.driver.host")
        conf.pop("spark.driver.bindAddress")
    for k, v in conf.items():
        builder = builder.config(k, v)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session, True


def run_spark(job: FilterJob, parts: Sequence[Partition], workers: int, master: str | None,
              on_done: Callable[[dict], None], poll_s: float = 0.2) -> None:
    """Run `parts` as one Spark task each; `on_done(stats)` is called in the driver as each one finishes."""
    session, created = spark_session(master or f"local[{workers}]")
    sc = session.sparkContext
    rdd = sc.parallelize([(job, p) for p in parts], len(parts))
    result: dict = {}

    def collect() -> None:
        try:
            result["rows"] = rdd.map(_task).collect()
        except BaseException as e:  # surfaced in the driver thread below
            result["exc"] = e

    names = [part_name(p) for p in parts]
    seen: set[str] = set()

    def poll() -> None:
        # Progress from the finished markers the tasks write (the job's results only arrive at the end).
        for name in names:
            if name not in seen and marker_path(job.output, name).is_file():
                with open(marker_path(job.output, name), encoding="utf-8") as f:
                    stats = json.load(f)
                seen.add(name)
                on_done(stats)

    th = threading.Thread(target=collect, daemon=True)
    th.start()
    try:
        while th.is_alive():
            th.join(poll_s)
            poll()
        if "exc" in result:
            msg = str(result["exc"]).strip().splitlines()
            raise RuntimeError(f"Spark job failed: {msg[-1] if msg else type(result['exc']).__name__}") \
                from result["exc"]
        for row in result["rows"]:
            if "error" in row:
                raise (FileNotFoundError if row["error"] == "FileNotFoundError" else ValueError)(row["message"])
        poll()
    except BaseException:
        sc.cancelAllJobs()
        th.join()
        raise
    finally:
        if created:
            session.stop()
