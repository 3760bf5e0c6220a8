import msgspec
import pytest

from protocol import poolspec
from protocol.config import apply_overrides, parse_value
from protocol.errors import PoolSpecError, SwarmError

KEY = "ab" * 32

TOML_A = f"""
name = "demo"
seed = 7

[coordinator]
public_key = "{KEY}"
bootstrap = ["/ip4/127.0.0.1/tcp/4001"]

[sampling]
temperature = 0.7
group_size = 4
"""

# The same spec: other key order, whitespace, comments, and a default spelled out.
TOML_B = f"""
# comment
[sampling]
group_size=4
temperature   =   0.7

[coordinator]
bootstrap = [ "/ip4/127.0.0.1/tcp/4001" ]
public_key = "{KEY}"
relays = []

[model]
name = "tiny"
"""


def test_pool_id_ignores_formatting_and_key_order():
    a = poolspec.loads(TOML_A)
    b = poolspec.loads(TOML_B.replace("[sampling]", 'name = "demo"\nseed = 7\n[sampling]', 1))
    assert poolspec.pool_id(a) == poolspec.pool_id(b)
    assert len(poolspec.pool_id(a)) == poolspec.POOL_ID_CHARS
    assert poolspec.pool_id(a).isalnum() and poolspec.pool_id(a).islower()


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return "f" * 64 if len(value) == 64 else value + "x"
    if isinstance(value, list):
        return [*value, "/ip4/127.0.0.2/tcp/1"]
    if isinstance(value, dict):
        return {"extra": 1}
    return 1  # None -> a value


def test_pool_id_changes_with_every_field():
    base = msgspec.to_builtins(poolspec.loads(TOML_A))
    base_id = poolspec.pool_id(poolspec.from_dict(base))
    seen = {base_id}
    leaves = list(_leaves(base))
    assert len(leaves) > 40  # every section is covered
    for path, value in leaves:
        tree = apply_overrides(base, [])
        node = tree
        for part in path[:-1]:
            node = node[part]
        new = _changed(value)
        if path[-1] == "dtype":
            new = "bfloat16"
        elif path[-1] in ("loss_type",):
            new = "gspo"
        elif path[-1] == "scale_rewards":
            new = "none"
        elif path[-1] == "top_p":
            new = 0.5
        node[path[-1]] = new
        changed_id = poolspec.pool_id(poolspec.from_dict(tree))
        assert changed_id not in seen, f"changing {'.'.join(path)} did not change the pool id"
        seen.add(changed_id)


def test_dumps_round_trip():
    spec = poolspec.loads(TOML_A)
    spec = msgspec.structs.replace(
        spec, task=poolspec.TaskSection(options={"digits": 4, "op": "+"})
    )
    again = poolspec.loads(poolspec.dumps(spec))
    assert again == spec
    assert poolspec.pool_id(again) == poolspec.pool_id(spec)


def test_from_canonical_checks_the_id():
    spec = poolspec.loads(TOML_A)
    data = poolspec.canonical_bytes(spec)
    assert poolspec.from_canonical(data, poolspec.pool_id(spec)) == spec
    other = poolspec.loads(TOML_A.replace("0.7", "0.8"))
    with pytest.raises(PoolSpecError, match="hashes to"):
        poolspec.from_canonical(poolspec.canonical_bytes(other), poolspec.pool_id(spec))
    with pytest.raises(PoolSpecError, match="malformed"):
        poolspec.from_canonical(b"{", poolspec.pool_id(spec))


def test_invalid_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(PoolSpecError, match="public_key"):
        poolspec.loads('name = "x"\n[coordinator]\npublic_key = "nothex"\n')
    with pytest.raises(PoolSpecError, match="temprature"):
        poolspec.loads(TOML_A + "\n[limits]\ntemprature = 1\n")
    with pytest.raises(PoolSpecError, match="not valid TOML"):
        poolspec.loads("name = ")
    with pytest.raises(PoolSpecError, match="cannot read"):
        poolspec.load(tmp_path / "absent.toml")


def test_overrides():
    tree = {"sampling": {"temperature": 1.0}, "name": "x"}
    out = apply_overrides(tree, ["sampling.temperature=0.5", "model.name=tiny", "limits.x=[1, 2]"])
    assert out == {
        "sampling": {"temperature": 0.5},
        "name": "x",
        "model": {"name": "tiny"},
        "limits": {"x": [1, 2]},
    }
    assert tree["sampling"]["temperature"] == 1.0  # the input is not changed
    assert parse_value("true") is True and parse_value("1e-5") == 1e-5
    with pytest.raises(SwarmError, match=r"section\.key=value"):
        apply_overrides(tree, ["novalue"])
    with pytest.raises(SwarmError, match="is a value"):
        apply_overrides(tree, ["name.sub=1"])


def test_training_settings_are_not_part_of_the_pool_id(tmp_path):
    from trainer import config as trainer_config

    base = poolspec.loads(TOML_A)
    path = tmp_path / "pool.toml"
    path.write_text(TOML_A + "\n[algorithm]\nlr = 0.5\nbatch_prompts = 3\n")
    assert poolspec.pool_id(poolspec.load(path)) == poolspec.pool_id(base)
    cfg = trainer_config.load(path)
    assert (cfg.algorithm.lr, cfg.algorithm.batch_prompts) == (0.5, 3)
    extra = tmp_path / "more.toml"
    extra.write_text("[algorithm]\nlr = 0.25\n")
    cfg = trainer_config.load(path, [extra], ["algorithm.micro_batch=2"])
    assert (cfg.algorithm.lr, cfg.algorithm.batch_prompts, cfg.algorithm.micro_batch) == (
        0.25,
        3,
        2,
    )
    extra.write_text("[algorithm]\nlearning_rate = 1\n")
    with pytest.raises(PoolSpecError, match="learning_rate"):
        trainer_config.load(path, [extra])
