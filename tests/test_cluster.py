"""The cluster path, run for real on one machine: PostgreSQL, a Prefect server on it, deployments from
prefect.yaml, two process workers, and `fat-distill run|sweep --deployment … --watch` as a user types them.

Everything listens on 127.0.0.1 only. PostgreSQL comes from Debian's `postgresql` package (.ci/run installs
it); without its binaries the test is skipped. Every process started here runs in its own process group and
is stopped (then killed) by a finalizer; the database cluster is stopped with pg_ctl and deleted.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fat_distill.manifests import read_manifest_meta
from fat_distill.pipeline import load_run_json
from fat_distill.processes import is_alive
from tests.pipeline_configs import tiny_config

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "fat-distill-process"


def _postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user (Debian creates it)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    if not shutil.which("runuser"):
        pytest.skip("running as root without `runuser` to start PostgreSQL as the postgres user")
    return ["runuser", "-u", "postgres", "--"]


_T0 = time.monotonic()


def _progress(what: str) -> None:
    """A timestamped line in the captured output: where the time went, shown when the test fails."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {what}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


class Processes:
    """Processes started for the test, each in its own process group, with a log file; stop() ends them all."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stop(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for _, proc in self.started:  # children a process left behind in its group (a flow run of a worker)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its SQLAlchemy asyncpg URL."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's `postgresql` package "
                    "(.ci/run does)")
    prefix = _as_postgres()
    base = Path(tempfile.mkdtemp(prefix="fat-distill-pg-"))  # in /tmp: the postgres user can reach it
    password = secrets.token_hex(12)
    (base / "password").write_text(password + "\n")
    if prefix:
        shutil.chown(base, "postgres")
        shutil.chown(base / "password", "postgres")
    port = _free_port()
    data = base / "data"
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "prefect", f"--pwfile={base / 'password'}",
                    "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
    started = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"),
                              "-w", "-t", "60", "-o", options, "start"], capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr + _tail(base / "postgres.log")
        _progress(f"PostgreSQL up on 127.0.0.1:{port}")
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        _progress("PostgreSQL stopped")
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Cluster:
    api_url: str
    env: dict[str, str]          # what a user's shell has: PREFECT_API_URL, this checkout on PYTHONPATH
    processes: Processes
    work: Path
    # Manifest folder of the first test's uninterrupted pipeline run: what a killed and resumed run must match.
    reference: dict[str, Path] = field(default_factory=dict)

    def api(self, path: str, body: dict | None = None) -> dict | list:
        """A call to the server's REST API (GET, or POST with a JSON body): what the Prefect UI shows."""
        request = urllib.request.Request(f"{self.api_url}/{path}", method="GET" if body is None else "POST",
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fat-distill"), *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def flow_runs_of(self, worker: str) -> set[str]:
        """Names of the flow runs a worker started (both may try to take a run; one wins)."""
        log = self.processes.log(worker).read_text()
        return set(re.findall(r"Flow run '([^']+)' submitted to infrastructure", log))


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the Prefect server exited:\n{_tail(log)}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the Prefect server did not answer within {timeout:.0f}s:\n{_tail(log)}")


def _wait_for_workers(api_url: str, names: set[str], processes: Processes, timeout: float = 180) -> None:
    """Until every worker has registered with the pool (its first heartbeat), so each can take a run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in processes.started:
            assert proc.poll() is None, f"{name} exited:\n{_tail(processes.log(name))}"
        request = urllib.request.Request(f"{api_url}/work_pools/{POOL}/workers/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if names <= {w["name"] for w in json.load(response)}:
                return
        time.sleep(1)
    raise AssertionError(f"workers {sorted(names)} did not register within {timeout:.0f}s")


@pytest.fixture(scope="module")
def cluster(postgres_url) -> Iterator[Cluster]:
    """A Prefect server on PostgreSQL, the process pool, the deployments of prefect.yaml and two workers."""
    work = Path(tempfile.mkdtemp(prefix="fat-distill-cluster-"))
    processes = Processes(work)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="INFO")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = {**base, "PREFECT_HOME": str(work / "server-home"), "PREFECT_UI_ENABLED": "false",
                  "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url}
    try:
        server = processes.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(port)], server_env, work)
        _wait_healthy(api_url, server, processes.log("server"))
        _progress(f"Prefect server up at {api_url}")
        user_env = {**base, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "client-home")}
        created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
                                 env=user_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert created.returncode == 0, created.stdout + created.stderr
        for name in ("w1", "w2"):  # they start up while the deployments are made
            # Each worker on its own PREFECT_HOME and started elsewhere: the deployment finds the project.
            worker_dir = work / name
            worker_dir.mkdir()
            env = {**user_env, "PREFECT_HOME": str(worker_dir / "home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
            processes.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                   "--name", name, "--limit", "1"], env, worker_dir)
        # As a user deploys: from a shell in the project folder ($PWD is what the process pool runs in).
        deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline", "--name",
                                   "sweep"], env={**user_env, "PWD": str(ROOT)}, cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        _progress("work pool created, deployments made")
        _wait_for_workers(api_url, {"w1", "w2"}, processes)
        _progress("both workers polling")
        yield Cluster(api_url, user_env, processes, work)
    finally:
        processes.stop()
        _progress("workers and server stopped")
        shutil.rmtree(work, ignore_errors=True)


def _write_config(path: Path, root: Path) -> Path:
    config = tiny_config(root, data={"synth": {**tiny_config(root)["data"]["synth"], "seed": 11}},
                         teacher={"rounds": 1}, baselines=[])
    config["run"]["torch_threads"] = 1
    path.write_text(yaml.safe_dump(config))
    return path


def _stage_spans(run_json: dict) -> list[tuple[float, float, str]]:
    return [(e["slot_acquired"], e["slot_released"], f"{run_json['run_id']}:{name}")
            for name, e in run_json["stages"].items() if "slot_acquired" in e]


def _submitted(output: str) -> tuple[str, str]:
    """(run id, flow run id) from the CLI's 'submitted run … flow run …' line."""
    match = re.search(r"submitted run (\S+) to deployment \S+: flow run ([0-9a-f-]+)", output)
    assert match, output
    return match.group(1), match.group(2)


def test_pipeline_and_sweep_run_on_two_workers_share_the_device_and_the_cache(cluster, tmp_path):
    root = tmp_path / "project-data"
    config = _write_config(tmp_path / "tiny.yaml", root)

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "fat-distill"), *args], env=cluster.env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    # 1. A pipeline and a 2-point sweep at once: each worker takes one flow run (--limit 1). The sweep's
    #    data differ (seed), so neither takes stages from the other's cache while both are running.
    clients = [start("run", str(config), "--deployment", "pipeline", "--watch"),
               start("sweep", str(config), "--grid", "student.train.lr=0.001,0.002", "--set", "data.synth.seed=12",
                     "--deployment", "sweep", "--watch")]
    try:
        outputs = [c.communicate(timeout=600)[0] for c in clients]
        _progress("pipeline and sweep done")
    finally:
        for c in clients:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGKILL)
    pipeline_out, sweep_out = outputs
    for client, output in zip(clients, outputs):
        workers = [_tail(cluster.processes.log(w)) for w in ("w1", "w2")]
        assert client.returncode == 0, "\n".join([*workers, "--- client output:", output])
    run_id, _ = _submitted(pipeline_out)
    sweep_id, _ = _submitted(sweep_out)
    cluster.reference["pipeline"] = root / "manifests" / run_id
    # --watch followed the runs on the workers, stage by stage, to the end.
    for line in ("stage data: Completed", "stage teacher.round0: Completed", "stage evaluate.distilled: Completed",
                 f"flow run {run_id}: Running", f"flow run {run_id}: Completed"):
        assert line in pipeline_out, pipeline_out
    last_stage = pipeline_out.index("stage evaluate.distilled: Completed")
    assert pipeline_out.index(f"flow run {run_id}: Completed") > last_stage  # the run's end is said last
    assert re.search(r"student\.train\.lr=0\.002: stage student\.distilled: Completed", sweep_out), sweep_out
    assert f"run {sweep_id} completed" in sweep_out

    # The two flow runs went to different workers (each takes one at a time), which ran them in the
    # deployed project folder although they were started elsewhere.
    by_worker = {w: cluster.flow_runs_of(w) for w in ("w1", "w2")}
    assert sorted(map(sorted, by_worker.values())) == sorted([[run_id], [sweep_id]]), by_worker

    runs = root / "runs"
    pipeline_run = load_run_json(runs / run_id)
    points = [load_run_json(p) for p in sorted(runs.glob(f"{sweep_id}-*"))]
    assert pipeline_run["status"] == "completed" and len(points) == 2
    assert all(p["status"] == "completed" for p in points)
    # Both processes schedule on devices [cpu]: the server's device limit kept their stages apart.
    spans = sorted(s for r in [pipeline_run, *points] for s in _stage_spans(r))
    for (start_a, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        assert start_b >= end_a, f"{a} and {b} held the device at the same time"
    assert pipeline_run["pid"] != points[0]["pid"]
    assert (runs / ".stage-results").is_dir()  # the cache lives beside the runs, shared by both workers

    # 2. The same pipeline again: every stage from the cache, whichever worker takes it. A run whose
    #    input is missing fails on a worker, and --watch says so with a non-zero exit.
    broken = yaml.safe_load(config.read_text())
    broken["data"] = {"source": "manifest", "manifest": str(tmp_path / "no-such-dataset.parquet")}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    clients = [start("run", str(config), "--deployment", "pipeline", "--watch"),
               start("run", str(tmp_path / "broken.yaml"), "--deployment", "pipeline", "--watch")]
    try:
        (again_out, broken_out) = [c.communicate(timeout=400)[0] for c in clients]
        _progress("cached and broken runs done")
    finally:
        for c in clients:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGKILL)
    assert clients[0].returncode == 0, again_out
    again = load_run_json(runs / _submitted(again_out)[0])
    assert {e["state"] for e in again["stages"].values()} == {"cached"}, again["stages"]
    assert again["metrics"] == pipeline_run["metrics"]
    assert clients[1].returncode == 1, broken_out
    assert "stage data: Failed" in broken_out and "no-such-dataset.parquet" in broken_out, broken_out


