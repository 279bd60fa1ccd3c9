-- An apply no longer runs resolvers: it stores the view readers had (a resolution marked `retry`)
-- and logs the conflict with a pending outcome, and the resolution worker finishes both after the
-- commit, so a slow module never holds the apply's locks. These partial indexes hold exactly what
-- the worker has left to do, so finding it never reads the other records or conflicts.
CREATE INDEX records_left_to_resolve ON records (collection, key)
    WHERE resolution ->> 'retry' = 'true';
CREATE INDEX conflicts_left_to_resolve ON conflicts (id)
    WHERE outcome ? 'pending';
