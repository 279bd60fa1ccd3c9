-- Writes made with an Idempotency-Key, so that a retried request returns the first outcome instead
-- of writing twice. Inserted in the same statement as the write (a second writer with the same key
-- fails on the primary key, and nothing of its write stays), kept for a day by the purge worker.
-- `state` is the record as that write left it: a replay answers with it, not with what the record
-- has become since.
CREATE TABLE idempotent_writes (
    idempotency_key text PRIMARY KEY,
    -- sha256 of the method, collection, key and body: the same key on another request is refused.
    fingerprint     text NOT NULL,
    created         boolean NOT NULL,
    failover        boolean NOT NULL,
    state           jsonb NOT NULL,
    session         text NOT NULL,
    written_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotent_writes_by_age ON idempotent_writes (written_at);
