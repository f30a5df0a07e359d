import pytest


def pytest_addoption(parser):
    parser.addoption("--faults-full", action="store_true", help="fault suite at full size (make faults)")


@pytest.fixture
def fault_size(request) -> tuple[int, float]:
    """(concurrent streaming clients, seconds of load before and after the fault)."""
    return (8, 6.0) if request.config.getoption("--faults-full") else (4, 2.5)
