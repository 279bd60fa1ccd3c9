-- The highest outbox id applied here per actor (a region incarnation), read from the message ids of
-- its events (`<region>.<incarnation>:<outbox id>`). A region starting on a restored database asks
-- its peers for its own actor's entry: one above its outbox sequence means the database was rewound,
-- and the region must rotate its incarnation rather than reissue counters its peers already hold.
CREATE TABLE actors_seen (
    actor             text COLLATE "C" PRIMARY KEY,
    highest_outbox_id bigint NOT NULL
);

-- Dead letters also hold records that repair could not merge (`stream_sequence` null): the peer's
-- state and its hash, so later rounds skip that key until the peer's state changes, instead of
-- failing on it in a loop.
ALTER TABLE dead_letters
    ALTER COLUMN stream_sequence DROP NOT NULL,
    ADD COLUMN hash_hi  bigint,
    ADD COLUMN hash_lo  bigint,
    ADD COLUMN attempts integer NOT NULL DEFAULT 1;
CREATE INDEX dead_letters_by_key ON dead_letters (origin, collection, key);
