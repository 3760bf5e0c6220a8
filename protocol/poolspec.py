"""The pool spec: everything a node must agree on with the coordinator, and the pool id.

A pool spec is written in TOML. Its canonical form is the JSON of the fully typed tree (every
field, defaults filled in, keys sorted, no whitespace); the pool id is the BLAKE3 hash of that,
base32, 24 characters (120 bits). So formatting and key order of the TOML do not change the id,
any change of a value does, and a node that fetched a spec from an untrusted peer checks it
hashes to the id it was given before trusting any of it.
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import blake3
import msgspec

from protocol.errors import PoolSpecError

POOL_ID_CHARS = 24

Scalar = str | int | float | bool
Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class CoordinatorSection(_Section):
    public_key: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    """Hex ed25519 key that signs leases, manifests and announcements."""
    bootstrap: list[str] = []
    """libp2p multiaddrs of peers to dial first (the coordinator or any pool member)."""
    origin: str = ""
    """SHARDCAST origin URL."""
    relays: list[str] = []
    """SHARDCAST relay URLs nodes may fetch weights from."""


class ModelSection(_Section):
    name: str = "tiny"
    """A preset (`tiny`, `smollm2-135m`) or a Hugging Face model folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_seed: int = 0
    """Seed of the random initialisation of the `tiny` preset."""


class TaskSection(_Section):
    name: str = "sort"
    options: dict[str, Scalar] = {}
    limit: int | None = None
    """Use only the first `limit` prompts of the training split."""


class SamplingSection(_Section):
    temperature: Positive = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    max_new_tokens: Count = 32
    group_size: Count = 8
    """G: completions sampled per prompt."""


class AlgorithmSection(_Section):
    loss_type: Literal["dapo", "grpo", "dr_grpo", "gspo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    delta: float = 4.0
    """Upper cap of the ratio for negative advantages (two-sided clipping)."""
    beta: float = 0.0
    """KL coefficient to the frozen reference; 0 turns the reference off."""
    entropy_coef: float = 0.0
    is_cap: float = 4.0
    """Off-policy trust band: tokens whose ratio pi_theta / pi_behaviour leaves
    [1/is_cap, is_cap] are masked out of the loss (stale or mismatched samples); 0 disables."""
    mask_truncated: bool = False
    lr: Positive = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    batch_prompts: Count = 8
    micro_batch: Count = 8
    publish_every: Count = 1
    full_every: Count = 10
    """Publish a full checkpoint every N versions; deltas in between."""


class LimitsSection(_Section):
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 2
    lease_prompts: Count = 4
    lease_timeout_s: Positive = 300.0
    max_submission_bytes: Count = 8 * 1024 * 1024
    requests_per_s: Positive = 20.0
    ban_threshold: float = -5.0
    """Reputation at or below which a node is banned."""


class VerificationSection(_Section):
    toploc_max_exp_mismatches: int = 38
    toploc_max_mant_err_mean: float = 10.0
    toploc_max_mant_err_median: float = 8.0
    sampling_max_violations: int = 0
    sampling_tolerance: float = 0.0
    """Logit slack for the seeded-sampling replay; 0 takes the calibrated default of the dtype."""
    logprob_tolerance: float = 0.0
    """Largest accepted |reported - recomputed| logprob; 0 takes the calibrated default."""


class PoolSpec(_Section):
    name: str
    coordinator: CoordinatorSection
    seed: int = 0
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sampling: SamplingSection = SamplingSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    limits: LimitsSection = LimitsSection()
    verification: VerificationSection = VerificationSection()


def canonical_bytes(spec: PoolSpec) -> bytes:
    """The bytes the pool id hashes: sorted-key compact JSON of the complete typed tree."""
    return msgspec.json.encode(_sorted(msgspec.to_builtins(spec)))


def pool_id(spec: PoolSpec) -> str:
    digest = blake3.blake3(canonical_bytes(spec)).digest()
    return base64.b32encode(digest).decode().lower()[:POOL_ID_CHARS]


def from_dict(data: dict[str, Any]) -> PoolSpec:
    try:
        return msgspec.convert(data, PoolSpec)
    except msgspec.ValidationError as e:
        raise PoolSpecError(f"invalid pool spec: {e}") from None


def loads(text: str) -> PoolSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PoolSpecError(f"pool spec is not valid TOML: {e}") from None
    return from_dict(data)


def load(path: Path) -> PoolSpec:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PoolSpecError(f"cannot read pool spec {path}: {e.strerror}") from None
    return loads(text)


def from_canonical(data: bytes, expected_id: str) -> PoolSpec:
    """Parse a spec received from a peer and check it is the one `expected_id` names."""
    try:
        spec = msgspec.json.decode(data, type=PoolSpec)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, RecursionError) as e:
        # ValueError: msgspec reports invalid UTF-8 as UnicodeDecodeError.
        raise PoolSpecError(f"received pool spec is malformed: {e}") from None
    got = pool_id(spec)
    if got != expected_id:
        raise PoolSpecError(
            f"the pool spec received hashes to {got}, not to the pool id {expected_id}: "
            "the peer that sent it is wrong or lying; check the pool id and the bootstrap peers"
        )
    return spec


def dumps(spec: PoolSpec) -> str:
    """TOML text of a spec (every field), which `loads` reads back to an equal spec."""
    tree = msgspec.to_builtins(spec)
    lines = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for section, values in tree.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return msgspec.json.encode(v).decode()  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f" {k} = {_toml_value(x)}" for k, x in v.items()) + (" }" if v else "}")
        )
    raise PoolSpecError(f"cannot write {type(v).__name__} to TOML")


def _sorted(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_sorted(x) for x in v]
    return v
