"""A sweep against a Ray cluster started the way the README says (`ray start --head`, plus a second node), and
a sweep without --address next to a stale address file. Integration tier: real `ray start` processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["--set", "train.max_steps=4", "--set", "model.pretrain_steps=0", "--set", "data.train_rows=32",
        "--set", "data.test_rows=8", "--set", "eval.batch_size=8", "--set", "eval.judge=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The environment of a new user's shell: no Ray address, no auth mode (Ray 2.60's `ray start` still turns
    token authentication on)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "RAY_AUTH_MODE"}


def _stop_cluster(temp: Path) -> None:
    """Stop only this test's cluster (`ray stop` would stop every Ray on the machine): every process whose
    command line names its temp dir."""
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and str(temp) in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)


@pytest.fixture
def two_node_cluster():
    # a short temp dir: Ray's unix socket paths live under it and must stay under 108 characters
    temp = Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp"))
    port = _free_port()
    env = _clean_env()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp}",
                        f"--dashboard-port={_free_port()}", *common], env=env, check=True, capture_output=True,
                       timeout=120)
        # every other node runs with token authentication on and the head's token (here the same
        # ~/.ray/auth_token file; on another machine copy it there or set RAY_AUTH_TOKEN)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common], env={**env, "RAY_AUTH_MODE": "token"},
                       check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(temp)


def test_sweep_joins_a_two_node_cluster_started_with_ray_start(two_node_cluster, tmp_path):
    from mlflow import MlflowClient

    address = two_node_cluster
    env = _clean_env()
    nodes = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='%s', log_to_driver=False); "
         "print(sum(n['Alive'] for n in ray.nodes()))" % address],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "task_order.py"), "--design", "given",
         "--orders", "ScienceQA>TextVQA;TextVQA>ScienceQA", "--seeds", "1", "--address", address,
         "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "cluster", *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["task_order"] for r in children) == ["ScienceQA>TextVQA", "TextVQA>ScienceQA"]
    assert all("mfn" in r.data.metrics for r in children)


def test_without_address_a_sweep_starts_its_own_ray_even_after_a_head_died(tmp_path):
    """A head that died leaves its address file behind; a driver without --address must not follow it."""
    temp = Path(tempfile.mkdtemp(prefix="crd-", dir="/tmp"))
    env = _clean_env()
    try:
        subprocess.run([RAY, "start", "--head", f"--port={_free_port()}", f"--temp-dir={temp}",
                        "--include-dashboard=false", "--num-cpus=1", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True, timeout=120)
    finally:
        _stop_cluster(temp)  # the head is gone; /tmp/ray/ray_current_cluster still names it
    probe = ("import argparse, ray\n"
             "from coin_ray.studies import cli\n"
             "cli.init_ray(argparse.Namespace(address=None, num_cpus=1, verbose=False))\n"
             "print('CPU', ray.cluster_resources().get('CPU'))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU 1.0" in out.stdout
