-- Each embedding generation's HNSW index on the shared chunks table is now
-- built and dropped CONCURRENTLY, so that every other collection keeps
-- reading and writing meanwhile (a plain CREATE INDEX held their writes for
-- the whole build; a plain DROP INDEX locked the table against everything).
--
-- Two such statements on one table must not overlap: the second waits for
-- the table's lock while holding a snapshot, the first's last phase waits
-- for every older snapshot, and PostgreSQL aborts one of them as a deadlock
-- (a build of minutes lost). So they take turns through this row: a session
-- claims it (holder = its backend pid) before its index statements and
-- clears it after; others poll for it, never waiting inside PostgreSQL. A
-- claim whose backend is gone, or idle for a minute, is stale and taken
-- over. (Idempotent, like the clean-up below.)
CREATE TABLE IF NOT EXISTS vector_index_ddl (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    holder    integer,
    what      text,
    since     timestamptz
);
INSERT INTO vector_index_ddl DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Leftovers of earlier versions: generations an activation retired but did
-- not remove (it died between the switch and the removal), and the vector
-- indexes of generations that no longer exist (a deleted collection left
-- them all). Plain DROP INDEX (a migration is one transaction): this locks
-- chunks briefly, and only if there is something to drop.
DELETE FROM embedding_generations WHERE state = 'retired';
DO $$
DECLARE
    orphan regclass;
BEGIN
    FOR orphan IN
        SELECT i.indexrelid::regclass
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'chunks'::regclass
          AND c.relname ~ '^chunks_hnsw_g[0-9]{1,18}$'
          AND NOT EXISTS (
              SELECT 1 FROM embedding_generations g
              WHERE g.id = substring(c.relname FROM '^chunks_hnsw_g([0-9]+)$')::int8)
    LOOP
        EXECUTE format('DROP INDEX %s', orphan);
    END LOOP;
END $$;
