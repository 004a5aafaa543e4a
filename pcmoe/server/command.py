"""`pcmoe serve`: its command-line options and the command. Importing this module needs neither
FastAPI nor torch (`pcmoe --help` stays fast); the command imports them."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
from pathlib import Path

from pcmoe.options import PcmoeError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("PCMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PCMOE_API_KEY, else open); "
                        "/health and /metrics stay open")
    g.add_argument("--admin-token", default=os.environ.get("PCMOE_ADMIN_TOKEN"),
                   help="enable POST /admin/budget with 'Authorization: Bearer TOKEN' (default: "
                        "$PCMOE_ADMIN_TOKEN, else no admin endpoint)")
    g.add_argument("--budget-file", help="on SIGUSR1, read a new budget (one line: 300MB, 40%%experts) from this "
                                         "file and apply it while serving")
    g.add_argument("--follow-cgroup", action="store_true",
                   help="poll this process's cgroup v1 memory limit and change the weight budget to fit under it "
                        "(what the group holds besides the weights stays as it is, plus --cgroup-headroom)")
    g.add_argument("--cgroup-headroom", type=float, default=32e6,
                   help="bytes kept free under the cgroup limit with --follow-cgroup (default 32 MB)")
    g.add_argument("--model-name", help="model id clients send (default: the checkpoint folder's name)")
    g.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait while one computes; more get 429 (default 8)")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request from arrival: queued -> 503, generating -> stops with "
                        "finish_reason 'length' (default 300)")
    g.add_argument("--state-dir", help="folder of per-user committee states (default: "
                                       "~/.cache/pcmoe/users/<model hash>)")
    g.add_argument("--no-user-state", action="store_true", help="no per-user committee states")
    g.add_argument("--max-users", type=int, default=1000,
                   help="user states kept; beyond it the least recently used is deleted (default 1000)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def default_state_dir(model: str | os.PathLike) -> Path:
    from pcmoe.system import cache_root

    return cache_root() / "users" / hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:12]


def _check(args) -> None:
    for ok, message in ((0 <= args.port < 65536, "--port must be in 0..65535"),
                        (args.queue_size >= 0, "--queue-size must be >= 0"),
                        (args.request_timeout > 0, "--request-timeout must be positive"),
                        (args.max_users >= 1, "--max-users must be at least 1"),
                        (args.api_key is None or args.api_key.strip() != "",
                         "--api-key (or $PCMOE_API_KEY) is empty: give a key, or unset it to serve without one"),
                        (args.admin_token is None or args.admin_token.strip() != "",
                         "--admin-token (or $PCMOE_ADMIN_TOKEN) is empty: give a token, or unset it"),
                        (args.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024")):
        if not ok:
            raise PcmoeError(message)


def cmd_serve(args) -> int:
    _check(args)
    try:
        import uvicorn

        from pcmoe.server.api import create_app
        from pcmoe.server.states import unusable
    except ImportError as e:
        raise PcmoeError(f"{e.name} is not installed; pip install 'pcmoe[server]'") from None
    from pcmoe.args import engine_from_args

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    state_dir = None if args.no_user_state else (args.state_dir or default_state_dir(args.model))
    if state_dir is not None and (why := unusable(state_dir)):  # before the model loads, in one line
        print(f"warning: serving without per-user committee states: cannot write to {state_dir} ({why}); "
              f"give a writable --state-dir, or --no-user-state", file=sys.stderr)
        state_dir = None
    engine = engine_from_args(args)
    try:
        name = args.model_name or Path(args.model).resolve().name
        app = create_app(engine, model_name=name, api_key=args.api_key, queue_size=args.queue_size,
                         request_timeout_s=args.request_timeout, state_dir=state_dir, max_users=args.max_users,
                         max_body_bytes=args.max_body_bytes, admin_token=args.admin_token)
        if args.budget_file:
            watch_budget_file(args.budget_file, app.state.service.worker)
        if args.follow_cgroup:
            from pcmoe.server.live import follow_cgroup, own_memory_cgroup

            folder = own_memory_cgroup()
            if folder is None:
                print("warning: --follow-cgroup: no cgroup v1 memory limit for this process; not following",
                      file=sys.stderr)
            else:
                follow_cgroup(app.state.service.worker, folder, int(args.cgroup_headroom))
        print(f"serving {name} at http://{args.host}:{args.port}/v1"
              + (f" (user states in {state_dir})" if state_dir else ""), file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def watch_budget_file(path: str, worker) -> None:
    """SIGUSR1 -> read a budget from `path` and give it to the engine; one line on stderr either way.
    The work runs on a thread of its own: a signal handler may interrupt code holding the worker's lock."""

    def change():
        try:
            budget = Path(path).read_text().strip()
            summary, _ = worker.set_budget(budget)
            print(f"budget changed to {summary['budget']} (committee sizes {summary['committee_sizes']})",
                  file=sys.stderr)
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: budget file {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        except PcmoeError as e:
            print(f"error: {e}", file=sys.stderr)

    signal.signal(signal.SIGUSR1, lambda signum, frame: threading.Thread(target=change, daemon=True).start())
