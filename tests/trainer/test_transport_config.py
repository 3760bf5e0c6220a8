"""The coordinator's transport settings in `[trainer]`: defaults, overrides, bad values."""

import pytest

from protocol.errors import PoolSpecError
from protocol.host import HostConfig
from trainer.config import from_dict


def test_the_connection_rate_is_a_coordinator_setting_and_bad_values_are_refused():
    default = from_dict({}).trainer
    assert default.connections_per_ip_s == HostConfig.connections_per_ip_s
    assert default.connection_burst == HostConfig.connection_burst
    raised = from_dict({"trainer": {"connections_per_ip_s": 10, "connection_burst": 200}})
    assert (raised.trainer.connections_per_ip_s, raised.trainer.connection_burst) == (10, 200)
    with pytest.raises(PoolSpecError, match="connections_per_ip_s"):
        from_dict({"trainer": {"connections_per_ip_s": 0}})
    with pytest.raises(PoolSpecError, match="connection_burst"):
        from_dict({"trainer": {"connection_burst": 0.5}})
