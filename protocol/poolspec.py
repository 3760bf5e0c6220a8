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
UNHASHED_TABLES = ("algorithm", "trainer")
"""Tables of a pool file that hold the coordinator's own settings (trainer/config.py): not part
of the spec nor of its id, so changing the learning rate keeps the pool."""

Scalar = str | int | float | bool
Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class CoordinatorSection(Section):
    public_key: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    """Hex ed25519 key that signs leases, manifests and announcements."""
    bootstrap: list[str] = []
    """libp2p multiaddrs of peers to dial first (the coordinator or any pool member)."""
    origin: str = ""
    """SHARDCAST origin URL."""
    relays: list[str] = []
    """SHARDCAST relay URLs nodes may fetch weights from."""


class ModelSection(Section):
    name: str = "tiny"
    """A preset (`tiny`, `smollm2-135m`) or a Hugging Face model folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights nodes generate with and validators recompute with (the trainer keeps fp32)."""
    init_seed: int = 0
    """Seed of the random initialisation of the `tiny` preset."""


class TaskSection(Section):
    name: str = "sort"
    """Task: copy, sort, mod_add, arithmetic, gsm8k (see `trainer/tasks.py`)."""
    options: dict[str, Scalar] = {}
    """Task options, e.g. { digits = 4 } or { path = "data.jsonl" }."""
    limit: int | None = None
    """Use only the first `limit` prompts of the training split."""
    rewards: list[str] = []
    """Reward functions as NAME or NAME*WEIGHT, summed: built-ins (exact_numeric, math_verify,
    format, position_match, length_penalty) or a TRL-style function by import path
    (package.module:function). Empty: the task's own."""


class SamplingSection(Section):
    temperature: Positive = 1.0
    """Sampling temperature; logprobs and the trainer use the same one."""
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    """Nucleus sampling mass; 1 turns it off."""
    max_new_tokens: Count = 32
    """Length cap of a completion; ending there counts as finishing."""
    group_size: Count = 8
    """G: completions sampled per prompt."""
    max_group_size: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    """Up to this many completions for a prompt whose recent 0/1 rewards say that most groups
    of `group_size` would earn a single reward, and so train nothing (trainer.curriculum); a
    lease still holds at most `lease_prompts` x `group_size` completions, which also caps a
    group. 0 (or anything up to `group_size`) samples every prompt `group_size` times."""


class LimitsSection(Section):
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 2
    """A group generated with version v trains step n only if n - v <= max_staleness."""
    lease_prompts: Count = 4
    """Prompts (tasks) per lease."""
    lease_timeout_s: Positive = 300.0
    """A lease not answered by then is re-issued to others."""
    max_submission_bytes: Count = 8 * 1024 * 1024
    """Largest submission accepted, in bytes."""
    requests_per_s: Positive = 20.0
    """Requests per second allowed per peer."""

    def oldest_trainable(self, current_version: int) -> int:
        """The oldest weight version whose groups the next step (making `current_version` +
        1) can still train. Leasing and validation use it too: a lease or a validation for
        work the trainer is bound to drop is spent for nothing (the three once disagreed by
        one version, and nodes one version too old were leased work that was always
        dropped)."""
        return current_version + 1 - self.max_staleness


class AdmissionSection(Section):
    """How an open pool prices identities and earns trust (docs/security.md has the arithmetic).
    Part of the pool id: every node can read the rules it is held to."""

    join_pow_bits: Annotated[int, msgspec.Meta(ge=0, le=32)] = 0
    """Proof of work a new identity pays to join (about 2**bits hashes); 0 turns it off."""
    new_identities_per_min: Positive = 30.0
    """New identities admitted per minute, pool-wide (a burst of the same size is allowed)."""
    probation_accepts: Count = 2
    """Accepted submissions that end a new identity's probation."""
    probation_leases: Count = 2
    """Open leases that all identities on probation share (one each, one prompt each)."""
    probation_validation_s: Positive = 6.0
    """Prefill seconds per minute that all identities on probation share (the coordinator's
    own measured time: a flood of newcomers costs at most this)."""
    max_leases_per_node: Count = 4
    """Most open leases one trusted node may hold; its quota grows to this with answered
    leases and shrinks with expired ones."""
    release_allowance: Annotated[int, msgspec.Meta(ge=0)] = 2
    """Leases a node may give back per `window_s` before each release counts as a soft fault."""
    window_s: Positive = 600.0
    """The sliding window (seconds) of quotas, soft faults and releases."""
    ban_window: Count = 20
    """A node is banned when the strikes among its last `ban_window` verdicts reach
    `ban_strikes` (a proven cheat is 1 strike, a transport refusal 0.5); on probation, one
    proven cheat bans."""
    ban_strikes: Positive = 2.0
    validation_allowance_s: Positive = 10.0
    """Prefill seconds a node may cost beyond `validation_ratio` x the seconds its accepted
    work took; past it, its submissions wait for the probation budget."""
    validation_ratio: Positive = 2.0


