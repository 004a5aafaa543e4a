"""pcmoe: serve Mixture-of-Experts models under a memory budget with a Parameter Committee."""

from pcmoe.engine import Engine, GenerationStep, PcmoeError, load

__all__ = ["Engine", "GenerationStep", "PcmoeError", "load"]
__version__ = "0.1.0"
