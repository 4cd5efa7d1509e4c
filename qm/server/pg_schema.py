"""The PostgreSQL store's schema, as numbered migrations applied by every server at start.

`qm_schema` holds one row: the schema version and the store's id (random, made with the
schema; it names the RabbitMQ queues the servers of this store share). At start a server
takes a transaction-scoped advisory lock (two servers starting together migrate one
after the other, never both), reads the version, refuses a version newer than
`MIGRATIONS` knows (a newer QueueMaster wrote it: `StoreSchemaTooNew`, a clear start-up
error, exit 2) and applies the missing migrations in order, in that one transaction:
PostgreSQL's DDL is transactional, so a failed migration leaves the previous version.

A migration is only ever appended, never edited once released.

Row counts (`count()`, the dead-letter total) come from `counters`, kept by statement
triggers in the transactions that insert or delete (no COUNT(*) of a growing table).
Each backend adds to its own shard row (`pg_backend_pid() % COUNTER_SHARDS`), so servers
inserting at once do not queue on one hot counter row; a count sums the shards.
"""

from __future__ import annotations

from qm.priority import DEFAULT_PRIORITY
from qm.states import TaskState

#: Key of the advisory lock held while the schema is checked and migrated.
MIGRATION_LOCK_KEY = 0x716D_5343  # "qmSC"
#: Rows per counted table that `counters` spreads its additions over.
COUNTER_SHARDS = 16

_RUNNING = int(TaskState.RUNNING)
_RETRYING = int(TaskState.RETRYING)
_QUEUED = int(TaskState.QUEUED)

_VERSION_1 = f"""
CREATE TABLE tasks (
    task_id         text PRIMARY KEY,
    type            text NOT NULL,
    queue           text NOT NULL,
    codec           text NOT NULL,
    state           smallint NOT NULL,
    attempts        integer NOT NULL,
    result          bytea,
    error           text NOT NULL DEFAULT '',
    worker          text NOT NULL DEFAULT '',
    created_at      double precision NOT NULL,
    started_at      double precision,
    finished_at     double precision,
    updated_at      double precision NOT NULL,
    timeout_s       double precision NOT NULL DEFAULT 0,
    memory_limit_mb integer NOT NULL DEFAULT 0,
    idempotency_key text NOT NULL DEFAULT '',
    max_retries     integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    starts          integer NOT NULL DEFAULT 0,
    request_digest  text NOT NULL DEFAULT ''
);
-- One task per key across every server of the store: the database says so, not a lock.
CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX tasks_by_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX retrying_by_due ON tasks (queue, next_attempt_at) WHERE state = {_RETRYING};
CREATE INDEX running_by_deadline ON tasks ((started_at + timeout_s)) WHERE state = {_RUNNING};
CREATE INDEX queued_by_queue ON tasks (queue, created_at) WHERE state = {_QUEUED};

-- Messages stored but not yet confirmed by RabbitMQ, with the server that publishes them
-- and when (the database's clock: the servers' clocks may differ).
CREATE TABLE unconfirmed (
    task_id   text PRIMARY KEY,
    queue     text NOT NULL,
    body      bytea NOT NULL,
    server_id text NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX unconfirmed_by_server ON unconfirmed (server_id);
-- Every unfinished task's first message: any server of the store can publish it again.
CREATE TABLE messages (
    task_id text PRIMARY KEY,
    body    bytea NOT NULL
);
CREATE TABLE dead_letters (
    task_id  text PRIMARY KEY,
    type     text NOT NULL,
    queue    text NOT NULL,
    state    smallint NOT NULL,
    attempts integer NOT NULL,
    reason   text NOT NULL,
    error    text NOT NULL,
    body     bytea NOT NULL,
    dead_at  double precision NOT NULL
);
CREATE INDEX dead_letters_by_dead_at ON dead_letters (dead_at);

CREATE TABLE counters (
    name  text NOT NULL,
    shard integer NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, shard)
);
CREATE FUNCTION qm_count_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO delta FROM new_rows;
    ELSE
        SELECT -count(*) INTO delta FROM old_rows;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO counters (name, shard, value) VALUES (TG_TABLE_NAME, pg_backend_pid() % {COUNTER_SHARDS}, delta)
        ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
CREATE TRIGGER dead_letters_count_insert AFTER INSERT ON dead_letters
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
CREATE TRIGGER dead_letters_count_delete AFTER DELETE ON dead_letters
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
"""

