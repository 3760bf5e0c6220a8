"""The coordinator's transport settings in `[trainer]`: defaults, overrides, bad values."""

import pytest

from protocol.errors import PoolSpecError
from protocol.host import HostConfig
from trainer.config import from_dict


def test_the_connection_rate_is_a_coordinator_setting_and_bad_values_are_refused():
    default = from_dict({}).trainer
    assert default.connections_per_ip_s == HostConfig.connections_per_ip_s
    assert default.connection_burst == HostConfig.connection_burst
    assert default.connections_held_per_ip == HostConfig.connections_held_per_ip
    section = {"connections_per_ip_s": 10, "connection_burst": 200, "connections_held_per_ip": 64}
    raised = from_dict({"trainer": section}).trainer
    assert (raised.connections_per_ip_s, raised.connection_burst) == (10, 200)
    assert raised.connections_held_per_ip == 64
    with pytest.raises(PoolSpecError, match="connections_per_ip_s"):
        from_dict({"trainer": {"connections_per_ip_s": 0}})
    with pytest.raises(PoolSpecError, match="connection_burst"):
        from_dict({"trainer": {"connection_burst": 0.5}})
    with pytest.raises(PoolSpecError, match="connections_held_per_ip"):
        from_dict({"trainer": {"connections_held_per_ip": 0}})
