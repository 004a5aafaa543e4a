"""llama.cpp as a peer (through llama-cpp-python): placeholder until the peer runner lands."""

from __future__ import annotations


def run_all(args, sizes, overhead, use_cgroup, log, done) -> list[dict]:
    return [{"label": "llama.cpp", "section": "peers", "returncode": 1,
             "error": "skipped: the llama.cpp peer runner is not implemented yet"}]
