"""`pcmoe budget`: give a running server a new weight budget (POST /admin/budget), stdlib only.

    pcmoe budget 300MB --url http://127.0.0.1:8000 --admin-token TOKEN     # or $PCMOE_ADMIN_TOKEN

The server answers with what it will keep (committee sizes, resident bytes); a budget it cannot
serve is refused there and changes nothing. Every failure is one line (exit 2).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from pcmoe.options import PcmoeError


def fill_budget(p) -> None:
    p.add_argument("budget", help="the new weight budget: bytes with a unit (300MB), a share (40%%), or 40%%experts")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server (default http://127.0.0.1:8000; a trailing /v1 is fine)")
    p.add_argument("--admin-token", default=os.environ.get("PCMOE_ADMIN_TOKEN"),
                   help="the server's --admin-token (default: $PCMOE_ADMIN_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    p.add_argument("--json", action="store_true", help="print the server's whole answer as JSON")
    p.set_defaults(func=cmd_budget, check=check_budget)


def check_budget(args) -> None:
    if not args.admin_token or not args.admin_token.strip():
        raise PcmoeError("no admin token: pass --admin-token (the one the server was started with) or set "
                         "$PCMOE_ADMIN_TOKEN")
    if not args.url.startswith(("http://", "https://")):
        raise PcmoeError(f"--url {args.url} is not an http(s) address (e.g. http://127.0.0.1:8000)")
    if args.timeout <= 0:
        raise PcmoeError("--timeout must be positive")


def endpoint(url: str) -> str:
    """The admin endpoint of a server address given as the API's base (…/v1) or the server's root."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + "/admin/budget"


def post_budget(url: str, token: str, budget: str, timeout: float = 60.0) -> dict:
    """The server's answer to a budget change; PcmoeError (one line) for every failure."""
    target = endpoint(url)
    request = urllib.request.Request(target, data=json.dumps({"budget": budget}).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {token.strip()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read().decode())
    except urllib.error.HTTPError as e:
        raise PcmoeError(f"{target} refused the budget ({e.code}): {_message(e)}") from None
    except urllib.error.URLError as e:
        raise PcmoeError(f"cannot reach {target}: {e.reason}; is `pcmoe serve --admin-token ...` running there?") \
            from None
    except (TimeoutError, OSError) as e:
        raise PcmoeError(f"no answer from {target}: {e}") from None
    except ValueError:
        raise PcmoeError(f"{target} did not answer with JSON; is it a pcmoe server?") from None


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read().decode())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return e.reason or "no message"


def summary_line(answer: dict) -> str:
    from pcmoe.budget import format_bytes

    state = "applied" if answer.get("applied") else "applying at the running generation's next token"
    return (f"budget {answer.get('budget')} {state}: committee sizes {answer.get('committee_sizes')}, "
            f"weights {format_bytes(answer.get('weight_bytes'))}, "
            f"resident now {format_bytes(answer.get('resident_bytes'))}, RSS {format_bytes(answer.get('rss_bytes'))}")


def cmd_budget(args) -> int:
    answer = post_budget(args.url, args.admin_token, args.budget, args.timeout)
    print(json.dumps(answer, indent=1) if args.json else summary_line(answer))
    return 0
