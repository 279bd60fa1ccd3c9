-- Resolver modules, content-addressed: a name binding (system collection `_resolvers`) names one
-- by sha256. A module arrives from a peer as chunks; it is assembled into `resolver_modules` only
-- once every chunk is here and the whole hashes to its sha256, so a region never runs a partial one.
CREATE TABLE resolver_modules (
    sha256     text PRIMARY KEY,
    module     bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resolver_module_chunks (
    sha256 text NOT NULL,
    chunk_index integer NOT NULL,
    chunk_count integer NOT NULL,
    data        bytea NOT NULL,
    PRIMARY KEY (sha256, chunk_index)
);

-- A resolver's materialised view of a record with concurrent versions (record::resolution). Not
-- replicated: every region computes it from the same versions with the same module.
ALTER TABLE records ADD COLUMN resolution jsonb;

-- The records that have concurrent versions: what the resolution worker scans.
CREATE INDEX records_with_siblings ON records (collection, key)
    WHERE jsonb_array_length(state -> 'versions') > 1;
