"""cli layer: ``cvmotion controller serve|token create`` — run the fleet controller, issue API tokens."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvmotion.errors import UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = subparsers.add_parser("controller", help="the fleet controller: serve it, create API tokens")
    verbs = ctl.add_subparsers(dest="verb", metavar="VERB")
    serve = verbs.add_parser("serve", help="serve the controller API (ARM-shaped REST, OpenAPI at /openapi.json)")
    serve.add_argument("--listen", default="127.0.0.1:8790", metavar="ADDR", help="HOST:PORT (port 0: pick)")
    serve.add_argument("--db", help="database URL (default: SQLite in the data directory; or postgresql://...)")
    serve.add_argument("--data-dir", type=Path, help="default $CVMOTION_HOME/controller")
    serve.add_argument("--heartbeat-timeout", type=float, default=6.0, help="seconds before a host is Unavailable")
    serve.add_argument(
        "--workers", type=int, default=8, help="operation worker threads (live moves among them: see below)"
    )
    serve.add_argument("--lease", type=float, default=5.0, help="seconds an operation claim lasts unrenewed")
    serve.add_argument(
        "--maintenance-notice", type=float, default=15.0, metavar="S",
        help="a drain's Scheduled Events NotBefore, seconds after they are scheduled (a drain may say otherwise)",
    )  # fmt: skip
    serve.add_argument("--migrations-per-cluster", type=int, default=5, metavar="N", help="live moves at once")
    serve.set_defaults(handler=_serve)

    token = verbs.add_parser("token", help="API tokens")
    token_verbs = token.add_subparsers(dest="token_verb", metavar="VERB")
    create = token_verbs.add_parser("create", help="issue a bearer token with a role")
    create.add_argument(
        "--data-dir", type=Path, help="the controller's data directory (default $CVMOTION_HOME/controller)"
    )
    create.add_argument("--db", help="database URL (default: the one the controller in --data-dir uses)")
    create.add_argument(
        "--role", required=True, choices=("Owner", "Contributor", "Reader", "PolicyAdministrator", "Host")
    )
    create.add_argument("--subscription", default="*", help="scope of the role (default: every subscription)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=_token_create)
    token.set_defaults(handler=lambda _a: _usage(token))
    ctl.set_defaults(handler=lambda _a: _usage(ctl))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _data_dir(args: argparse.Namespace) -> Path:
    from cvmotion.cli.paths import default_home

    return Path(args.data_dir or default_home() / "controller")


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from cvmotion.cli._fleet import register_controller_dir
    from cvmotion.control.api import create_app
    from cvmotion.control.maintenance_options import MaintenanceOptions
    from cvmotion.control.service import FleetController
    from cvmotion.ipc.http import listen_socket, parse_listen, uvicorn_config

    for flag, value in (("--workers", args.workers), ("--migrations-per-cluster", args.migrations_per_cluster)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give at least 1")
    data_dir = _data_dir(args)
    data_dir.mkdir(parents=True, exist_ok=True)
    host, port = parse_listen(args.listen)
    logging.basicConfig(
        filename=str(data_dir / "controller.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    maintenance = MaintenanceOptions(
        notice_s=args.maintenance_notice, cluster_limit=args.migrations_per_cluster, lease_s=args.lease
    )
    controller = FleetController(
        data_dir, args.db, heartbeat_timeout=args.heartbeat_timeout, workers=args.workers, lease=args.lease,
        maintenance=maintenance,
    )  # fmt: skip
    try:
        sock, url = listen_socket(host, port)
    except OSError as exc:
        controller.stop()
        raise UsageError(f"--listen {args.listen}: {exc.strerror}") from None
    controller.start()
    register_controller_dir(url, data_dir)
    print(
        f"cvmotion controller: {url} ({controller.dialect}, {controller.replica}, leader={controller.leader},"
        f" owner token in {data_dir / 'owner.token'})",
        flush=True,
    )
    server = uvicorn.Server(uvicorn_config(create_app(controller)))
    try:
        server.run(sockets=[sock])
    finally:
        controller.stop()
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from cvmotion.control.auth import Role, issue_token
    from cvmotion.control.db import database_url, open_database
    from cvmotion.files import read_json

    data_dir = _data_dir(args)
    db = args.db
    if db is None:
        config = data_dir / "controller.json"
        if not config.exists():
            raise UsageError(f"{data_dir} holds no controller (start 'cvmotion controller serve' first, or give --db)")
        db = str(read_json(config, "controller config")["db"])
    engine = open_database(database_url(db, data_dir))
    try:
        with Session(engine) as session, session.begin():
            token = issue_token(session, Role(args.role), args.subscription)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"token": token, "role": args.role, "subscription": args.subscription}))
    else:
        print(token)
    return 0
