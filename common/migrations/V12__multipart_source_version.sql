-- What a multipart upload's hashing pass read, so that a resume can read only
-- the parts still to send (not the whole source again):
--   source_size            the bytes it read;
--   source_part_checksums  the checksum (the upload's algorithm, base64) of
--                          each part-sized slice of them, in order: every part
--                          the upload completes with must carry exactly these,
--                          so the object is the bytes `metadata_sha256` was
--                          computed over;
--   source_validator       the source's strong ETag or Last-Modified then
--                          (`etag:<value>` / `last-modified:<value>`), sent as
--                          a precondition with the ranged reads of a resume.
-- NULL (uploads of earlier versions, `--sha256-metadata copy|known`): a
-- resume reads and hashes the whole source again.
ALTER TABLE multipart_uploads
    ADD COLUMN source_size bigint,
    ADD COLUMN source_part_checksums text[],
    ADD COLUMN source_validator text;
