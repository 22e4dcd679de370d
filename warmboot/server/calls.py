"""Accepted calls, durable: each is a row in the state database from acceptance until its result expires.

A call's life: ``queued`` (accepted, waiting for a container) -> ``running`` (a container has it) -> ``done``
(its :class:`~warmboot.protocol.Outcome` stored). Each change is one transaction. After a server crash the
next server reads the table back (:meth:`CallBook.recover`): queued calls are queued again, calls that were
running end with :class:`~warmboot.errors.ServerRestartedError`, and finished results stay fetchable until
they expire (``WARMBOOT_RESULT_TTL`` seconds after they finished, a day by default).

In memory, a :class:`Call` carries the threading.Event its waiters block on and the callbacks the server's
transport registers; the database is what survives.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from warmboot.errors import NotFoundError, WarmbootError
from warmboot.protocol import Outcome, Target
from warmboot.server.db import Database

log = logging.getLogger("warmboot.calls")

#: How long a finished call's result can be fetched with ``FunctionCall.get()`` (seconds).
RESULT_TTL = float(os.environ.get("WARMBOOT_RESULT_TTL", 24 * 3600))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    method TEXT,
    args BLOB,                      -- cloudpickled (args, kwargs); dropped once the call is done
    state TEXT NOT NULL,            -- queued | running | done
    attempts INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    finished_at REAL,
    outcome BLOB,                   -- msgpack of protocol.Outcome
    detached INTEGER NOT NULL DEFAULT 0  -- 1: spawned, its result is fetched later by id
);
CREATE INDEX IF NOT EXISTS calls_by_state ON calls(state, finished_at);
"""

_outcome_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(Outcome)


@dataclass
class Call:
    """One accepted input: where it goes, its arguments, and (once done) its outcome."""

    app_id: str
    tag: str
    method: str | None
    args: bytes
    call_id: str = field(default_factory=lambda: "fc-" + uuid.uuid4().hex[:16])
    attempts: int = 0
    submitted_at: float = field(default_factory=time.time)
    outcome: Outcome | None = None
    generator: bool = False  #: ``.remote_gen``: yielded values go to :attr:`on_item` as they come
    variant: str | None = None  #: a variant's pool (``apps.Variant.to_json``): parameters, with_options overrides
    on_item: Callable[[bytes], None] | None = field(default=None, repr=False)
    #: Serves the input on the container itself instead of a function call: a web request (``server.gateway``),
    #: given the container and the function's timeout. Such calls live in memory only (their client is a socket).
    run: Callable[[Any, float], Outcome] | None = field(default=None, repr=False)
    #: How the container that ran its last attempt had started (cold, restore, warm), and its id (the call log).
    start_kind: str | None = None
    container_id: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _on_start: list[Callable[[Call], None]] = field(default_factory=list, repr=False)
    _on_done: list[Callable[[Call], None]] = field(default_factory=list, repr=False)

    def started(self) -> None:
        """A container took this call (an attempt begins)."""
        self.attempts += 1
        for hook in list(self._on_start):
            hook(self)

    def finish(self, outcome: Outcome) -> bool:
        """Record the outcome once; later outcomes (a late reply, a second failure) are ignored."""
        with self._lock:
            if self.done.is_set():
                return False
            self.outcome = outcome
            self.done.set()
            hooks = list(self._on_done)
        for hook in hooks:
            try:
                hook(self)
            except Exception:  # one failing listener must not keep the others from hearing the outcome
                log.exception("a listener of call %s failed", self.call_id)
        return True

    def fail(self, exc: WarmbootError) -> bool:
        return self.finish(Outcome.failure(exc))

    def when_done(self, hook: Callable[[Call], None]) -> None:
        """Run ``hook(call)`` once the call is done (at once if it already is)."""
        with self._lock:
            if not self.done.is_set():
                self._on_done.append(hook)
                return
        hook(self)


