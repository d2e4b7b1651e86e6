"""`tailor` — the front door. The one library file that may start flows (imported lazily)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tailor.config import ConfigError, load_params, pick_devices

app = typer.Typer(help="Tailor: fit an LLM to each device by joint structure x precision search.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)

_DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "TOKENIZERS_PARALLELISM": "false",
                # the ephemeral API's 20 s start-up limit is too short on a busy 2-core machine (seen here)
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[red]tailor:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _set_profile(path: Path, profile: str) -> None:
    """Make `profile` the active one in params.yaml (as `dvc exp run -S profile=...` would), so that
    DVC sees the change and re-runs what depends on it."""
    text = path.read_text()
    new, n = re.subn(r"(?m)^profile:\s*\S+", f"profile: {profile}", text, count=1)
    if n == 0:
        new = f"profile: {profile}\n" + text
    if new != text:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(new)
        os.replace(tmp, path)


def _set_model_source(path: Path, source: str) -> None:
    """Write `model.source` in params.yaml (a key of the `model:` block), so DVC sees the new base model."""
    text = path.read_text()
    block = re.search(r"(?m)^model:[^\n]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", text)
    line = f"  source: {json.dumps(source)}\n"
    if block is None:
        new = text.rstrip("\n") + f"\n\nmodel:\n{line}"
    else:
        body, n = re.subn(r"(?m)^[ \t]+source:[^\n]*\n", line, block.group(1), count=1)
        body = body if n else line + block.group(1)
        new = text[: block.start(1)] + body + text[block.end(1):]
    if new != text:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(new)
        os.replace(tmp, path)


@app.command()
def run(devices: Optional[str] = typer.Option(None, help="comma-separated device names (default: all)"),
        profile: Optional[str] = typer.Option(None, help="quick | full | test (default: params.yaml's)"),
        model: Optional[str] = typer.Option(None, "--model", help="base model: a built-in name (smollm2-135m, "
                                            "qwen2.5-coder-0.5b), a Hugging Face model directory or a GGUF file"),
        params: Path = typer.Option(Path("params.yaml"), help="params file")) -> None:
    """Run the nightly flow once, locally (Prefect ephemeral API, MLflow sqlite, DVC local remote)."""
    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    try:
        p = load_params(params, profile)
        devs = pick_devices(p, devices)
        if model is not None:  # fail fast on a wrong path; paths are stored absolute (stages run at the root)
            from tailor.models.source import BUILTINS, resolve

            src = resolve(model)
            model = model if model in BUILTINS else str(src.path)
    except ConfigError as e:
        _fail(str(e))
    except ValueError as e:  # ModelFileError: the source is not a built-in, a model directory or a GGUF
        _fail(f"--model: {e}")
    if profile:
        _set_profile(params, profile)
    if model is not None:
        _set_model_source(params, model)
        p = load_params(params, profile)
    from flows.nightly import StageFailed, for_params

    console.print(f"[bold]tailor run[/bold]: model [cyan]{p.model.source}[/cyan], profile [cyan]{p.profile}[/cyan], devices {', '.join(devs)}")
    try:
        rows = for_params(params)(devices=devs, root=str(params.resolve().parent))  # runner: params.yaml
    except StageFailed as e:
        _fail(str(e), 1)
    _print_results(rows, params.resolve().parent)


def _print_results(rows: list[dict], root: Path) -> None:
    t = Table(title="Tailor: registered candidates")
    for col in ("device", "version", "bits/param", "file MB", "ppl (base)", "PIQA (base)", "gates"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["device"], f"tailor-{r['device']} v{r['version']}", f"{r['bits_per_param']}",
                  f"{(r['file_bytes'] or 0) / 1e6:.1f}", f"{r['ppl']:.2f} ({r['ppl_base']:.2f})",
                  f"{r['piqa']:.3f} ({r['piqa_base']:.3f})",
                  r.get("gates_verdict") or ("pass" if r["gates_passed"] else "FAIL"))
    console.print(t)
    console.print(f"MLflow registry: {root / 'mlflow.db'}  (mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'})")
    for r in rows:
        d = r["device"]
        console.print(f"reports for {d}: {root / 'reports'}/{{search,finetune,evaluate,export,register}}/{d}/")


@app.command()
def deploy(params: Path = typer.Option(Path("params.yaml")),
           serve: bool = typer.Option(False, help="also serve the deployment (blocks; runs on schedule)"),
           pool: str = typer.Option("tailor", help="Prefect process work pool (created if missing)")) -> None:
    """Create the Prefect deployment of the nightly flow with the cron schedule from params.yaml."""
    try:
        p = load_params(params)
    except ConfigError as e:
        _fail(str(e))
    from flows.nightly import deployment

    dep = deployment(p.schedule.cron, p.schedule.timezone, runner=p.runner)
    if serve:
        from prefect import serve as prefect_serve

        prefect_serve(dep)
        return
    from flows.deploy import apply

    dep_id = apply(dep, params.resolve().parent, pool)
    console.print(f"deployment tailor-nightly/nightly ({dep_id}) scheduled '{p.schedule.cron}' {p.schedule.timezone} "
                  f"in work pool '{pool}' (run it: prefect worker start --pool {pool})")


@app.command()
def evaluate(model: Path = typer.Option(..., help="model directory (safetensors + config.json)"),
             base: Optional[Path] = typer.Option(None, help="base model directory (default: params.yaml's model.source)"),
             eval_dir: Path = typer.Option(Path("artifacts/calibrate/eval"), help="eval sets from calibrate"),
             params: Path = typer.Option(Path("params.yaml")),
             out: Optional[Path] = typer.Option(None, help="write metrics/slices/gates JSON here")) -> None:
    """Evaluation, bias slices and gates of any model directory beside the base model."""
    from transformers import AutoTokenizer

    from tailor.eval.schema import EvalDataError
    from tailor.eval.gates import check
    from tailor.eval.harness import NonFiniteScore, run_suite, suite_options, suite_parts, validate_eval_dir
    from tailor.eval.slices import compare
    from tailor.models.base import ModelFileError, load_base, load_model_dir

    try:
        p = load_params(params)
        if not (eval_dir / "wiki.jsonl").is_file():
            raise ConfigError(f"{eval_dir}: no eval sets (run `dvc repro calibrate` first)")
        # every row of every set the suite reads, before a model is even loaded
        validate_eval_dir(eval_dir, suite_parts(eval_dir, suite_options(p.evaluate)["tasks"]))
        comp_model = load_model_dir(model)
        base_model, tok = (load_model_dir(base), AutoTokenizer.from_pretrained(base)) if base else load_base(p.model.source, p.model.n_layers)
    except (ConfigError, ModelFileError, EvalDataError) as e:
        _fail(str(e))
    ev = p.evaluate
    try:
        b = run_suite(base_model, tok, eval_dir, **suite_options(ev))
        c = run_suite(comp_model, AutoTokenizer.from_pretrained(model), eval_dir, **suite_options(ev))
    except (EvalDataError, NonFiniteScore) as e:  # a row lm-eval cannot score; a model scoring NaN
        _fail(str(e))
    metrics, slices = compare(b, c, ev.bootstrap, ev.seed)
    gates = check(metrics, slices, ev.gates)
    t = Table(title=f"{model} vs base")
    t.add_column("metric")
    t.add_column("value")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    for g in gates["gates"]:
        t.add_row(f"gate {g['name']}", f"{g['verdict'].upper()}: {g['reason']}")
    console.print(t)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in (("metrics", metrics), ("slices", slices), ("gates", gates)):
            tmp = out / f".{name}.json.tmp"
            tmp.write_text(json.dumps(obj, indent=2, default=str))
            os.replace(tmp, out / f"{name}.json")
    raise typer.Exit(0 if gates["passed"] else 1)


@app.command()
def report(device: Optional[str] = typer.Argument(None, help="device (default: every device in params.yaml)"),
           version: Optional[str] = typer.Argument(None, help="registered version (default: reports/register's)"),
           params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Write the HTML audit report(s): reports/audit/<device>/<version>.html."""
    os.environ.setdefault("MPLCONFIGDIR", str(params.resolve().parent / ".cache" / "matplotlib"))
    from tailor.report import ReportError, write_report

    try:
        devs = pick_devices(load_params(params), device)
        if version is not None and len(devs) != 1:
            raise ConfigError("VERSION needs a DEVICE")
        paths = [write_report(params.resolve().parent, d, version) for d in devs]
    except (ConfigError, ReportError) as e:
        _fail(str(e))
    for path in paths:
        console.print(f"audit report: {path}")


