-- Heartbeats promise "every write of this region with an HLC below T is in the stream before this
-- heartbeat". Writes take their HLC before their statement runs, so the promise needs a floor they
-- are checked against: a write whose HLC is below the floor is refused (and retried with a newer
-- HLC), and the publisher raises the floor to T before it reads the outbox for that heartbeat.
CREATE TABLE write_floor (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    through_ms bigint NOT NULL
);
INSERT INTO write_floor (through_ms) VALUES (0);

-- The floor a write checks against. The shared advisory lock (key "locusflr") is held to the end
-- of the write's transaction and conflicts with the publisher's exclusive one, so the publisher's
-- raise waits for every write that read the old floor to commit; the read itself is a statement of
-- its own inside a volatile function, so it sees a raise committed after the write's statement
-- began. The lock manager queues new shared requests behind a waiting exclusive one: writes cannot
-- starve the raise.
CREATE FUNCTION write_floor_ms() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7813573234609515634);
    RETURN (SELECT through_ms FROM write_floor);
END
$$;

-- Per origin, the promise of the newest heartbeat applied here (milliseconds since the epoch):
-- every write that origin made with an HLC below it has been applied.
ALTER TABLE applied_positions ADD COLUMN applied_through_ms bigint;
