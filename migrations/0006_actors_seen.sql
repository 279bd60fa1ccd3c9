-- The highest outbox id applied here per actor (a region incarnation), read from the message ids of
-- its events (`<region>.<incarnation>:<outbox id>`). A region starting on a restored database asks
-- its peers for its own actor's entry: one above its outbox sequence means the database was rewound,
-- and the region must rotate its incarnation rather than reissue counters its peers already hold.
CREATE TABLE actors_seen (
    actor             text COLLATE "C" PRIMARY KEY,
    highest_outbox_id bigint NOT NULL
);