# Task progress (qm.progress(): the latest report of the current attempt).
_VERSION_2 = """
ALTER TABLE tasks ADD COLUMN progress double precision NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN progress_message text NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN progress_detail_json text NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN progress_at double precision;
"""

# Delayed tasks (TaskState.SCHEDULED): found by due time (next_attempt_at) per queue.
_VERSION_3 = f"""
CREATE INDEX scheduled_by_due ON tasks (queue, next_attempt_at) WHERE state = {int(TaskState.SCHEDULED)};
"""

# The reconciler's turn: one server of the store sweeps for lost tasks per interval
# (PgStore.claim_reconcile), not every server, each publishing the same lost task again.
_VERSION_SWEEPS = """
CREATE TABLE sweeps (
    name     text PRIMARY KEY,
    swept_at double precision NOT NULL
);
INSERT INTO sweeps (name, swept_at) VALUES ('reconcile', 0);
"""

# Task priorities (qm/priority.py): kept with the task for `qm status`; rows from before
# are of the default priority.
_VERSION_PRIORITY = f"""
ALTER TABLE tasks ADD COLUMN priority integer NOT NULL DEFAULT {DEFAULT_PRIORITY};
"""

# Periodic schedules (qm/server/scheduler.py): one row per schedule, found by its next tick;
# the tick loops of every server claim a tick by a compare-and-set of next_fire_at. Tasks
# carry the schedule that fired them.
_VERSION_SCHEDULES = """
ALTER TABLE tasks ADD COLUMN schedule_id text NOT NULL DEFAULT '';
CREATE TABLE schedules (
    schedule_id  text PRIMARY KEY,
    cron         text NOT NULL,
    every_s      double precision NOT NULL,
    timezone     text NOT NULL,
    missed       text NOT NULL,
    type         text NOT NULL,
    queue        text NOT NULL,
    payload      bytea NOT NULL,
    options_json text NOT NULL,
    created_at   double precision NOT NULL,
    next_fire_at double precision NOT NULL,
    last_tick_at double precision,
    last_task_id text NOT NULL DEFAULT '',
    fires        bigint NOT NULL DEFAULT 0,
    missed_ticks bigint NOT NULL DEFAULT 0,
    last_error   text NOT NULL DEFAULT ''
);
CREATE INDEX schedules_by_next_fire_at ON schedules (next_fire_at);
CREATE TRIGGER schedules_count_insert AFTER INSERT ON schedules
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
CREATE TRIGGER schedules_count_delete AFTER DELETE ON schedules
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION qm_count_rows();
"""

# Groups with a final callback (qm/server/groups.py): members and callback carry their
# group; the group row counts finished members (the update that counts the last one makes
# the callback, once per store).
_VERSION_GROUPS = """
ALTER TABLE tasks ADD COLUMN group_id text NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN group_index integer NOT NULL DEFAULT -1;
CREATE INDEX tasks_by_group ON tasks (group_id, group_index) WHERE group_id <> '';
CREATE TABLE task_groups (
    group_id         text PRIMARY KEY,
    members          integer NOT NULL,
    finished         integer NOT NULL,
    created_at       double precision NOT NULL,
    completed_at     double precision,
    callback_task_id text NOT NULL,
    callback_queue   text NOT NULL,
    callback_body    bytea NOT NULL,
    idempotency_key  text NOT NULL,
    request_digest   text NOT NULL
);
CREATE UNIQUE INDEX task_groups_by_idempotency_key ON task_groups (idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX task_groups_by_completed_at ON task_groups (completed_at) WHERE completed_at IS NOT NULL;
"""

# Resource-aware slots: the CPU slots a task takes (TaskStatus.cpus); rows from before
# were all single-CPU.
_VERSION_SLOTS = """
ALTER TABLE tasks ADD COLUMN cpus integer NOT NULL DEFAULT 1;
"""

#: Migration n (1-based) takes a store from schema version n-1 to n.
MIGRATIONS: tuple[str, ...] = (
    _VERSION_1,
    _VERSION_2,
    _VERSION_3,
    _VERSION_SWEEPS,
    _VERSION_PRIORITY,
    _VERSION_SCHEDULES,
    _VERSION_GROUPS,
    _VERSION_SLOTS,
)
#: The newest schema this code knows.
SCHEMA_VERSION = len(MIGRATIONS)

#: Made first, in the migration transaction, so every later step has its version row.
BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS qm_schema (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version  integer NOT NULL,
    store_id text NOT NULL
)
"""