def test_an_unknown_deployment_is_named_with_what_to_do(cluster, tmp_path):
    config = _write_config(tmp_path / "tiny.yaml", tmp_path)
    done = cluster.cli("run", str(config), "--deployment", "no-such-deployment", "--watch", timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "prefect deployment ls" in done.stderr



def _create_crash_automation(cluster: Cluster, within_seconds: int) -> None:
    """The automation of prefect-automations.yaml, as `prefect automation create --from-file` makes it, with a
    shorter silence (two missed heartbeats instead of three) to keep the test short."""
    automations = yaml.safe_load((ROOT / "prefect-automations.yaml").read_text())
    assert [a["trigger"]["within"] for a in automations] == [90]
    for automation in automations:
        automation["trigger"]["within"] = within_seconds
        for action in automation["actions"]:
            action["message"] = action["message"].replace("90 s", f"{within_seconds} s")
    created = subprocess.run([str(BIN / "prefect"), "automation", "create", "--from-json", json.dumps(automations)],
                             env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr


def _run_json_in(runs: Path) -> dict | None:
    for path in runs.glob("*/run.json"):
        if not path.parent.is_symlink():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:  # never: written atomically; read again next time
                return None
    return None


def test_a_worker_killed_mid_stage_crashes_its_flow_run_and_resume_finishes_it(cluster, tmp_path):
    """A machine dying mid-stage: its worker and the flow run's process group SIGKILLed. The server marks the flow
    run Crashed when its heartbeats stop; `fat-distill resume RUN_ID --deployment pipeline` continues it on the
    other worker, to the same manifests as the uninterrupted run of the same config."""
    # Its own runs folder, so its own stage cache: every stage runs (none is taken from the first test's run).
    root = tmp_path / "project-data"
    config = _write_config(tmp_path / "tiny.yaml", root)
    reference = cluster.reference.get("pipeline")
    if reference is None:  # run on its own (-k): an uninterrupted run of the same config first
        alone = tmp_path / "uninterrupted"
        done = cluster.cli("run", str(_write_config(tmp_path / "alone.yaml", alone)), "--deployment", "pipeline",
                           "--watch", timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        reference = alone / "manifests" / _submitted(done.stdout)[0]
    _create_crash_automation(cluster, within_seconds=60)
    runs = root / "runs"
    client = subprocess.Popen([str(BIN / "fat-distill"), "run", str(config), "--deployment", "pipeline", "--watch"],
                              env=cluster.env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    run: dict | None = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until the teacher holds the device
            run = _run_json_in(runs)
            if run and "slot_acquired" in run["stages"].get("teacher.round0", {}):
                break
            assert client.poll() is None, client.communicate()[0]
            time.sleep(0.05)
        else:
            pytest.fail(f"teacher.round0 never started: {run}")
        run_id, flow_run_id = run["run_id"], run["flow_run_id"]
        worker = next(w for w in ("w1", "w2") if run_id in cluster.flow_runs_of(w))
        other = "w2" if worker == "w1" else "w1"
        # What a machine dying looks like: the worker and the flow run's process (its own process group) at once.
        worker_proc = next(proc for name, proc in cluster.processes.started if name == worker)
        os.killpg(worker_proc.pid, signal.SIGKILL)
        os.killpg(run["pid"], signal.SIGKILL)
        worker_proc.wait(timeout=30)
        _progress(f"{worker} and the flow run of {run_id} killed in teacher.round0")

        # The server marks the silent flow run Crashed; --watch reports it and exits 1.
        watched = client.communicate(timeout=240)[0]
        _progress("flow run crashed")
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
    assert client.returncode == 1, watched
    assert f"flow run {run_id}: Crashed" in watched and f"run {run_id} crashed" in watched, watched
    state = cluster.api(f"flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "CRASHED" and "heartbeat" in state["message"], state
    killed = load_run_json(runs / run_id)
    assert killed["status"] == "running" and killed["stages"]["teacher.round0"]["state"] == "running"

    # As a user continues it: from the client, on the cluster (the other worker takes it).
    try:
        resumed = cluster.cli("resume", run_id, "--runs-root", str(runs), "--deployment", "pipeline", "--watch",
                              timeout=500)
        _progress("resumed run done")
    finally:
        after = load_run_json(runs / run_id) or {}
        if is_alive(after.get("pid"), after.get("pid_started")) and after.get("status") == "running":
            os.killpg(after["pid"], signal.SIGKILL)  # its own process group, outside the worker's
    assert resumed.returncode == 0, "\n".join([resumed.stdout, resumed.stderr, _tail(cluster.processes.log(other))])
    assert f"flow run {run_id}: Completed" in resumed.stdout, resumed.stdout
    assert run_id in cluster.flow_runs_of(other)
    assert after["status"] == "completed" and after["attempts"] == 2, after
    assert after["stages"]["teacher.round0"]["state"] == "ran"
    assert {e["state"] for e in after["stages"].values()} <= {"ran", "cached"}
    names = sorted(p.name for p in reference.glob("*.parquet"))
    assert names and names == sorted(p.name for p in (root / "manifests" / run_id).glob("*.parquet"))
    for name in names:
        assert (read_manifest_meta(root / "manifests" / run_id / name).content_hash
                == read_manifest_meta(reference / name).content_hash), name
