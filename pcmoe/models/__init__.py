from pcmoe.models.families import FAMILIES  # noqa: F401
