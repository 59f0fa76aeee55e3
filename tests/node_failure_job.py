"""Run by test_fault_tolerance: a 3-node Ray cluster on one machine (ray.cluster_utils.Cluster);
one embedding worker node is removed while the embedding stage runs; the job must finish."""

import json
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from mona_ray.config import load_config
from mona_ray.pipeline.cli import run

out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
workers = [cluster.add_node(num_cpus=1, resources={"embedder": 1}) for _ in range(2)]
ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
ray.data.DataContext.get_current().enable_progress_bars = False

result = {}
job = threading.Thread(target=lambda: result.update(manifest=run(load_config(overrides), quiet=True)))
job.start()


def rows_done() -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("embeddings/*/part-*.parquet"))


deadline = time.time() + 600
while rows_done() < 12 and job.is_alive() and time.time() < deadline:
    time.sleep(0.1)
done = rows_done()
cluster.remove_node(workers[0])  # a worker node dies with its actor and its unit in flight
cluster.add_node(num_cpus=1, resources={"embedder": 1})  # and the cluster replaces it, as KubeRay would
job.join(timeout=600)
assert "manifest" in result, "the job did not finish"
# Ray's own log lines (raylet retry notices) can reach stdout too: the report is the tagged line
print("NODE_FAILURE_REPORT " + json.dumps({"removed_node_while_rows_done": done, "embedded": result["manifest"]["counts"]["embedded_now"]}))
sys.stdout.flush()
ray.shutdown()
cluster.shutdown()
