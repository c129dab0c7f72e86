-- The title a document gives itself (HTML <title>/<h1>, Markdown front matter
-- or first heading, PDF metadata), kept on the document and on each of its
-- chunks, so that search can weight it and show it without a join.
ALTER TABLE documents ADD COLUMN title text;
ALTER TABLE chunks ADD COLUMN title text NOT NULL DEFAULT '';
