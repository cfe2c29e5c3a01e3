-- pgmesh catalog, version 4: the xid that wrote each row version, and the txid at
-- which the region started capturing. Together they let apply prove that a locked
-- row has no write capture has not logged yet, without waiting for capture.

ALTER TABLE mesh.row_versions ADD COLUMN IF NOT EXISTS xid bigint;
ALTER TABLE mesh.regions ADD COLUMN IF NOT EXISTS init_txid bigint;
UPDATE mesh.regions SET init_txid = txid_current() WHERE is_local AND init_txid IS NULL;

INSERT INTO mesh.schema_versions (version, description)
VALUES (4, 'row version xids, region init txid')
ON CONFLICT (version) DO NOTHING;
