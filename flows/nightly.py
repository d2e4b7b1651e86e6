"""The nightly Prefect flow: the stages of dvc.yaml, one task each, run through `dvc repro` so that the
DAG is defined once and unchanged stages are skipped. An MLflow parent run spans the flow; each stage
process opens its child run under it (TAILOR_PARENT_RUN_ID). params.yaml's `runner` picks the task
runner: `local` runs the stages one by one in this process; `dask` runs the shared stages first, then
the per-device branches side by side on a Dask cluster (prefect-dask), each stage still a `dvc repro`."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tailor import tracking
from tailor.config import RunnerParams, load_params, pick_devices, read_yaml

BAD_INPUT = 2  # exit code of a stage that refused its input: retrying cannot help


class StageFailed(RuntimeError):
    def __init__(self, target: str, code: int, message: str):
        super().__init__(f"{target} failed (exit {code}): {message}")
        self.code = code


def targets(root: Path, devices: list[str]) -> list[str]:
    """dvc.yaml's stages in file order (which is topological), per-device ones expanded."""
    stages = read_yaml(root / "dvc.yaml")["stages"]  # DVC refuses duplicate keys: so do we
    return [t for name, st in stages.items() for t in ([f"{name}@{d}" for d in devices] if "foreach" in st else [name])]


def stage_graph(root: Path, devices: list[str]) -> dict[str, list[str]]:
    """Each target of `targets` -> the earlier targets whose outputs it depends on, from DVC's own stage graph
    (`Repo.index.graph`: `vars` and `${}` interpolation, `wdir` and paths resolved as `dvc repro` resolves them).
    The flow starts a per-device target when these are done, not when the one before it in dvc.yaml is:
    export@phone reads only finetune@phone's model, so it runs beside evaluate@phone."""
    from dvc.repo import Repo

    order = targets(root, devices)
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage whose output it reads
        # by name (`addressing` is relative to the working directory), of this dvc.yaml's stages only
        ours = {s for s in graph.nodes if Path(s.dvcfile.path).resolve() == (Path(root) / "dvc.yaml").resolve()}
        reads = {s.name: {u.name for u in graph.successors(s) if u in ours} for s in ours}
    return {t: [u for u in order[:i] if u in reads.get(t, ())] for i, t in enumerate(order)}


