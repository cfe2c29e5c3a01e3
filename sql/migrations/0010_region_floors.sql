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

-- A region gone for good (as in version 9), also when only its floor is known here
-- (one a hub passed on): it then no longer holds the tombstone frontier, and
-- this region passes its floor on no more.
CREATE OR REPLACE FUNCTION mesh.forget_peer(name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM mesh.peer_acks WHERE peer = forget_peer.name RETURNING 1),
         l AS (UPDATE mesh.link_state SET status = 'decommissioned', updated_at = now()
               WHERE peer = forget_peer.name RETURNING 1),
         known AS (SELECT EXISTS (SELECT 1 FROM d) OR EXISTS (SELECT 1 FROM l)
                       OR EXISTS (SELECT 1 FROM mesh.mesh_regions r WHERE r.name = forget_peer.name)
                       OR EXISTS (SELECT 1 FROM mesh.region_floors f WHERE f.region = forget_peer.name)
                       OR EXISTS (SELECT 1 FROM mesh.changelog WHERE origin = forget_peer.name) AS k),
         r AS (INSERT INTO mesh.mesh_regions (name, forgotten)
               SELECT forget_peer.name, true FROM known WHERE k
               ON CONFLICT (name) DO UPDATE SET forgotten = true, updated_at = now())
    -- Data-modifying CTEs run whether or not the query reads them.
    SELECT k FROM known
$$;

INSERT INTO mesh.schema_versions (version, description)
VALUES (10, 'region floors: idle regions let the tombstone frontier move')
ON CONFLICT (version) DO NOTHING;
