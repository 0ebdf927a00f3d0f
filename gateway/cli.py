"""The `gateway` command: serve, check, test, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

from gateway.config import loader as config
from gateway.core.errors import ConfigError
from gateway.ops.token import token_from_env

if TYPE_CHECKING:
    import uvicorn

    from gateway.workers import WorkerDir


def check(path: str, strict: bool = False) -> int:
    """Validate a config file; print a one-line summary (0) or one line per problem (1);
    `strict`: a call that declares no schema is a problem too."""
    loaded = load_or_report(path)
    if loaded is None:
        return 1
    cfg = loaded.config
    if strict:
        untyped = config.untyped_calls(loaded)
        for problem in untyped:
            print(problem, file=sys.stderr)
        if untyped:
            return 1
    calls = sum(len(e.calls) for e in cfg.endpoints)
    print(f"{path}: ok: {len(cfg.sources)} sources, {len(cfg.endpoints)} endpoints, {calls} calls")
    return 0


def serve(
    path: str, host: str, port: int, workers: int, log_level: str, watch: bool = False
) -> int:
    """Run the gateway under uvicorn (uvloop, httptools) until interrupted; with `workers` > 1,
    under uvicorn's supervisor, whose SIGHUP reloads every worker in place."""
    import uvicorn

    from gateway.edge.server import uvicorn_options
    from gateway.workers import WORKERS_ENV, WorkerDir

    loaded = load_or_report(path)
    if loaded is None or not admin_token_ok():
        return 1
    server = loaded.config.server
    os.environ["GATEWAY_CONFIG"] = path
    os.environ["GATEWAY_WATCH"] = "1" if watch else "0"
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set before uvicorn starts the workers: prometheus-client picks its storage at import,
        # and each worker writes its metrics there for whichever worker a scrape reaches.
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    options = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": "uvloop",
        # httptools, one write per response; `server:`'s limits, keep-alive and drain time
        **uvicorn_options(server.limits()),
        "log_level": log_level,
        "access_log": False,
        "lifespan": "on",
    }
    shared = None
    try:
        if workers <= 1:
            uvicorn.run("gateway.app:app_from_env", **options)
            return 0
        # The workers' shared directory: every worker starts on generation 1, this very text,
        # whatever the file holds by the time uvicorn starts (or restarts) it.
        shared = tempfile.mkdtemp(prefix="gateway-workers-")
        os.environ[WORKERS_ENV] = shared
        WorkerDir(shared).publish(loaded.file, loaded.text)
        supervise(uvicorn.Config("gateway.app:app_from_env", **options), WorkerDir(shared))
    finally:
        for directory in (metrics_dir, shared):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
    return 0


def supervise(config: uvicorn.Config, shared: WorkerDir) -> None:
    """Run uvicorn's worker supervisor for `config`, with SIGHUP reloading every worker in place
    (`supervisor_reload`) instead of uvicorn's own answer, which replaces the workers one by one,
    each reading the file anew (caches, pools and breaker states lost; workers on different
    texts if the file changes meanwhile)."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    from gateway.ops import log

    log.configure()  # the supervisor's own lines (SIGHUP's), as the workers write theirs
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])
    path = os.environ["GATEWAY_CONFIG"]
    supervisor.handle_hup = lambda: supervisor_reload(shared, path)  # type: ignore[method-assign]
    try:
        supervisor.run()
    finally:
        sock.close()


def supervisor_reload(wd: WorkerDir, path: str) -> None:
    """(In the supervisor, on SIGHUP) validate the file and publish it for every worker; a
    thread logs their answers. A bad file is refused here: no worker sees it."""
    import threading

    import structlog

    from gateway.workers import Everywhere

    log = structlog.get_logger("gateway.app")
    try:
        loaded = config.load(path)
    except ConfigError as exc:
        log.warning("config_reload_refused", problems=[str(p) for p in exc.problems])
        return
    workers = wd.workers()
    number = wd.publish(loaded.file, loaded.text)
    log.info("config_published", generation=number, workers=len(workers))

    def report() -> None:
        done = Everywhere(number, tuple(wd.wait(number, workers)))
        log.info("config_reloaded_everywhere", **done.report())

    threading.Thread(target=report, name="gateway-reload-answers", daemon=True).start()


def contract_test(config: str, paths: list[str], junit: str | None) -> int:
    """Run contract files against a config: 0 all passed, 1 a case failed, 2 a bad file."""
    from gateway.contracts import command

    if os.path.isdir(config):  # `gateway test tests/contracts/`: a config is never a directory
        config, paths = "gateway.yaml", [config, *paths]
    # Access lines (info) would bury the results; warnings and errors still show.
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "warning")
    return command.run(config, paths, junit)


def load_or_report(path: str) -> config.LoadedConfig | None:
    """Return the loaded config, or None after printing its problems, one per line."""
    try:
        return config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def admin_token_ok() -> bool:
    """Return whether `GATEWAY_ADMIN_TOKEN` is unset or long enough; otherwise print why not."""

    try:
        token_from_env()
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return False
    return True


def schema(*, contracts: bool = False) -> int:
    """Print the JSON Schema of gateway.yaml (or of a contract file) on stdout."""
    if contracts:
        from gateway.contracts.model import contract_schema

        print(json.dumps(contract_schema(), indent=2, ensure_ascii=False))
    else:
        from gateway.config.jsonschema import print_schema

        print_schema(sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway")
    p_serve.add_argument("--config", default="gateway.yaml")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8080)
    p_serve.add_argument("--workers", type=int, default=1)
    p_serve.add_argument("--log-level", default="warning")
    p_serve.add_argument(
        "--watch", action="store_true", help="reload whenever the config file changes"
    )
    p_check = sub.add_parser("check", help="validate a config file")
    p_check.add_argument("file", nargs="?", default="gateway.yaml")
    p_check.add_argument(
        "--strict", action="store_true", help="also list the calls that declare no schema"
    )
    p_test = sub.add_parser(
        "test", help="run contract files against the config, with scripted upstreams"
    )
    p_test.add_argument("config", nargs="?", default="gateway.yaml", metavar="CONFIG")
    p_test.add_argument(
        "paths", nargs="*", metavar="PATHS", help="contract files or directories (tests/contracts/)"
    )
    p_test.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    p_schema = sub.add_parser(
        "schema", help="print the JSON Schema of gateway.yaml (or of contract files), for editors"
    )
    p_schema.add_argument(
        "--contracts", action="store_true", help="the schema of contract files instead"
    )
    p_demo = sub.add_parser("demo", help="run the whole product on this machine, nothing needed")
    p_demo.add_argument("--host", default="127.0.0.1")
    p_demo.add_argument("--port", type=int, default=8080)
    p_demo.add_argument("--mysql", metavar="DSN", help="use this MySQL/MariaDB for the catalog")
    p_demo.add_argument("--redis", metavar="URL", help="use this Redis for the cache")
    args = parser.parse_args(argv)
    if args.command == "check":
        sys.exit(check(args.file, args.strict))
    if args.command == "schema":
        sys.exit(schema(contracts=args.contracts))
    if args.command == "test":
        sys.exit(contract_test(args.config, args.paths, args.junit))
    if args.command == "serve":
        sys.exit(serve(args.config, args.host, args.port, args.workers, args.log_level, args.watch))
    from gateway.demo import main as demo

    if not admin_token_ok():
        sys.exit(1)
    sys.exit(demo.run(args.host, args.port, mysql=args.mysql, redis=args.redis))