def _bin(name: str) -> str:
    """Prefer the tool next to this interpreter (the project's venv)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def stage_env(parent_run: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    if parent_run:
        env[tracking.PARENT_ENV] = parent_run
    return env


def _no_retry_on_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return e.code != BAD_INPUT
    except Exception:
        return True
    return False


@task(retries=1, retry_delay_seconds=[5], retry_condition_fn=_no_retry_on_bad_input, task_run_name="{target}")
def run_stage(target: str, root: str, parent_run: str | None, wait_for_lock: bool = False, force: bool = False) -> dict:
    """`dvc repro --single-item TARGET`, or record it as skipped when DVC finds nothing changed.

    wait_for_lock: other stages run beside this one (per-device branches on Dask). DVC releases its
    repository lock while a stage's command runs, so repros of independent stages do overlap; it holds
    the lock only to check before and to hash outputs / write dvc.lock after, and a repro arriving then
    fails at once ("Unable to acquire lock") unless told to wait (`dvc --wait-for-lock`).
    force: run it even when DVC sees no change (the base model's contents changed under the same path)."""
    log = get_run_logger()
    os.environ.setdefault("TAILOR_ROOT", root)  # a Dask worker process starts before the flow sets it
    env = stage_env(parent_run)
    dvc = [_bin("dvc"), *(["--wait-for-lock"] if wait_for_lock else [])]
    # one DVC call, not `status` then `repro`: each DVC start costs ~2 s, and repro checks the same hashes
    t0 = time.perf_counter()
    proc = subprocess.run([*dvc, "repro", "--single-item", *(["--force"] if force else []), target], cwd=root, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0 and "didn't change, skipping" in proc.stdout and "Running stage" not in proc.stdout:
        log.info("%s: unchanged, skipped", target)
        if parent_run:
            tracking.log_skipped(parent_run, target)
        return {"target": target, "skipped": True, "seconds": 0.0}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("tailor ")]
        why = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        code = BAD_INPUT if lines else proc.returncode
        raise StageFailed(target, code, why)
    log.info("%s: done in %.1f s", target, seconds)
    return {"target": target, "skipped": False, "seconds": round(seconds, 1)}


class EarlyJob:
    """A side job (`python -m steps.<stage> --<flag>`, not a DVC stage) as a child process, started right after
    calibrate so that it runs beside supernet, search and finetune. A process, not a task: on Dask it would hold a
    worker that a device branch needs. It never fails the flow: the stage that reads what it leaves in a cache
    does the work itself when it finds nothing there (waiting on the cache's lock while this one still runs),
    and reports a real error then. `argv`: the interpreter's arguments; subclasses name their log line (TARGET)
    and what the stages do without them (FALLBACK)."""
    TARGET = "early job"
    FALLBACK = "the stages did its work themselves"
    STOP_WAIT_S = 30  # after SIGTERM, before SIGKILL

    def __init__(self, root: str, argv: list[str], env: dict[str, str] | None = None):
        self.t0 = time.perf_counter()
        self.out = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads a pipe while it runs
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=root, env=env or stage_env(None),
                                     stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.ended: float | None = None  # when it exited, stamped by a watcher: the flow collects it much later
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        self.proc.wait()
        self.ended = time.perf_counter()

    def finish(self, log) -> dict:
        """Wait for it; one summary row (skipped: it failed, and the stages did its work)."""
        code = self.proc.wait()
        self.watcher.join()
        seconds = round((self.ended or time.perf_counter()) - self.t0, 1)
        self.out.seek(max(0, self.out.seek(0, os.SEEK_END) - 8192))  # its last lines say what it did
        said = [ln for ln in self.out.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
        self.out.close()
        last = said[-1] if said else "no output"
        if code != 0:
            log.warning("%s failed (exit %d): %s; %s", self.TARGET, code, last, self.FALLBACK)
        else:
            log.info("%s: %s (%.1f s)", self.TARGET, last, seconds)
        return {"target": self.TARGET, "skipped": code != 0, "seconds": seconds}

    def stop(self) -> None:
        """The flow failed: end the child rather than leave it working for minutes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class EarlyBaseEval(EarlyJob):
    """`python -m steps.evaluate --base-only`: the base model's evaluate suite into its result cache
    (`runner.base_eval`; the command itself decides what `auto` means on this machine)."""
    TARGET = "base-eval (early)"
    FALLBACK = "the evaluate stages scored the base themselves"

    def __init__(self, root: str):
        super().__init__(root, EARLY_BASE_EVAL)


class EarlyLatency(EarlyJob):
    """`python -m steps.search --latency-only --devices ...`: each device's latency subnets exported and timed
    into the latency cache, on the CPU beside the supernet's GPU training (the command does nothing without
    CUDA). Session 20's H200 run: the phone's search waited 81 s for that work. Its torch threads are a quarter
    of the cores (`worker_env`), unless the user set them: the supernet's own loop needs a core."""
    TARGET = "latency (early)"
    FALLBACK = "the search stages timed their subnets themselves"

    def __init__(self, root: str, devices: list[str]):
        super().__init__(root, [*EARLY_LATENCY, "--devices", ",".join(devices)], env=stage_env(None) | worker_env(4))


def wants_early_base_eval(todo: list[str], base_eval: str) -> bool:
    """Whether to start `EarlyBaseEval` once calibrate is done: some evaluate stage may run, and
    `runner.base_eval` does not keep the base's suite inside the stage."""
    return base_eval != "in-stage" and any(t.startswith("evaluate@") for t in todo)


def early_latency_devices(todo: list[str]) -> list[str]:
    """The devices whose search may run (in `todo`'s order): what `EarlyLatency` times, once calibrate is done."""
    return [t.split("@", 1)[1] for t in todo if t.startswith("search@")]


EARLY_BASE_EVAL = ["-m", "steps.evaluate", "--base-only"]  # run by this interpreter in the project root
EARLY_LATENCY = ["-m", "steps.search", "--latency-only"]


@task(retries=2, retry_delay_seconds=[2, 5])
def push(root: str) -> None:
    """Store artifacts in the DVC remote (a local directory outside the repo by default)."""
    subprocess.run([_bin("dvc"), "push", "-q"], cwd=root, env=stage_env(None), check=True, capture_output=True)


def summary(root: Path, devices: list[str], results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for d in devices:
        def read(stage: str) -> dict:
            f = root / "reports" / stage / d / "metrics.json"
            return json.loads(f.read_text()) if f.is_file() else {}
        ev, ex, se, rg = read("evaluate"), read("export"), read("search"), read("register")
        rows.append({"device": d, "bits_per_param": se.get("bits_per_param"), "file_bytes": ex.get("file_bytes"),
                     "ppl": ev.get("ppl"), "ppl_base": ev.get("ppl_base"), "piqa": ev.get("piqa"),
                     "piqa_base": ev.get("piqa_base"), "runtime_ppl": ex.get("runtime_ppl"),
                     "gates_passed": ev.get("gates_passed"), "gates_verdict": ev.get("gates_verdict"),
                     "version": rg.get("version")})
    lines = ["# Tailor nightly", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['target']} | {'skipped' if r['skipped'] else 'ran'} | {r['seconds']} |" for r in results]
    return "\n".join(lines), rows


def base_model_changed(root: Path, source: str) -> bool:
    """True when the base model's contents differ from the ones calibrate last ran on. DVC tracks
    `model.source` as a param, so a new source re-runs everything by itself; a directory or file whose
    contents changed under the same path is what this catches (its hash is cached by size and mtime)."""
    from tailor.models.source import resolve

    recorded = root / "artifacts" / "calibrate" / "model.json"
    if not recorded.is_file():
        return False  # calibrate has not run: DVC runs it anyway
    cwd = os.getcwd()
    try:
        os.chdir(root)  # relative sources and the cache resolve from the repository root, as stages do
        now = resolve(source).sha256
    finally:
        os.chdir(cwd)
    return json.loads(recorded.read_text()).get("sha256") != now


LOCK_FILE = ".cache/tailor-run.lock"


def run_lock(root: Path):
    """One nightly run at a time per repository: a second run waits here until the first finishes
    (DVC would otherwise fail its `dvc repro` on the repo lock, and two registrations of one file
    could race). An flock is dropped by the OS when its holder dies, even by SIGKILL: no stale lock."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        get_run_logger().info("waiting for another run (%s is held)", path)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


@flow(name="tailor-nightly", log_prints=True)
def nightly(devices: list[str] | None = None, root: str = ".") -> list[dict]:
    """Run every stage of dvc.yaml once, in order, for the given devices (all by default)."""
    rootp = Path(root).resolve()
    os.environ["TAILOR_ROOT"] = str(rootp)
    params = load_params(rootp / "params.yaml")
    devs = pick_devices(params, devices)
    lock = run_lock(rootp)  # held until the finally below; the OS drops it if this process dies
    parent = tracking.start_parent("nightly", {"tailor.profile": params.profile, "tailor.devices": ",".join(devs)})
    results, status, early, started = [], "FAILED", [], []
    try:
        if base_model_changed(rootp, params.model.source):
            get_run_logger().info("model.source %s changed since calibrate ran: re-running it", params.model.source)
            results.append(run_stage("calibrate", str(rootp), parent, force=True))
        done = {r["target"] for r in results}
        todo = [t for t in targets(rootp, devs) if t not in done]
        def after(target: str) -> None:  # the side jobs read calibrate's outputs: start them once those exist
            if target != "calibrate" or started:
                return
            started.append(target)
            if wants_early_base_eval(todo, params.runner.base_eval):
                early.append(EarlyBaseEval(str(rootp)))
            if lat_devices := early_latency_devices(todo):
                early.append(EarlyLatency(str(rootp), lat_devices))

        if "calibrate" in done:
            after("calibrate")
        if params.runner.kind == "local":
            for target in todo:
                results.append(run_stage(target, str(rootp), parent))
                after(target)
        else:
            results += _fan_out(todo, devs, str(rootp), parent, after)
        results += [e.finish(get_run_logger()) for e in early]
        push(str(rootp))
        status = "FINISHED"
    finally:
        for e in early:
            e.stop()
        md, rows = summary(rootp, devs, results)
        tracking.end_parent(parent, status, {f"{r['device']}.{k}": v for r in rows for k, v in r.items()
                                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        create_markdown_artifact(md, key="tailor-nightly-stages", description="stages run or skipped")
        if rows:
            create_table_artifact(rows, key="tailor-nightly-devices", description="per-device results")
        lock.close()
    return rows


def _fan_out(all_targets: list[str], devices: list[str], root: str, parent: str | None,
             after=lambda target: None) -> list[dict]:
    """Shared stages in order here (`after(target)` once each is done), then the per-device tasks on the flow's
    task runner (Dask when `runner.kind` is dask: see `for_params`), each as soon as the targets whose outputs
    it reads are done (`stage_graph`): the devices side by side, and within a device evaluate beside export."""
    results = []
    for t in (t for t in all_targets if "@" not in t):
        results.append(run_stage(t, root, parent))
        after(t)
    graph, futures = stage_graph(Path(root), devices), {}
    for t in (t for t in all_targets if "@" in t):  # file order is topological: what t waits for is submitted
        after_ = [futures[u] for u in graph[t] if u in futures]
        futures[t] = run_stage.submit(t, root, parent, wait_for_lock=True, wait_for=after_ or None)
    # Device by device in input order, not completion order: the summary reads the same whichever finished first.
    return results + [futures[t].result() for d in devices for t in all_targets if t.endswith(f"@{d}")]


# Dask's nanny pins these to 1 before it spawns a worker (distributed.yaml `nanny.pre-spawn-environ`), and it
# does so by os.environ.update in the spawning process, the flow's own. Every stage a worker or the flow then
# started inherited one thread: on the H200 machine (16 cores) session 19's full run computed the export's
# perplexity parity and the search's background latency timings on one core (export@phone 366 s).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_env(workers: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Thread counts for the stages a Dask worker starts: the user's own setting where there is one, else
    an equal share of this machine's cores per worker (the workers run stages side by side)."""
    environ = os.environ if environ is None else environ
    share = max(1, len(os.sched_getaffinity(0)) // max(1, workers))
    return {k: environ.get(k, str(share)) for k in THREAD_VARS}


def task_runner(runner: RunnerParams):
    """The Prefect task runner for params.yaml's `runner`: None keeps the flow's default (local threads).

    A local cluster's workers get `worker_env`'s thread counts instead of Dask's pins, and the flow's own
    process keeps its environment (the pins are removed from this process's Dask config)."""
    if runner.kind == "local":
        return None
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    import dask

    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": None for k in THREAD_VARS})
    # Processes, one thread each; no dashboard (no port to collide with, no bokeh needed).
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "env": worker_env(runner.workers)})


def on_runner(runner: RunnerParams | None):
    """The nightly flow on `runner`'s task runner; with none or `kind: local`, `nightly` itself."""
    tr = task_runner(runner) if runner is not None else None
    return nightly if tr is None else nightly.with_options(task_runner=tr)


def for_params(params_file: str | Path = "params.yaml"):
    """The nightly flow on the task runner that params.yaml's `runner` section asks for."""
    return on_runner(load_params(params_file).runner)


def deployment(cron: str, timezone: str, name: str = "nightly", runner: RunnerParams | None = None):
    """The nightly deployment with the schedule from params.yaml."""
    from prefect.schedules import Cron

    # concurrency_limit=1: two nightly runs never interleave on one registry and one DVC workspace.
    return on_runner(runner).to_deployment(name=name, schedule=Cron(cron, timezone=timezone), concurrency_limit=1,
                                 tags=["tailor", "nightly"], description="Tailor nightly compression run")
