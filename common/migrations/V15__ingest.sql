-- Direct ingest (`Ingest.Upload`): a client's stream can be cut anywhere, and
-- the bytes before the resume point are not sent again. So that the object's
-- SHA-256 still covers every byte, each part records the running SHA-256's
-- state after it (the serialized hasher, at a part boundary); a resume after
-- part N restores the state of part N and hashes on from there.
ALTER TABLE upload_parts ADD COLUMN sha256_state bytea;