class CallBook:
    """The calls table and the calls still in memory (not yet done, or done and not yet expired)."""

    def __init__(self, db: Database, lock: threading.Lock):
        self._db = db
        self._db_lock = lock
        self._live: dict[str, Call] = {}
        self._lock = threading.Lock()
        with self._db_lock:
            self._db.executescript(_SCHEMA)
            if "variant" not in self._db.columns("calls"):
                # Added with modal.parameter()/with_options: which variant's pool a queued call goes back to.
                self._db.execute("ALTER TABLE calls ADD COLUMN variant TEXT")
            if "agent" not in self._db.columns("calls"):
                # Added with clusters: the agent a running call was sent to, asked for its outcome after a restart.
                self._db.execute("ALTER TABLE calls ADD COLUMN agent TEXT")

    def _write(self, sql: str, *args: object) -> None:
        with self._db_lock:
            self._db.execute(sql, args)

    # ----- accepting -------------------------------------------------------------------------------------

    def accept(
        self,
        target: Target,
        app_id: str,
        args: bytes,
        *,
        detached: bool,
        on_item: Callable[[bytes], None] | None = None,
        variant: str | None = None,
    ) -> Call:
        """Record a new call (one transaction) before anything runs it; ``on_item`` makes it a generator call."""
        self.expire()
        call = Call(
            app_id, target.tag, target.method, args, generator=on_item is not None, on_item=on_item, variant=variant
        )
        self._write(
            "INSERT INTO calls (call_id, app_id, tag, method, args, state, submitted_at, detached, variant) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            call.call_id,
            app_id,
            call.tag,
            call.method,
            args,
            call.submitted_at,
            int(detached),
            variant,
        )
        self._track(call)
        return call

    def _track(self, call: Call) -> None:
        with self._lock:
            self._live[call.call_id] = call
        call._on_start.append(self._record_start)
        call.when_done(self._record_outcome)

    def _record_start(self, call: Call) -> None:
        self._write("UPDATE calls SET state = 'running', attempts = ? WHERE call_id = ?", call.attempts, call.call_id)

    def _record_outcome(self, call: Call) -> None:
        assert call.outcome is not None
        self._write(
            "UPDATE calls SET state = 'done', outcome = ?, finished_at = ?, args = NULL WHERE call_id = ?",
            _outcome_encoder.encode(call.outcome),
            time.time(),
            call.call_id,
        )
        call.args = b""  # the database no longer has them either; a finished call needs no arguments
        with self._lock:
            # From here on the database answers for it: memory holds only unfinished calls, however many
            # results wait to be fetched.
            self._live.pop(call.call_id, None)

    def placed(self, call_id: str, agent_name: str) -> None:
        """A running call was sent to an agent (a restarted control plane asks that agent for its outcome)."""
        self._write("UPDATE calls SET agent = ? WHERE call_id = ?", agent_name, call_id)

    def delivered(self, call: Call) -> None:
        """A ``.remote()`` caller has its outcome: nobody can ask for it again, so forget the call."""
        with self._lock:
            self._live.pop(call.call_id, None)
        self._write("DELETE FROM calls WHERE call_id = ?", call.call_id)

    # ----- fetching --------------------------------------------------------------------------------------

    def get(self, call_id: str) -> Call:
        """The call ``call_id``, live or finished (read back from the database)."""
        self.expire()
        with self._lock:
            call = self._live.get(call_id)
        if call is not None:
            return call
        with self._db_lock:
            row = self._db.execute(
                "SELECT app_id, tag, method, attempts, submitted_at, outcome FROM calls "
                "WHERE call_id = ? AND state = 'done'",
                (call_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(
                f"no call {call_id}: unknown, or its result expired ({RESULT_TTL / 3600:g} h after it finished; "
                "WARMBOOT_RESULT_TTL sets how long results are kept)"
            )
        app_id, tag, method, attempts, submitted_at, outcome = row
        call = Call(app_id, tag, method, b"", call_id=call_id, attempts=attempts, submitted_at=submitted_at)
        call.finish(_outcome_decoder.decode(outcome))
        return call

    def expire(self, now: float | None = None) -> int:
        """Forget finished calls older than :data:`RESULT_TTL`; returns how many went."""
        cutoff = (now or time.time()) - RESULT_TTL
        with self._db_lock:
            return self._db.execute("DELETE FROM calls WHERE state = 'done' AND finished_at < ?", (cutoff,)).rowcount

    def unfinished(self) -> int:
        with self._lock:
            return sum(1 for c in self._live.values() if not c.done.is_set())

    # ----- after a crash ---------------------------------------------------------------------------------

    def recover(
        self, restarted: WarmbootError, collect: Callable[[Call, str], None] | None = None
    ) -> tuple[list[Call], list[Call]]:
        """Read back the calls a previous server left unfinished.

        Returns ``(queued, interrupted)``: queued spawned calls, to be submitted again, and the others, now ended
        with ``restarted``: calls that were running (their container died with the server, and their function may
        have run in part, so they are not silently run again) and ``.remote()`` calls whose caller is gone.

        ``collect`` (a cluster's control plane): a spawned call that was running on an agent outlived the control
        plane there; it is handed to ``collect(call, agent name)``, which fetches its outcome from that agent.
        """
        with self._db_lock:
            rows = self._db.execute(
                "SELECT call_id, app_id, tag, method, args, state, attempts, submitted_at, detached, variant, agent "
                "FROM calls WHERE state != 'done' ORDER BY submitted_at"
            ).fetchall()
        queued: list[Call] = []
        interrupted: list[Call] = []
        for call_id, app_id, tag, method, args, state, attempts, submitted_at, detached, variant, agent in rows:
            call = Call(
                app_id,
                tag,
                method,
                args or b"",
                call_id=call_id,
                attempts=attempts,
                submitted_at=submitted_at,
                variant=variant,
            )
            self._track(call)
            if state == "running" and detached and agent and collect is not None:
                collect(call, agent)
            elif state == "running" or not detached:
                # Running: its container died with the server. Not detached (.remote, .remote_gen): its caller's
                # connection died too, and nobody else knows its id, so running it would serve no one.
                call.fail(restarted)
                interrupted.append(call)
            else:
                queued.append(call)
        return queued, interrupted
