"""The pool ledger: a durable SQLite (WAL) record of nodes, leases, submissions, verdicts,
accepted groups, training steps and weight versions.

Every method that changes state is one transaction, so a crash at any instant leaves the ledger
as it was before or after that change, never between. Two invariants are enforced here rather
than trusted to callers: a lease is answered at most once, and a group is trained at most once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from protocol.errors import SwarmError

# Each entry migrates the schema from version i to i + 1; the ledger records its version in
# PRAGMA user_version and applies what is missing when it opens.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes (
        key BLOB PRIMARY KEY,
        peer_id TEXT NOT NULL,
        hardware TEXT NOT NULL DEFAULT '{}',
        engine TEXT NOT NULL DEFAULT '',
        joined_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        weight_version INTEGER NOT NULL DEFAULT -1,
        reputation REAL NOT NULL DEFAULT 0,
        banned_at REAL,
        ban_reason TEXT,
        ban_evidence INTEGER,
        accepted INTEGER NOT NULL DEFAULT 0,
        soft_rejected INTEGER NOT NULL DEFAULT 0,
        hard_rejected INTEGER NOT NULL DEFAULT 0,
        lease_counter INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leases (
        id INTEGER PRIMARY KEY,
        node BLOB NOT NULL REFERENCES nodes(key),
        counter INTEGER NOT NULL,
        issued_at REAL NOT NULL,
        deadline REAL NOT NULL,
        weight_version INTEGER NOT NULL,
        tasks TEXT NOT NULL,
        body BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'open'
            CHECK (state IN ('open', 'answered', 'expired', 'revoked', 'released'))
    );
    CREATE INDEX leases_open ON leases(state, deadline);
    CREATE TABLE submissions (
        id INTEGER PRIMARY KEY,
        lease_id INTEGER REFERENCES leases(id),
        node BLOB NOT NULL,
        received_at REAL NOT NULL,
        raw BLOB NOT NULL,
        outcome TEXT CHECK (outcome IN ('accept', 'soft', 'hard')),
        reason TEXT,
        details TEXT,
        decided_at REAL
    );
    CREATE INDEX submissions_pending ON submissions(outcome) WHERE outcome IS NULL;
    CREATE INDEX submissions_node ON submissions(node, id);
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY,
        submission_id INTEGER NOT NULL REFERENCES submissions(id),
        task_index INTEGER NOT NULL,
        prompt_index INTEGER NOT NULL,
        weight_version INTEGER NOT NULL,
        accepted_at REAL NOT NULL,
        rewards TEXT NOT NULL,
        payload BLOB NOT NULL,
        trained_step INTEGER,
        dropped TEXT
    );
    CREATE INDEX groups_pending ON groups(trained_step, dropped, id);
    CREATE TABLE steps (
        step INTEGER PRIMARY KEY,
        version INTEGER NOT NULL,
        finished_at REAL NOT NULL,
        metrics TEXT NOT NULL
    );
    CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        base INTEGER,
        bytes INTEGER NOT NULL,
        published_at REAL NOT NULL
    );
    """,
    # Admission (docs/security.md): probation, what each node cost and delivered, when each
    # lease closed (sliding-window quotas), strikes per verdict (the ban window), a draw
    # counter per prompt (seeds), the advantages the algorithm gave each group.
    """
    ALTER TABLE nodes ADD COLUMN probation INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE nodes ADD COLUMN verified_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN accepted_groups INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN validation_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN accepted_validation_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN soft_faults INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN closed_at REAL;
    ALTER TABLE leases ADD COLUMN probation INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX leases_node ON leases(node, state, closed_at);
    ALTER TABLE submissions ADD COLUMN strikes REAL NOT NULL DEFAULT 0;
    ALTER TABLE groups ADD COLUMN advantages TEXT;
    CREATE TABLE prompts (prompt_index INTEGER PRIMARY KEY, draws INTEGER NOT NULL DEFAULT 0);
    """,
    # Requests the transport refused for rate (trainer.refusals): who floods, from our view.
    """
    ALTER TABLE nodes ADD COLUMN rate_refusals INTEGER NOT NULL DEFAULT 0;
    """,
    # A resent answer looks up the lease's submission (`answer_of`), and the integrity audit
    # counts each submission's groups: without these indexes, a scan of a whole table per
    # lookup (a resend is free to a member; the audit is a public page). A lease answered too
    # late is recorded once (`record_late`), so its holder cannot grow the ledger with copies.
    """
    CREATE INDEX submissions_lease ON submissions(lease_id, id);
    CREATE INDEX groups_submission ON groups(submission_id, task_index);
    ALTER TABLE leases ADD COLUMN late_at REAL;
    """,
]


