-- pgmesh catalog, version 5: row-version keys as text in jsonb's canonical text form
-- (what `pk::text` prints), compared bytewise. Looking a version up no longer parses
-- and compares jsonb, which cost apply and capture about 15 µs a key against 5.
-- `pk::jsonb` still reads a key as JSON.

ALTER TABLE mesh.row_versions ALTER COLUMN pk TYPE text COLLATE "C" USING pk::text;

INSERT INTO mesh.schema_versions (version, description)
VALUES (5, 'row version keys as text')
ON CONFLICT (version) DO NOTHING;
