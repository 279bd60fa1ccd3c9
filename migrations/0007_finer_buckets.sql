-- Anti-entropy buckets go from 1,024 to 65,536 per collection (see record::digest::BUCKETS): the
-- bucket of a key is now the low 16 bits of the first four bytes of SHA-256(key), big-endian,
-- which is bytes 2 and 3 of the digest.
UPDATE records
   SET bucket = (get_byte(sha256(convert_to(key, 'UTF8')), 2) << 8)
              | get_byte(sha256(convert_to(key, 'UTF8')), 3);
