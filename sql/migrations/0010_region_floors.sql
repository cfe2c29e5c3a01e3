-- pgmesh catalog, version 10: region floors, so that a region that does not write
-- still lets the tombstone frontier move.
--
-- A row says: every event of `region` with an HLC below `floor_hlc` is in this
-- region's change log already (or among its dead letters). For this region itself
-- the capture leader writes it, and never assigns a lower HLC to a transaction
-- afterwards; for another region it was learnt from a link's heartbeat, sent once
-- the peer had shipped everything below it. Floors only ever rise. See
-- replicator/src/log/floors.rs.
CREATE TABLE IF NOT EXISTS mesh.region_floors (
    region     text PRIMARY KEY,
    floor_hlc  bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO mesh.schema_versions (version, description)
VALUES (10, 'region floors: idle regions let the tombstone frontier move')
ON CONFLICT (version) DO NOTHING;
