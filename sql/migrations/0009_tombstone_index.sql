-- pgmesh catalog, version 9: tombstones are pruned below the frontier.
--
-- A node prunes the tombstones (versions of deleted rows) that no change still to
-- arrive can be older than (see replicator/src/log/tombstones.rs). This index keeps
-- that a range scan over tombstones only, whatever the number of live rows.
CREATE INDEX IF NOT EXISTS row_versions_tombstones ON mesh.row_versions (hlc) WHERE deleted;

INSERT INTO mesh.schema_versions (version, description)
VALUES (9, 'row versions: index of tombstones by hlc, for pruning')
ON CONFLICT (version) DO NOTHING;
