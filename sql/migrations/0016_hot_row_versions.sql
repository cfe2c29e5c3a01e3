-- pgmesh catalog, version 16: updates of live row versions are HOT.
--
-- Every transaction updates the versions of the rows it changed, in its origin
-- (capture) and in every peer (apply). The tombstone index of version 9 was on hlc,
-- which every such update changes, so none of them could be a heap-only (HOT)
-- update: each one added an entry to the primary key index and left a dead one.
-- Indexed on `deleted` alone (still only the tombstones), an update that keeps a
-- row live changes no indexed column, and fillfactor leaves room on each page for
-- the new version next to the old. Tombstone pruning now reads every tombstone and
-- keeps those below its bound, once per pass, instead of a range of them.
DROP INDEX IF EXISTS mesh.row_versions_tombstones;
CREATE INDEX IF NOT EXISTS row_versions_deleted ON mesh.row_versions (deleted) WHERE deleted;
ALTER TABLE mesh.row_versions SET (fillfactor = 85);

INSERT INTO mesh.schema_versions (version, description)
VALUES (16, 'live row version updates are HOT')
ON CONFLICT (version) DO NOTHING;
