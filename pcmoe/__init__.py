"""pcmoe: serve Mixture-of-Experts models under a memory budget with a Parameter Committee.

    import pcmoe
    engine = pcmoe.load("models/pcmoe-lm", budget="50%experts", policy="committee")
"""

__all__ = ["Engine", "GenerationStep", "PcmoeError", "load"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import pcmoe` (and every CLI command's start) does not pay for torch + transformers
    # until the engine is actually used.
    if name in __all__:
        from pcmoe import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pcmoe' has no attribute {name!r}")
