-- Whether this database holds a full copy of the deployment's data. A region created on an empty
-- database copies every collection from a peer before it says it is ready; a crash during that copy
-- leaves this false, so the copy runs again at the next start. Databases that existed before this
-- column were complete regions already.
ALTER TABLE region_meta ADD COLUMN bootstrapped boolean NOT NULL DEFAULT false;
UPDATE region_meta SET bootstrapped = true;
