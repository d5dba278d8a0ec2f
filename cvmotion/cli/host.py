"""cli layer: ``cvmotion host serve`` — run one host daemon (untrusted hypervisor side) in the foreground."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cvmotion.errors import UsageError
from cvmotion.ipc.latency import tune_for_latency

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = subparsers.add_parser("host", help="run a host daemon")
    verbs = host.add_subparsers(dest="verb", metavar="VERB")
    serve = verbs.add_parser(
        "serve",
        help="serve the host API on ADDR; start the platform process (emulated AMD-SP + migration agent)",
        description="Run one host: its emulated secure processor, its VM processes and the migration engine.",
    )
    serve.add_argument("--name", required=True, help="host name, e.g. host-a")
    serve.add_argument("--listen", required=True, metavar="ADDR", help="HOST:PORT for the host API (port 0: pick)")
    serve.add_argument("--data-dir", required=True, type=Path, help="host state: chip identity, VMs, events")
    serve.add_argument("--product", default="Genoa", choices=("Milan", "Genoa", "Turin"), help="chip (first start)")
    serve.add_argument("--pool", default="default", help="host pool name (bound to the chip by the pool CA)")
    serve.add_argument("--vendor-dir", type=Path, help="emulated vendor (makes the chip on first start)")
    serve.add_argument("--kds", help="KDS URL for VCEK certificates (default: the vendor directory)")
    serve.add_argument("--pool-ca-dir", type=Path, help="operator pool CA (issues this host's pool credential)")
    serve.add_argument("--attestation", help="attestation service URL (the paravisor attests there)")
    serve.add_argument("--key-release", metavar="URL", help="key-release service for the guests' data keys")
    serve.add_argument("--migration-port", type=int, default=0, help="TCP port for incoming migrations (0: pick)")
    serve.add_argument(
        "--no-standby",
        dest="standby",
        action="store_false",
        help="do not keep a warm VM process for the next VM (each VM then waits ~0.5-1 s for its process)",
    )
    serve.add_argument(
        "--max-guest-memory",
        metavar="SIZE",
        help="memory all VMs of this host may have together, e.g. 8G (more: 409); default no limit",
    )
    serve.add_argument(
        "--migration-advertise",
        metavar="HOST:PORT",
        help="address sources should dial for migrations (default: the listener)",
    )
    fleet = serve.add_argument_group("fleet controller (optional)")
    fleet.add_argument("--controller", metavar="URL", help="register with this fleet controller and heartbeat")
    fleet.add_argument("--controller-token", help="registration token (role Host; default $CVMOTION_HOST_TOKEN)")
    fleet.add_argument("--region", default="local")
    fleet.add_argument("--zone", default="")
    fleet.add_argument("--capacity-vcpus", type=int, default=96, help="vCPUs this host offers the fleet")
    fleet.add_argument("--capacity-gib", type=int, default=768, help="GiB of guest memory this host offers")
    serve.set_defaults(handler=_serve)
    from cvmotion.cli.fleet_host import register_host_list

    register_host_list(verbs)
    host.set_defaults(handler=lambda _a: _usage(host))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _serve(args: argparse.Namespace) -> int:
    from cvmotion.abi.sku import parse_memory
    from cvmotion.cli.paths import default_home
    from cvmotion.host.api import create_app
    from cvmotion.host.daemon import HostConfig, HostDaemon
    from cvmotion.ipc.http import listen_socket, parse_listen, uvicorn_config

    host, port = parse_listen(args.listen)
    vendor_dir = args.vendor_dir or (default_home() / "vendor")
    config = HostConfig(
        name=args.name,
        data_dir=args.data_dir,
        listen_host=host,
        listen_port=port,
        migration_port=args.migration_port,
        pool=args.pool,
        product=args.product,
        vendor_dir=vendor_dir,
        kds_url=args.kds,
        attestation_url=args.attestation,
        pool_ca_dir=args.pool_ca_dir or (default_home() / "pool-ca"),
        migration_advertise=args.migration_advertise,
        key_release_url=args.key_release,
        standby=args.standby,
        max_guest_memory=parse_memory(args.max_guest_memory) if args.max_guest_memory else None,
    )
    from cvmotion.host.succession import Handoff

    # A successor started by an update in place (``host.maintenance``) serves its predecessor's sockets.
    handoff = Handoff.from_environment()
    if handoff is None:
        try:
            sock, url = listen_socket(host, port)
        except OSError as exc:
            raise UsageError(f"--listen {args.listen}: {exc.strerror}") from None
    else:
        sock = handoff.http_socket()
        url = f"http://{host}:{sock.getsockname()[1]}"
    import logging

    args.data_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(args.data_dir / "host.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    daemon = HostDaemon(config)
    daemon.api_socket = sock
    app = create_app(daemon)
    if handoff is None:
        (args.data_dir / "daemon.pid").write_text(str(os.getpid()))
        daemon.start()
    else:
        # Loaded (the interpreter, every import, the app, the credential): now the predecessor may pause its VMs
        # and let go.
        daemon.prepare()
        handoff.take_over(timeout=120)
        (args.data_dir / "daemon.pid").write_text(str(os.getpid()))
        daemon.start(migration_socket=handoff.migration_socket())
    info = daemon.host_info() | {"url": url, "emulated_platform": True}
    (args.data_dir / "host.json").write_text(json.dumps(info, indent=2))
    print(
        f"cvmotion host {args.name}: {url} (migration port {daemon.migration_port}, emulated {info['product']} chip"
        f" {str(info['chip_id'])[:16]}...)",
        flush=True,
    )
    server = uvicorn.Server(uvicorn_config(app))
    tune_for_latency()
    from cvmotion.cli.fleet_host import start_registration

    registration = start_registration(daemon, args, url)
    try:
        server.run(sockets=[sock])
    finally:
        if registration is not None:
            registration.stop()
        daemon.stop()
    return 0
