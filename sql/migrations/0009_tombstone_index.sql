-- pgmesh catalog, version 9: tombstones are pruned below the frontier.
--
-- A node prunes the tombstones (versions of deleted rows) that no change still to
-- arrive can be older than (see replicator/src/log/tombstones.rs). This index keeps
-- that a range scan over tombstones only, whatever the number of live rows.
CREATE INDEX IF NOT EXISTS row_versions_tombstones ON mesh.row_versions (hlc) WHERE deleted;

-- Every region of the mesh this region has heard of: its peers tell it theirs when
-- a link connects (a spoke learns the other spokes from its hub). Each one counts
-- for the frontier, until mesh.forget_peer marks it forgotten (gone for good); a
-- link connecting to it again clears that.
CREATE TABLE IF NOT EXISTS mesh.mesh_regions (
    name         text PRIMARY KEY,
    learned_from text,
    forgotten    boolean NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The last tombstone pass: the frontier it found (0: held back, NULL: no other
-- region), when, and how many tombstones all passes deleted.
ALTER TABLE mesh.log_prune
    ADD COLUMN IF NOT EXISTS tombstone_frontier bigint,
    ADD COLUMN IF NOT EXISTS tombstones_checked_at timestamptz,
    ADD COLUMN IF NOT EXISTS tombstones_pruned bigint NOT NULL DEFAULT 0;

-- A region gone for good: pruning the log stops waiting for it, the link from it
-- shows 'decommissioned', and it no longer holds the tombstone frontier back.
-- Returns whether it was known.
CREATE OR REPLACE FUNCTION mesh.forget_peer(name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM mesh.peer_acks WHERE peer = forget_peer.name RETURNING 1),
         l AS (UPDATE mesh.link_state SET status = 'decommissioned', updated_at = now()
               WHERE peer = forget_peer.name RETURNING 1),
         known AS (SELECT EXISTS (SELECT 1 FROM d) OR EXISTS (SELECT 1 FROM l)
                       OR EXISTS (SELECT 1 FROM mesh.mesh_regions r WHERE r.name = forget_peer.name)
                       OR EXISTS (SELECT 1 FROM mesh.changelog WHERE origin = forget_peer.name) AS k),
         r AS (INSERT INTO mesh.mesh_regions (name, forgotten)
               SELECT forget_peer.name, true FROM known WHERE k
               ON CONFLICT (name) DO UPDATE SET forgotten = true, updated_at = now())
    -- Data-modifying CTEs run whether or not the query reads them.
    SELECT k FROM known
$$;

INSERT INTO mesh.schema_versions (version, description)
VALUES (9, 'tombstone pruning: index by hlc, regions of the mesh, pass statistics')
ON CONFLICT (version) DO NOTHING;