class VerificationSection(Section):
    toploc_max_exp_mismatches: int = 38
    """TOPLOC thresholds per 32-token chunk (the published values for k = 128)."""
    toploc_max_mant_err_mean: float = 10.0
    toploc_max_mant_err_median: float = 8.0
    sampling_max_violations: int = 0
    """Positions allowed where the submitted token is not the seeded sampler's choice."""
    sampling_tolerance: float = 0.0
    """Logit slack for the seeded-sampling replay; 0 takes the calibrated default of the dtype."""
    logprob_tolerance: float = 0.0
    """Largest accepted |reported - recomputed| logprob; 0 takes the calibrated default."""


class PoolSpec(Section):
    name: str
    """A name for people; the pool id is what identifies the pool."""
    coordinator: CoordinatorSection
    seed: int = 0
    """Seeds prompt and sampling-seed draws for leases."""
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sampling: SamplingSection = SamplingSection()
    limits: LimitsSection = LimitsSection()
    admission: AdmissionSection = AdmissionSection()
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


def read_tables(path: Path) -> dict[str, Any]:
    """A pool file's TOML, whole (the spec and the coordinator's unhashed tables)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PoolSpecError(f"cannot read pool spec {path}: {e.strerror}") from None
    return parse_toml(text)


def parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PoolSpecError(f"pool spec is not valid TOML: {e}") from None


def hashed_part(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k not in UNHASHED_TABLES}


def loads(text: str) -> PoolSpec:
    return from_dict(hashed_part(parse_toml(text)))


def load(path: Path) -> PoolSpec:
    return from_dict(hashed_part(read_tables(path)))


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


def dumps(spec: Section, comments: bool = False) -> str:
    """TOML text of a spec (every field), which `loads` reads back to an equal spec; with
    `comments`, each field's documentation is written above it. Works for any tree of
    `Section`s (the trainer's config too)."""
    tree = msgspec.to_builtins(spec)
    docs = field_docs(type(spec)) if comments else {}

    def field_lines(section: str, values: dict[str, Any]) -> list[str]:
        out = []
        for k, v in values.items():
            if isinstance(v, dict) and not section:
                continue
            for line in docs.get(f"{section}.{k}" if section else k, "").splitlines():
                out.append(f"# {line.strip()}")
            out.append(f"{k} = {_toml_value(v)}" if v is not None else f"# {k} =")
        return out

    lines = field_lines("", tree)
    for section, values in tree.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]", *field_lines(section, values)]
    return "\n".join(lines) + "\n"


def field_docs(root: type[Section]) -> dict[str, str]:
    """The docstrings under the fields of `root` and of its sections, keyed "section.field"
    (read from the source of the modules that define them)."""
    import ast
    import inspect
    import sys

    def class_docs(cls: type) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
                docs = {}
                for stmt, nxt in zip(node.body, node.body[1:], strict=False):
                    if (
                        isinstance(stmt, ast.AnnAssign)
                        and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr)
                        and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)
                    ):
                        docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
                return docs
        return {}

    out = class_docs(root)
    for name, hint in _hints(root).items():
        if isinstance(hint, type) and issubclass(hint, Section):
            for field_name, doc in class_docs(hint).items():
                out[f"{name}.{field_name}"] = doc
    return out


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, include_extras=False)


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
