"""The public entry points, in one place:

    import pcmoe                      # pcmoe.load is pcmoe.engine.load
    engine = pcmoe.load("models/pcmoe-lm", budget="50%experts", policy="committee")
    for step in engine.generate("def fibonacci(", max_new_tokens=32):
        print(step.text, end="")
    print(step.stats)                 # this request's statistics; engine.stats() since load

Where things live: pcmoe.loader (options -> layout -> sizing -> build), pcmoe.runtime (the Engine:
step boundary, forward, statistics, per-user state), pcmoe.generation (sampling, stop strings,
context limits, per-request statistics).
"""

from pcmoe.generation import GenerationStep, generate
from pcmoe.loader import inspect, load
from pcmoe.options import PcmoeError
from pcmoe.runtime import Engine

__all__ = ["Engine", "GenerationStep", "PcmoeError", "generate", "inspect", "load"]
