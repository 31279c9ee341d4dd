import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLES = ROOT.parent / "shared" / "samples"


@pytest.fixture
def cu117():
    from checks.stack import load_stack

    return load_stack("cu117")


@pytest.fixture
def ctx(cu117):
    from checks.registry import Context

    return Context(cu117.data, cu117.expectations())