@dataclass(frozen=True)
class GroupRecord:
    """An accepted group, ready for training (the payload is opaque to the ledger)."""

    id: int
    submission_id: int
    task_index: int
    prompt_index: int
    weight_version: int
    rewards: list[float]
    advantages: list[float]
    payload: bytes


@dataclass(frozen=True)
class NewGroup:
    task_index: int
    prompt_index: int
    weight_version: int
    rewards: list[float]
    advantages: list[float]
    """What the algorithm gave each sample (trainer.algorithm), stored once, trained as is."""
    payload: bytes
    tokens: int
    """Completion tokens verified (the node's contribution)."""
    dropped: str | None = None
    """Why the algorithm keeps it out of training (e.g. zero reward variance)."""


@dataclass(frozen=True)
class StepCommit:
    """A trained step as the ledger records it."""

    step: int
    version: int
    group_ids: list[int]
    metrics: dict[str, Any]
    advantages: dict[int, list[float]] = field(default_factory=dict)
    """The advantages a group was trained on, where the batch changed the stored ones."""


@dataclass(frozen=True)
class Decision:
    """A verdict on one submission, as the ledger records it."""

    outcome: str
    """accept, soft or hard."""
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    strikes: float = 0.0
    """Weight of this verdict in the node's ban window (admission policy)."""
    groups: list[NewGroup] = field(default_factory=list)
    seconds: float = 0.0
    """Prefill seconds the verdict cost."""


@dataclass(frozen=True)
class Standing:
    """A node's record as the admission policy reads it (inside the verdict's transaction)."""

    probation: bool
    accepted: int
    window_strikes: float
    """Strikes among its last `window` verdicts."""


class Rules(Protocol):
    """What the ledger needs of the admission policy to judge a node inside a verdict's
    transaction (trainer.admission.Admission is the implementation)."""

    ban_window: int
    """How many of a node's latest verdicts its standing counts."""
    probation_accepts: int
    """Accepted verdicts that end probation."""

    def ban_reason(self, standing: Standing, decision: Decision) -> str | None:
        """The reason to ban after `decision`, or None to keep the node."""
        ...


@dataclass(frozen=True)
class Activity:
    """A node's leases inside a sliding window, for its quota."""

    open: int
    answered: int
    expired: int
    released: int
    last_expired_at: float = 0.0
    """When its latest lease in the window expired (0: none did)."""
    last_released_at: float = 0.0
    """When it last released a lease in the window (0: never)."""

    @property
    def has_work(self) -> bool:
        """Something it may hand in: an open lease, or an answer it may need to resend."""
        return self.open > 0 or self.answered > 0


class LedgerError(SwarmError):
    pass


class LeaseAnswered(LedgerError):
    """The lease has a submission already (see `Ledger.answer_of`)."""


class LeaseClosed(LedgerError):
    """The lease ran out (expired, past its deadline) or was revoked: late work, not a lie."""


