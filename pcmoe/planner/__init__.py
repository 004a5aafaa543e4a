"""The offline planner (paper §6): predict a configuration's memory, latency and quality from a
measured device profile, and search for the best configuration within a memory (and latency) limit.

    space.py    what a configuration is (per-layer committee size and precision, F), JSON, validation
    predict.py  DeviceProfile (the profile JSON), memory and latency predictors
    quality.py  quality predictors fitted on measured samples: the paper's MLP, a per-layer sensitivity model
    search.py   seeded genetic search, exhaustive search, Pareto points, infeasibility errors

Torch-free except for fitting the MLP; nothing here loads a model or measures anything.
"""
