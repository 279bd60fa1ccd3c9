-- Anti-entropy (record::digest): each row's bucket (a hash of its key) and the 128-bit canonical
-- hash of its replicated state, written by the same statement that writes the state. Bucket
-- digests are computed on demand (bit_xor over this index), so no digest row is touched by writes.
-- Rows written before this migration are hashed at start (Store::backfill_state_hashes).
ALTER TABLE records ADD COLUMN bucket integer, ADD COLUMN hash_hi bigint, ADD COLUMN hash_lo bigint;
CREATE INDEX records_by_bucket ON records (collection, bucket, key) INCLUDE (hash_hi, hash_lo);
