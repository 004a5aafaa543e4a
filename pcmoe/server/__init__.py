"""OpenAI-compatible HTTP server for one engine (needs the [server] extra). See docs/SERVER.md.

    pcmoe serve --model models/pcmoe-lm --budget 50%experts      # http://127.0.0.1:8000/v1

    from pcmoe.server import create_app
    app = create_app(engine, model_name="pcmoe-lm", api_key=None, state_dir="users/")

The parts, each readable on its own:

    api.py      routes, request handling, replies and SSE streams; create_app
    schema.py   request bodies (pydantic), the sampling bounds of pcmoe.options
    errors.py   OpenAI-shaped errors, FastAPI's and Starlette's errors turned into them
    gate.py     ASGI middleware: request metrics, API key, body size limit
    prompts.py  prompt / messages -> token ids on a tokenizer thread, context limits
    worker.py   the engine thread: bounded FIFO, cancellation, deadlines
    states.py   per-user committee state files
    metrics.py  Prometheus metrics
    command.py  `pcmoe serve` (importable without FastAPI or torch)
"""

from pcmoe.server.command import add_serve_arguments, cmd_serve, default_state_dir

__all__ = ["add_serve_arguments", "cmd_serve", "create_app", "default_state_dir"]


def __getattr__(name):
    # Lazy: the command-line options are built without importing FastAPI.
    if name == "create_app":
        from pcmoe.server.api import create_app

        return create_app
    raise AttributeError(f"module 'pcmoe.server' has no attribute {name!r}")
