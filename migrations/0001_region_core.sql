-- The region's identity. One row, made with the database: its incarnation names this region's
-- entries in version vectors, so a database that is recreated never reuses a peer-held counter.
CREATE TABLE region_meta (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    region      text NOT NULL,
    incarnation text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per record: its home and the antichain of its maximal versions (record::RecordState).
-- The "C" collation makes key order bytewise, the same in every region whatever its locale.
-- `rev` counts the row's writes: a write commits only if `rev` is still what it read (compare and
-- swap), which serializes concurrent writers to one record without holding a lock across round trips.
CREATE TABLE records (
    collection text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    rev        bigint NOT NULL,
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, key)
);

-- Changes committed with their records, waiting to be published to the region's stream. `event` is
-- the exact wire payload (replication::event::Event, JSON): never queried in SQL, so not parsed here.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    event      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The conflict log: every time a merge keeps concurrent versions.
CREATE TABLE conflicts (
    id          bigserial PRIMARY KEY,
    collection  text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    region      text NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    strategy    text NOT NULL,
    resolver    jsonb,
    versions    jsonb NOT NULL,
    outcome     jsonb NOT NULL,
    error       text
);
CREATE INDEX conflicts_by_key ON conflicts (collection, key, id);
