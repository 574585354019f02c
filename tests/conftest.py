import os

import pytest
import torch
from hypothesis import settings

# Hypothesis: few examples by default (CI time), more with HYPOTHESIS_PROFILE=thorough.
settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
