-- Tombstones are reclaimed once every region has applied them (src/deletion.rs).
--
-- A record whose only version is a tombstone carries that tombstone's HLC in `tombstone_hlc`,
-- kept by PostgreSQL itself, so the reclaiming pass finds its rows by a small partial index
-- instead of reading every state. States that keep several concurrent tombstones are left alone:
-- the next write or delete of the record folds them into one.
ALTER TABLE records ADD COLUMN tombstone_hlc numeric GENERATED ALWAYS AS (
    CASE WHEN jsonb_array_length(state->'versions') = 1
              AND (state->'versions'->0->>'deleted')::boolean
         THEN (state->'versions'->0->>'hlc')::numeric
    END) STORED;
CREATE INDEX records_tombstones ON records (tombstone_hlc) WHERE tombstone_hlc IS NOT NULL;

-- The region's reclamation horizon: tombstones at or below it may be gone from this region. A write
-- that creates a record without a row here takes a counter floor and a newer home epoch, as after a
-- collection deletion, in case the record's tombstone is still held elsewhere; a repair from a peer
-- restored from an old backup leaves out what is at or below it. Only ever raised.
CREATE TABLE reclaimed_tombstones (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    through_hlc numeric NOT NULL
);
