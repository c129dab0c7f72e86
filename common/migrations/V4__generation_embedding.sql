-- What each generation embeds with (provider, model, dimensions, endpoint,
-- credentials Secret): queries against a generation are embedded by its own
-- model, also while the collection's spec already names the next one.
-- Existing generations take their collection's current embedding spec
-- (`{}` = the defaults: the built-in model).
ALTER TABLE embedding_generations ADD COLUMN embedding jsonb;
UPDATE embedding_generations g SET embedding = coalesce(c.spec -> 'embedding', '{}')
    FROM collections c WHERE c.id = g.collection_id;
ALTER TABLE embedding_generations ALTER COLUMN embedding SET NOT NULL;
