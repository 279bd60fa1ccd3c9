-- Where this region stands in each peer's stream: the last stream sequence applied from that
-- origin, committed in the same transaction as the records it changed. Replays below it are
-- skipped cheaply; a sequence above it + 1 is a gap, which stops that consumer.
CREATE TABLE applied_positions (
    origin          text PRIMARY KEY,
    stream_sequence bigint NOT NULL,
    last_event_hlc  bigint NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
