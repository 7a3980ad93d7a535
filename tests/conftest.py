import pytest

from tests.nsutil import Namespaces, have_netns


@pytest.fixture
def namespaces():
    """Factory of network namespaces that are removed after the test, even when it fails."""
    if not have_netns():
        pytest.skip("needs root and iproute2 to create network namespaces")
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.cleanup()


from tests.labutil import hatun_factory, lab_factory  # noqa: E402,F401  (fixtures)
from tests.wheelhouse import wheelhouse  # noqa: E402,F401  (fixture)
