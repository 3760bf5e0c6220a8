import os

import torch
from hypothesis import HealthCheck, settings

# Tests use small matrices, where a second OpenMP thread only adds synchronisation: on a shared
# 2-core machine it made matmuls up to 50x slower. Child processes get OMP_NUM_THREADS=1.
torch.set_num_threads(1)

# No test may reach a model hub: these machines have no network, and CI must not depend on one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Fuzz depth: `ci` keeps the default run short; `thorough` is what the decoders were signed off
# with (HYPOTHESIS_PROFILE=thorough pytest -k fuzz).
settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