def _registry_env(params: Path) -> Path:
    """Defaults for registry commands; returns the project root (where mlflow.db and the audit log live)."""
    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    root = params.resolve().parent
    os.environ.setdefault("TAILOR_ROOT", str(root))
    return root


@app.command()
def promote(device: str = typer.Argument(..., help="device name from params.yaml"),
            version: Optional[str] = typer.Argument(None, help="registered version to make champion"),
            rollback: bool = typer.Option(False, "--rollback", help="restore the previous champion instead"),
            reason: str = typer.Option("", help="why (recorded in the audit log and the version's tags)"),
            params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Move `champion` to VERSION after re-checking its gates and file hash (or --rollback)."""
    root = _registry_env(params)
    try:
        p = load_params(params)
        pick_devices(p, device)
        if rollback == (version is not None):
            raise ConfigError("VERSION: give a version to promote, or --rollback without one")
    except ConfigError as e:
        _fail(str(e))
    from tailor import tracking
    from tailor.promote import PromotionRefused, audit_path, move

    name = tracking.registered_name(p.register.model_prefix, device)
    try:
        rec = move(name, version, root=root, reason=reason, rollback=rollback)
    except PromotionRefused as e:
        _fail(f"{name}: {'rollback' if rollback else f'promote version {version}'} refused: {e}", 1)
    gates = ", ".join(f"{k} {v}" for k, v in rec["gates"].items())
    console.print(f"{name}: champion {rec['from'] or '(none)'} -> {rec['to']} by {rec['who']} (gates: {gates}; "
                  f"sha256 {rec['sha256'][:12]} verified); audit log {audit_path(root)}")


@app.command()
def server(data: Path = typer.Option(Path.home() / ".tailor-server", help="server state: stores, artifacts, log"),
           port: int = typer.Option(5055, help="port on 127.0.0.1"),
           params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Start an authenticated MLflow server on 127.0.0.1 with users admin, pipeline, release-manager, auditor."""
    from tailor import server as srv

    root = _registry_env(params)
    try:
        p = load_params(params)
        creds = srv.credentials(root)
        if data.resolve().is_relative_to(root):
            raise srv.ServerError(f"--data: {data} is inside the repository; keep the server's stores outside it")
        s = srv.start(data, creds, [f"{p.register.model_prefix}{d}" for d in p.devices], port=port)
    except (ConfigError, srv.ServerError) as e:
        _fail(str(e))
    console.print(f"MLflow server with authentication: {s.url}  (state in {s.data}; Ctrl-C stops it)")
    console.print(f"use it: export MLFLOW_TRACKING_URI={s.url} MLFLOW_TRACKING_USERNAME=<role> "
                  f"MLFLOW_TRACKING_PASSWORD=...  (roles: pipeline, release-manager, auditor)")
    try:
        s.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()


@app.command()
def status(limit: int = typer.Option(5, help="how many nightly runs"),
           params: Path = typer.Option(Path("params.yaml"))) -> None:
    """The last nightly runs with their stages, and each device's `candidate` / `champion`."""
    _registry_env(params)
    try:
        p = load_params(params)
    except ConfigError as e:
        _fail(str(e))
    from tailor.status import collect

    s = collect(list(p.devices), p.register.model_prefix, limit)
    t = Table(title="Tailor: last nightly runs")
    for col in ("started", "status", "profile", "seconds", "stages"):
        t.add_column(col)
    for r in s["runs"]:
        stages = ", ".join(f"{st['name']}:{st['state']}" for st in r["stages"]) or "-"
        t.add_row(r["started"], r["status"], r["profile"], f"{r['seconds']:.0f}" if r["seconds"] else "-", stages)
    console.print(t)
    a = Table(title="Tailor: registry aliases")
    for col in ("model", "alias", "version", "gates", "sha256", "git sha"):
        a.add_column(col)
    for name, entry in s["models"].items():
        for alias, v in entry.items() or [("-", {})]:
            a.add_row(name, alias, v.get("version", "-"), v.get("gates_passed", "-"), v.get("sha256", "-"),
                      v.get("git_sha", "-"))
    console.print(a)


@app.command(name="reproduce")
def reproduce_cmd(device: str = typer.Argument(..., help="device name from params.yaml"),
                  version: str = typer.Argument(..., help="registered version"),
                  keep: bool = typer.Option(False, help="keep the temporary worktree"),
                  params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Check out VERSION's git sha and dvc.lock in a temp worktree, dvc pull + repro, compare hashes."""
    root = _registry_env(params)
    try:
        p = load_params(params)
        pick_devices(p, device)
    except ConfigError as e:
        _fail(str(e))
    from tailor import tracking
    from tailor.reproduce import ReproduceError, reproduce

    name = tracking.registered_name(p.register.model_prefix, device)
    try:
        r = reproduce(name, device, version, root, keep=keep)
    except ReproduceError as e:
        _fail(f"{name} version {version}: {e}", 1)
    console.print(f"{name} v{r['version']} at {r['git_sha'][:12]} (dvc.lock: {r['dvc_lock']}, remote {r['remote']})")
    console.print(f"stages run: {', '.join(r['ran']) or 'none'}; unchanged: {', '.join(r['unchanged']) or 'none'}")
    verdict = "[green]hashes match[/green]" if r["match"] else "[red]HASH MISMATCH[/red]"
    console.print(f"sha256 {r['sha256'][:16]}... registered {r['registered_sha256'][:16]}...: {verdict}")
    raise typer.Exit(0 if r["match"] else 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
