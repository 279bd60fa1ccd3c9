-- The sequences of each origin's stream this region has applied, as disjoint ranges
-- (replication::ranges): batches commit out of order (redeliveries, several processes), so a
-- high-water mark would jump a hole. Written in the apply transaction; a repair round covers the
-- holes whose events are gone from the stream. Seeded from the high-water marks kept so far.
CREATE TABLE applied_ranges (
    origin    text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq  bigint NOT NULL,
    PRIMARY KEY (origin, first_seq)
);
INSERT INTO applied_ranges (origin, first_seq, last_seq)
SELECT origin, 1, stream_sequence FROM applied_positions WHERE stream_sequence > 0;

-- Events from a peer that could not be read or applied, even alone: set aside so the stream goes
-- on, and listed for an operator. Repair brings their records over from the origin.
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    origin          text NOT NULL,
    stream_sequence bigint NOT NULL,
    collection      text COLLATE "C",
    key             text COLLATE "C",
    event           bytea NOT NULL,
    error           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