class Ledger:
    """One pool's ledger. Thread-safe: one connection behind a lock (SQLite writes are serial
    anyway, and each call is short)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed verdict survives power loss too, not only a killed process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"{self.path} has schema version {version}, newer than this swarmrl "
                f"({len(MIGRATIONS)}); upgrade swarmrl"
            )
        for i in range(version, len(MIGRATIONS)):
            with self._tx() as db:
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {i + 1}")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    # --- metadata -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- nodes ----------------------------------------------------------------------------

    def join(
        self, key: bytes, peer_id: str, hardware: dict[str, Any], engine: str, now: float
    ) -> bool:
        """Record a join (or a re-join). Returns False for a banned node, which stays banned.
        A new identity starts on probation (admission policy)."""
        with self._tx() as db:
            row = db.execute("SELECT banned_at FROM nodes WHERE key = ?", (key,)).fetchone()
            if row is not None and row["banned_at"] is not None:
                return False
            db.execute(
                """INSERT INTO nodes (key, peer_id, hardware, engine, joined_at, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(key) DO UPDATE SET peer_id = excluded.peer_id,
                     hardware = excluded.hardware, engine = excluded.engine,
                     last_seen = excluded.last_seen""",
                (key, peer_id, json.dumps(hardware), engine, now, now),
            )
        return True

    def node(self, key: bytes) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM nodes WHERE key = ?", (key,)).fetchone()
        return None if row is None else dict(row)

    def nodes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM nodes ORDER BY joined_at")]

    def is_member(self, key: bytes) -> bool:
        """Whether `key` ever joined (banned or not)."""
        return self._db.execute("SELECT 1 FROM nodes WHERE key = ?", (key,)).fetchone() is not None

    def add_rate_refusals(self, counts: dict[bytes, int]) -> None:
        """Add requests the transport refused for rate to each node's row, in one transaction
        (keys that never joined have no row and are passed over)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE nodes SET rate_refusals = rate_refusals + ? WHERE key = ?",
                [(n, key) for key, n in counts.items()],
            )

    def is_active(self, key: bytes) -> bool:
        row = self._db.execute("SELECT banned_at FROM nodes WHERE key = ?", (key,)).fetchone()
        return row is not None and row["banned_at"] is None

    def set_probation(self, key: bytes, on: bool) -> bool:
        """Put a node on probation or vouch for it (the operator's own machines)."""
        with self._tx() as db:
            cur = db.execute("UPDATE nodes SET probation = ? WHERE key = ?", (int(on), key))
        return cur.rowcount == 1

    def heartbeat(self, key: bytes, weight_version: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET last_seen = ?, weight_version = ? WHERE key = ?",
                (now, weight_version, key),
            )

    def ban(self, key: bytes, reason: str, evidence: int | None, now: float) -> list[int]:
        """Ban a node and revoke its open leases; returns the revoked lease ids."""
        with self._tx() as db:
            return self._ban(db, key, reason, evidence, now)

    def _ban(
        self, db: sqlite3.Connection, key: bytes, reason: str, evidence: int | None, now: float
    ) -> list[int]:
        db.execute(
            """UPDATE nodes SET banned_at = ?, ban_reason = ?, ban_evidence = ?
               WHERE key = ? AND banned_at IS NULL""",
            (now, reason, evidence, key),
        )
        revoked = self.open_lease_ids(key)  # `db` is `self._db`, inside this transaction
        db.execute(
            "UPDATE leases SET state = 'revoked', closed_at = ? WHERE node = ? AND state = 'open'",
            (now, key),
        )
        # What it sent and we have not checked yet is dropped unchecked: a banned node costs no
        # more prefills.
        db.execute(
            """UPDATE submissions SET outcome = 'soft', reason = 'not validated: node banned',
               details = '{}', decided_at = ? WHERE node = ? AND outcome IS NULL""",
            (now, key),
        )
        return revoked

    # --- leases ---------------------------------------------------------------------------

    def issue_lease(
        self,
        node: bytes,
        issued_at: float,
        deadline: float,
        weight_version: int,
        plan: Callable[[int], list[int]],
        build: Callable[[int, int, list[tuple[int, int]]], tuple[list[dict[str, Any]], bytes]],
    ) -> tuple[int, int, list[dict[str, Any]], bytes]:
        """Create a lease for `node`, in one transaction. `plan(counter)` picks its prompt
        indices; each prompt's draw counter advances here (seeds derive from it, so a prompt
        handed out again never gets the seed it had); `build(lease_id, counter, [(prompt,
        draw)]) -> (tasks, body)` encodes it. Returns (lease id, counter, tasks, body)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT lease_counter, banned_at, probation FROM nodes WHERE key = ?", (node,)
            ).fetchone()
            if row is None or row["banned_at"] is not None:
                raise LedgerError("leases are issued only to joined, unbanned nodes")
            counter = row["lease_counter"]
            lease_id = db.execute(
                """INSERT INTO leases
                   (node, counter, issued_at, deadline, weight_version, tasks, body, probation)
                   VALUES (?, ?, ?, ?, ?, '[]', x'', ?)""",
                (node, counter, issued_at, deadline, weight_version, row["probation"]),
            ).lastrowid
            draws = [(p, self._next_draw(db, p)) for p in plan(counter)]
            tasks, body = build(lease_id, counter, draws)
            db.execute(
                "UPDATE leases SET tasks = ?, body = ? WHERE id = ?",
                (json.dumps(tasks), body, lease_id),
            )
            db.execute("UPDATE nodes SET lease_counter = lease_counter + 1 WHERE key = ?", (node,))
        return lease_id, counter, tasks, body

    @staticmethod
    def _next_draw(db: sqlite3.Connection, prompt_index: int) -> int:
        row = db.execute(
            """INSERT INTO prompts (prompt_index, draws) VALUES (?, 1)
               ON CONFLICT(prompt_index) DO UPDATE SET draws = draws + 1 RETURNING draws""",
            (prompt_index,),
        ).fetchone()
        return row[0] - 1

    def prompt_draws(self, prompt_index: int) -> int:
        """How many times the prompt was handed out (its next draw number)."""
        row = self._db.execute(
            "SELECT draws FROM prompts WHERE prompt_index = ?", (prompt_index,)
        ).fetchone()
        return 0 if row is None else row[0]

    def lease(self, lease_id: int) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["tasks"] = json.loads(out["tasks"])
        return out

    def extend_open_leases(self, deadline: float) -> list[int]:
        """Move every open lease's deadline to at least `deadline`; returns the open ones."""
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM leases WHERE state = 'open'")]
            db.execute(
                "UPDATE leases SET deadline = ? WHERE state = 'open' AND deadline < ?",
                (deadline, deadline),
            )
        return ids

    def expire_leases(self, now: float, forgiven: frozenset[int] = frozenset()) -> list[int]:
        """Close open leases past their deadline: expired, a soft fault of their node each,
        or revoked without a fault for the `forgiven` ones; returns their ids (to re-issue
        work)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, node FROM leases WHERE state = 'open' AND deadline < ?", (now,)
            ).fetchall()
            faults = [r for r in rows if r["id"] not in forgiven]
            db.executemany(
                "UPDATE leases SET state = ?, closed_at = ? WHERE id = ?",
                [("revoked" if r["id"] in forgiven else "expired", now, r["id"]) for r in rows],
            )
            db.executemany(
                "UPDATE nodes SET soft_faults = soft_faults + 1 WHERE key = ?",
                [(r["node"],) for r in faults],
            )
        return [r["id"] for r in rows]

    def release_lease(self, lease_id: int, node: bytes, now: float, fault: bool = False) -> bool:
        """A node gives its lease back (e.g. shutting down); its work goes to others. `fault`:
        the release is beyond the node's allowance and counts as a soft fault."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE leases SET state = 'released', closed_at = ?
                   WHERE id = ? AND node = ? AND state = 'open'""",
                (now, lease_id, node),
            )
            if cur.rowcount == 1 and fault:
                db.execute("UPDATE nodes SET soft_faults = soft_faults + 1 WHERE key = ?", (node,))
        return cur.rowcount == 1

    def open_lease_ids(self, node: bytes) -> list[int]:
        """`node`'s open leases."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM leases WHERE node = ? AND state = 'open'", (node,)
            )
        ]

    def open_lease_count(self, probation: bool = False) -> int:
        """Open leases of trusted nodes, or (`probation`) of nodes on probation."""
        return self._db.execute(
            "SELECT COUNT(*) FROM leases WHERE state = 'open' AND probation = ?", (int(probation),)
        ).fetchone()[0]

    def open_lease_groups(self) -> int:
        """Groups (a task each) the open leases of trusted nodes will bring."""
        return self._db.execute(
            """SELECT COALESCE(SUM(json_array_length(tasks)), 0) FROM leases
               WHERE state = 'open' AND probation = 0"""
        ).fetchone()[0]

    def pending_groups(self) -> int:
        """Groups (a task each) of trusted nodes' leases that submissions waiting for a verdict
        answer. Answers to probation leases are left out, as their open leases are in
        `open_lease_groups`: they wait behind all trusted work for the probation prefill
        budget, so counting them let a few fresh keys answering with junk tell the pool that
        a batch was coming, and stop every lease to trusted nodes until the junk was judged."""
        return self._db.execute(
            """SELECT COALESCE(SUM(json_array_length(l.tasks)), 0)
               FROM submissions s JOIN leases l ON l.id = s.lease_id
               WHERE s.outcome IS NULL AND l.probation = 0"""
        ).fetchone()[0]

    def withheld_prompts(self, node: bytes, since: float) -> tuple[frozenset[int], frozenset[int]]:
        """(prompts `node` gave up after `since`: its leases expired, released or revoked
        since; prompts of its open leases). What trainer.leases keeps from it."""
        rows = self._db.execute(
            """SELECT state, tasks FROM leases WHERE node = ? AND (state = 'open'
               OR (state IN ('expired', 'released', 'revoked') AND closed_at >= ?))""",
            (node, since),
        ).fetchall()
        gave_up: set[int] = set()
        held: set[int] = set()
        for r in rows:
            into = held if r["state"] == "open" else gave_up
            into.update(t["prompt_index"] for t in json.loads(r["tasks"]))
        return frozenset(gave_up), frozenset(held)

    def activity(self, node: bytes, since: float) -> Activity:
        """`node`'s open leases, and those answered, expired or released after `since`."""
        rows = self._db.execute(
            """SELECT state, COUNT(*), MAX(closed_at) FROM leases WHERE node = ?
               AND (state = 'open' OR closed_at >= ?) GROUP BY state""",
            (node, since),
        ).fetchall()
        counts = {state: n for state, n, _ in rows}
        latest = {state: at or 0.0 for state, _, at in rows}
        return Activity(
            counts.get("open", 0),
            counts.get("answered", 0),
            counts.get("expired", 0),
            counts.get("released", 0),
            latest.get("expired", 0.0),
            latest.get("released", 0.0),
        )

    # --- submissions and verdicts ---------------------------------------------------------

    def record_submission(self, lease_id: int, node: bytes, raw: bytes, now: float) -> int:
        """Answer a lease with a signed submission, atomically. Raises if the lease is not this
        node's, not open (expired, revoked, already answered), or past its deadline."""
        with self._tx() as db:
            row = db.execute(
                "SELECT node, state, deadline FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            if row is None:
                raise LedgerError(f"lease {lease_id} does not exist")
            if row["node"] != node:
                raise LedgerError(f"lease {lease_id} was issued to another node")
            if row["state"] == "answered":
                raise LeaseAnswered(f"lease {lease_id} was already answered")
            if row["state"] == "released":  # the node gave it back, then answered anyway
                raise LedgerError(f"lease {lease_id} is released")
            if row["state"] != "open" or row["deadline"] < now:
                state = row["state"] if row["state"] != "open" else "past its deadline"
                raise LeaseClosed(f"lease {lease_id} is {state}")
            db.execute(
                "UPDATE leases SET state = 'answered', closed_at = ? WHERE id = ?",
                (now, lease_id),
            )
            return db.execute(
                "INSERT INTO submissions (lease_id, node, received_at, raw) VALUES (?, ?, ?, ?)",
                (lease_id, node, now, raw),
            ).lastrowid

    def answer_of(self, lease_id: int) -> tuple[int, bytes] | None:
        """(submission id, signed envelope) of the submission that answered `lease_id`."""
        row = self._db.execute(
            "SELECT id, raw FROM submissions WHERE lease_id = ? ORDER BY id LIMIT 1", (lease_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def record_rejected(
        self, node: bytes, raw: bytes, decision: Decision, rules: Rules, now: float
    ) -> tuple[int, bool]:
        """Keep a submission refused before it could answer a lease (e.g. a second answer to
        the same lease) as evidence, with its verdict. Returns (id, whether the node got banned)."""
        with self._tx() as db:
            sid = db.execute(
                "INSERT INTO submissions (lease_id, node, received_at, raw) VALUES (NULL, ?, ?, ?)",
                (node, now, raw),
            ).lastrowid
            banned = self._decide(db, sid, decision, rules, now)
        return sid, banned

    def record_late(
        self, node: bytes, lease_id: int, decision: Decision, rules: Rules, now: float
    ) -> tuple[int, bool] | None:
        """Record the first answer to `node`'s lease `lease_id` that came after it closed, as
        `record_rejected` does but without its bytes (late work is not evidence of anything);
        None, recording nothing, when the lease had a late answer already."""
        with self._tx() as db:
            first = db.execute(
                "UPDATE leases SET late_at = ? WHERE id = ? AND node = ? AND late_at IS NULL",
                (now, lease_id, node),
            ).rowcount
            if not first:
                return None
            sid = db.execute(
                "INSERT INTO submissions (lease_id, node, received_at, raw) VALUES (NULL, ?, ?, ?)",
                (node, now, b""),
            ).lastrowid
            banned = self._decide(db, sid, decision, rules, now)
        return sid, banned

    def pending_submissions(self) -> list[int]:
        """Submissions received but not yet decided (e.g. the coordinator restarted mid-check)."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM submissions WHERE outcome IS NULL ORDER BY id"
            )
        ]

    def pending_count(self, node: bytes | None = None) -> int:
        """How many submissions (of `node`, or of all) wait for a verdict (the lease hot path
        asks on every request)."""
        if node is None:
            query, args = "SELECT COUNT(*) FROM submissions WHERE outcome IS NULL", ()
        else:
            query = "SELECT COUNT(*) FROM submissions WHERE outcome IS NULL AND node = ?"
            args = (node,)
        return self._db.execute(query, args).fetchone()[0]

    def submission(self, submission_id: int) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT * FROM submissions WHERE id = ?", (submission_id,)
        ).fetchone()
        return None if row is None else dict(row)

    def decide(self, submission_id: int, decision: Decision, rules: Rules, now: float) -> bool:
        """Record a verdict, its accepted groups, what it cost and the node's standing, in one
        transaction. Returns True when this verdict got the node banned."""
        with self._tx() as db:
            return self._decide(db, submission_id, decision, rules, now)

    def _decide(
        self,
        db: sqlite3.Connection,
        submission_id: int,
        decision: Decision,
        rules: Rules,
        now: float,
    ) -> bool:
        outcome, reason = decision.outcome, decision.reason
        if outcome not in ("accept", "soft", "hard"):
            raise LedgerError(f"unknown outcome {outcome!r}")
        column = {"accept": "accepted", "soft": "soft_rejected", "hard": "hard_rejected"}[outcome]
        row = db.execute(
            "SELECT node, outcome FROM submissions WHERE id = ?", (submission_id,)
        ).fetchone()
        if row is None:
            raise LedgerError(f"submission {submission_id} does not exist")
        if row["outcome"] is not None:
            raise LedgerError(f"submission {submission_id} was already decided")
        node = row["node"]
        db.execute(
            """UPDATE submissions SET outcome = ?, reason = ?, details = ?, decided_at = ?,
               strikes = ? WHERE id = ?""",
            (outcome, reason, json.dumps(decision.details), now, decision.strikes, submission_id),
        )
        db.executemany(
            """INSERT INTO groups (submission_id, task_index, prompt_index, weight_version,
               accepted_at, rewards, advantages, payload, dropped)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                (
                    submission_id,
                    g.task_index,
                    g.prompt_index,
                    g.weight_version,
                    now,
                    json.dumps(g.rewards),
                    json.dumps(g.advantages),
                    g.payload,
                    g.dropped,
                )
                for g in decision.groups
            ],
        )
        accepted = outcome == "accept"
        db.execute(
            f"""UPDATE nodes SET {column} = {column} + 1, validation_s = validation_s + ?,
                accepted_validation_s = accepted_validation_s + ?,
                verified_tokens = verified_tokens + ?, accepted_groups = accepted_groups + ?
                WHERE key = ?""",
            (
                decision.seconds,
                decision.seconds if accepted else 0.0,
                sum(g.tokens for g in decision.groups),
                len(decision.groups),
                node,
            ),
        )
        return self._judge(db, node, submission_id, decision, rules, now)

    def _judge(
        self,
        db: sqlite3.Connection,
        node: bytes,
        submission_id: int,
        decision: Decision,
        rules: Rules,
        now: float,
    ) -> bool:
        """Apply the admission policy's ban rule to the node's standing after a verdict."""
        n = db.execute(
            "SELECT probation, accepted, banned_at FROM nodes WHERE key = ?", (node,)
        ).fetchone()
        if n is None or n["banned_at"] is not None:
            return False
        # The window holds verdicts that say something of the node: its validated work and its
        # proven faults. An answer refused for coming late (no lease, no strike) says nothing,
        # and counted, a cheater flushed its strikes out with late answers to an expired lease.
        window = db.execute(
            """SELECT COALESCE(SUM(strikes), 0) FROM (SELECT strikes FROM submissions
               WHERE node = ? AND outcome IS NOT NULL AND (lease_id IS NOT NULL OR strikes > 0)
               ORDER BY id DESC LIMIT ?)""",
            (node, rules.ban_window),
        ).fetchone()[0]
        standing = Standing(bool(n["probation"]), n["accepted"], float(window))
        # `reputation` shows the standing on the dashboard: minus the strikes in the window.
        db.execute(
            "UPDATE nodes SET reputation = ? WHERE key = ?", (-standing.window_strikes, node)
        )
        why = rules.ban_reason(standing, decision)
        if why is not None:
            self._ban(db, node, why, submission_id, now)
            return True
        if standing.probation and standing.accepted >= rules.probation_accepts:
            db.execute("UPDATE nodes SET probation = 0 WHERE key = ?", (node,))
        return False

    # --- training -------------------------------------------------------------------------

    def trainable_groups(self, min_version: int, limit: int) -> list[GroupRecord]:
        """Accepted, untrained, undropped groups generated at `min_version` or later, oldest
        first."""
        rows = self._db.execute(
            """SELECT * FROM groups WHERE trained_step IS NULL AND dropped IS NULL
               AND weight_version >= ? ORDER BY id LIMIT ?""",
            (min_version, limit),
        )
        return [
            GroupRecord(
                r["id"],
                r["submission_id"],
                r["task_index"],
                r["prompt_index"],
                r["weight_version"],
                json.loads(r["rewards"]),
                json.loads(r["advantages"] or "[]"),
                r["payload"],
            )
            for r in rows
        ]

    def accepted_rewards_since(
        self, after_group: int, limit: int
    ) -> list[tuple[int, int, list[float]]]:
        """(group id, prompt index, rewards) of the groups of accepted submissions with ids
        above `after_group`, oldest first: dropped ones too (a flat group is evidence)."""
        rows = self._db.execute(
            """SELECT g.id, g.prompt_index, g.rewards FROM groups g
               JOIN submissions s ON s.id = g.submission_id
               WHERE g.id > ? AND s.outcome = 'accept' ORDER BY g.id LIMIT ?""",
            (after_group, limit),
        )
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def share_not_dropped_for(self, reason: str, newest: int) -> float | None:
        """The share of the `newest` groups of accepted submissions not dropped for `reason`;
        None before there is any."""
        row = self._db.execute(
            """SELECT COUNT(*), SUM(dropped IS NULL OR dropped != ?) FROM (
                 SELECT g.dropped FROM groups g JOIN submissions s ON s.id = g.submission_id
                 WHERE s.outcome = 'accept' ORDER BY g.id DESC LIMIT ?)""",
            (reason, newest),
        ).fetchone()
        return row[1] / row[0] if row[0] else None

    def dropped_since(self, reason: str, after_group: int) -> tuple[int, int]:
        """(count, newest id) of groups dropped for `reason` with ids above `after_group`."""
        row = self._db.execute(
            "SELECT COUNT(*), MAX(id) FROM groups WHERE dropped = ? AND id > ?",
            (reason, after_group),
        ).fetchone()
        return row[0], row[1] if row[1] is not None else after_group

    def count_trainable(self, min_version: int) -> int:
        return self._db.execute(
            """SELECT COUNT(*) FROM groups WHERE trained_step IS NULL AND dropped IS NULL
               AND weight_version >= ?""",
            (min_version,),
        ).fetchone()[0]

    def drop_stale(self, min_version: int, reason: str = "stale") -> int:
        """Drop untrained groups older than `min_version` (soft: no penalty). Returns the count."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE groups SET dropped = ? WHERE trained_step IS NULL AND dropped IS NULL
                   AND weight_version < ?""",
                (reason, min_version),
            )
        return cur.rowcount

    def drop_groups(self, reasons: dict[int, str]) -> int:
        """Drop untrained groups with a reason each (e.g. zero reward variance)."""
        with self._tx() as db:
            cur = db.executemany(
                """UPDATE groups SET dropped = ? WHERE id = ?
                   AND trained_step IS NULL AND dropped IS NULL""",
                [(why, g) for g, why in reasons.items()],
            )
        return cur.rowcount

    def commit_step(
        self,
        step: int,
        version: int,
        group_ids: list[int],
        metrics: dict[str, Any],
        now: float,
        advantages: dict[int, list[float]] | None = None,
    ) -> None:
        """Record a finished training step: its groups become trained (each at most once, or
        the whole step is refused), with the advantages they were trained on where the batch
        changed them (batch-scaled rewards)."""
        self.commit_steps([StepCommit(step, version, group_ids, metrics, advantages or {})], now)

    def commit_steps(self, steps: list[StepCommit], now: float) -> None:
        """Record several finished steps in one transaction (all or none): the trainer commits
        the steps a checkpoint covers once that checkpoint is on disk."""
        with self._tx() as db:
            for s in steps:
                last = db.execute("SELECT MAX(step) FROM steps").fetchone()[0]
                if last is not None and s.step <= last:
                    raise LedgerError(f"step {s.step} is not after the last recorded step {last}")
                ids = s.group_ids
                if ids:
                    marks = ",".join("?" * len(ids))
                    taken = db.execute(
                        f"""SELECT COUNT(*) FROM groups WHERE id IN ({marks})
                            AND (trained_step IS NOT NULL OR dropped IS NOT NULL)""",
                        ids,
                    ).fetchone()[0]
                    if taken:
                        raise LedgerError(
                            f"{taken} of the step's groups were already trained or dropped"
                        )
                db.executemany(
                    "UPDATE groups SET trained_step = ? WHERE id = ?", [(s.step, g) for g in ids]
                )
                db.executemany(
                    "UPDATE groups SET advantages = ? WHERE id = ?",
                    [(json.dumps(a), g) for g, a in s.advantages.items()],
                )
                db.execute(
                    "INSERT INTO steps VALUES (?, ?, ?, ?)",
                    (s.step, s.version, now, json.dumps(s.metrics)),
                )

    def last_step(self) -> tuple[int, int]:
        """(step, version) of the last committed step, (0, 0) before any."""
        row = self._db.execute(
            "SELECT step, version FROM steps ORDER BY step DESC LIMIT 1"
        ).fetchone()
        return (0, 0) if row is None else (row[0], row[1])

    def record_version(
        self, version: int, kind: str, base: int | None, nbytes: int, now: float
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?)",
                (version, kind, base, nbytes, now),
            )

    def versions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM versions ORDER BY version")]

    def recent_submissions(
        self, limit: int, node: bytes | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, without the raw bytes; `details` parsed."""
        where, args = [], []
        if node is not None:
            where.append("node = ?")
            args.append(node)
        if outcome is not None:
            where.append("outcome = ?")
            args.append(outcome)
        query = (
            "SELECT id, lease_id, node, received_at, outcome, reason, details, decided_at "
            "FROM submissions"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT ?"
        )
        rows = self._db.execute(query, (*args, limit))
        return [{**dict(r), "details": json.loads(r["details"] or "{}")} for r in rows]

    def steps(self, since: int = 0) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM steps WHERE step > ? ORDER BY step", (since,))
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    def contributions(self) -> list[dict[str, Any]]:
        """What each node delivered and what it cost (the base for any incentive scheme):
        verified tokens and groups, prefill seconds, leases, faults; most verified first."""
        rows = self._db.execute(
            """SELECT n.key, n.probation, n.accepted_groups, n.verified_tokens, n.validation_s,
                 n.lease_counter AS leases_issued, n.soft_faults, n.accepted, n.soft_rejected,
                 n.hard_rejected, n.banned_at, n.ban_reason, n.last_seen, n.weight_version,
                 n.rate_refusals,
                 (SELECT COUNT(*) FROM groups g JOIN submissions s ON g.submission_id = s.id
                  WHERE s.node = n.key AND g.trained_step IS NOT NULL) AS trained_groups,
                 (SELECT COUNT(*) FROM leases l WHERE l.node = n.key AND l.state = 'open')
                   AS leases_open,
                 (SELECT COUNT(*) FROM leases l WHERE l.node = n.key AND l.state = 'expired')
                   AS leases_expired,
                 (SELECT COUNT(*) FROM leases l WHERE l.node = n.key AND l.state = 'released')
                   AS leases_released
               FROM nodes n ORDER BY n.verified_tokens DESC, n.joined_at"""
        )
        out = []
        for r in rows:
            row = dict(r)
            row["probation"] = bool(row["probation"])
            row["banned"] = row.pop("banned_at") is not None
            row["validation_s"] = round(row["validation_s"], 3)
            out.append(row)
        return out

    def groups_page(self, since_id: int, limit: int) -> list[dict[str, Any]]:
        """Accepted groups after `since_id`, oldest first, without payloads: who sent them,
        rewards, the advantages trained on, when trained or why dropped."""
        rows = self._db.execute(
            """SELECT g.id, g.submission_id, s.lease_id, s.node, g.task_index, g.prompt_index,
                 g.weight_version, g.rewards, g.advantages, g.trained_step, g.dropped,
                 g.accepted_at
               FROM groups g JOIN submissions s ON s.id = g.submission_id
               WHERE g.id > ? ORDER BY g.id LIMIT ?""",
            (since_id, limit),
        )
        out = []
        for r in rows:
            row = dict(r)
            row["rewards"] = json.loads(row["rewards"])
            row["advantages"] = json.loads(row["advantages"] or "[]")
            out.append(row)
        return out

    def integrity(self) -> dict[str, int]:
        """The ledger's promises, counted: groups recorded twice for one lease task, groups
        an accepted submission should have and lacks, groups trained in more than one step (by
        construction 0; this is the audit)."""
        q = self._db.execute
        duplicates = q(
            """SELECT COUNT(*) FROM (SELECT s.lease_id, g.task_index FROM groups g
               JOIN submissions s ON s.id = g.submission_id
               GROUP BY s.lease_id, g.task_index HAVING COUNT(*) > 1)"""
        ).fetchone()[0]
        missing = 0
        for tasks, have in q(
            """SELECT l.tasks, (SELECT COUNT(*) FROM groups g WHERE g.submission_id = s.id)
               FROM submissions s JOIN leases l ON l.id = s.lease_id
               WHERE s.outcome = 'accept'"""
        ):
            missing += max(0, len(json.loads(tasks)) - have)
        return {"duplicate_groups": duplicates, "missing_groups": missing}

    def counts(self) -> dict[str, int]:
        q = self._db.execute
        return {
            "nodes": q("SELECT COUNT(*) FROM nodes").fetchone()[0],
            "banned": q("SELECT COUNT(*) FROM nodes WHERE banned_at IS NOT NULL").fetchone()[0],
            "submissions": q("SELECT COUNT(*) FROM submissions").fetchone()[0],
            "pending": self.pending_count(),
            "accepted_groups": q("SELECT COUNT(*) FROM groups").fetchone()[0],
            "trained_groups": q(
                "SELECT COUNT(*) FROM groups WHERE trained_step IS NOT NULL"
            ).fetchone()[0],
            "steps": q("SELECT COUNT(*) FROM steps").fetchone()[0],
            **{
                f"outcome_{o}": n
                for o, n in q(
                    """SELECT outcome, COUNT(*) FROM submissions WHERE outcome IS NOT NULL
                       GROUP BY outcome"""
                )
            },
        }
