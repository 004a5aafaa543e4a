"""Per-user committee states: one JSON file per user, the least recently used pruned beyond a cap.

A request with the OpenAI `user` field restores that user's committee state before it runs
(engine.load_state) and saves it afterwards, atomically, to `<folder>/<sha256(user)[:32]>.json`: a
returning user, also after a restart, finds the experts its topics need. The file name is a hash,
so nothing in a request names a path. A state that cannot be used (corrupt, another model's) is
ignored with a warning and the user starts fresh; a failed save is a warning too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

from pcmoe.system import atomic_write_text

log = logging.getLogger("pcmoe.server")

STATE_FORMAT = "pcmoe-state/1"
_STATE_FILE = re.compile(r"[0-9a-f]{32}\.json")


def one_line(e: BaseException) -> str:
    message = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def unusable(folder: str | os.PathLike) -> str | None:
    """Why per-user states cannot be kept in `folder` (created if missing), or None when they can:
    it must be a folder this process can create files in."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or one_line(e)
    return None


def check_state(state, shape: list[int]) -> None:
    """Reject what engine.load_state would take and fail on later, inside a generation (a score of
    the wrong length, a member id out of range)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("num_experts") != shape:
        raise ValueError("not a committee state of this model")
    rows = {key: state.get(key) for key in ("score", "window", "members")}
    for key, value in rows.items():
        if not isinstance(value, list) or len(value) != len(shape) or not all(isinstance(r, list) for r in value):
            raise ValueError(f"'{key}' is not one list per MoE layer")
    for layer, n in enumerate(shape):
        for key in ("score", "window"):
            row = rows[key][layer]
            if len(row) != n or not all(type(x) in (int, float) and math.isfinite(x) for x in row):
                raise ValueError(f"'{key}' of MoE layer {layer} is not {n} finite numbers")
        if not all(type(m) is int and 0 <= m < n for m in rows["members"][layer]):
            raise ValueError(f"'members' of MoE layer {layer} are not expert ids in 0..{n - 1}")


class UserStates:
    """Committee state files of users, <folder>/<sha256(user)[:32]>.json, at most `max_users` of them:
    a save beyond that deletes the least recently used (the order survives restarts as file mtimes).
    Used on the engine thread only."""

    def __init__(self, folder: str | os.PathLike, max_users: int = 1000):
        if max_users < 1:
            raise ValueError("max_users must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_users = max_users

        def last_use(path: Path):
            with contextlib.suppress(OSError):
                return path.stat().st_mtime_ns, path.name
            return 0, path.name

        files = sorted((p for p in self.folder.iterdir() if _STATE_FILE.fullmatch(p.name)), key=last_use)
        self._used = dict.fromkeys(p.name for p in files)  # least recently used first
        self._prune()

    def path(self, user: str) -> Path:
        return self.folder / f"{hashlib.sha256(user.encode()).hexdigest()[:32]}.json"

    def restore(self, engine, user: str) -> bool:
        """Load the user's state into the engine; False (start fresh) when there is none or it cannot be
        used, whatever the reason: corrupt, another model's, too deeply nested to parse."""
        path = self.path(user)
        try:
            state = json.loads(path.read_text())
            check_state(state, [c.num_experts for c in engine.committees])
            engine.load_state(state)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            log.warning("ignoring committee state %s: %s", path.name, one_line(e))
            return False

    def save(self, engine, user: str) -> None:
        path = self.path(user)
        try:
            atomic_write_text(path, json.dumps(engine.save_state()))
        except Exception as e:  # best effort: the reply matters more than the state
            log.warning("cannot save committee state %s: %s", path.name, one_line(e))
            return
        self._used.pop(path.name, None)
        self._used[path.name] = None
        self._prune()

    def _prune(self) -> None:
        while len(self._used) > self.max_users:
            name = next(iter(self._used))
            del self._used[name]
            try:
                (self.folder / name).unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot delete committee state %s: %s", name, one_line(e))
