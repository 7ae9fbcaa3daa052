import pytest

from opdisagg_rt.models.loader import load_model


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once per test session (float32 weights)."""
    return load_model(None)
