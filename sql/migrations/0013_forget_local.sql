-- pgmesh catalog, version 13: mesh.forget_peer refuses this region's own name.
--
-- Forgetting the local region marked it gone in mesh.mesh_regions, so this region
-- stopped passing its own floor to its peers, and nothing (no reconnect) undid it.
-- It now raises 22023 (invalid_parameter_value) and changes nothing. Otherwise it
-- is the function of version 10. A local region already forgotten is restored.
CREATE OR REPLACE FUNCTION mesh.forget_peer(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    known boolean;
BEGIN
    IF EXISTS (SELECT 1 FROM mesh.regions r WHERE r.is_local AND r.name = forget_peer.name) THEN
        RAISE EXCEPTION 'region % is this database''s own region', forget_peer.name
            USING ERRCODE = '22023',
                  HINT = 'mesh.forget_peer marks another region gone for good; run it in the regions that pulled from it.';
    END IF;
    WITH d AS (DELETE FROM mesh.peer_acks WHERE peer = forget_peer.name RETURNING 1),
         l AS (UPDATE mesh.link_state SET status = 'decommissioned', updated_at = now()
               WHERE peer = forget_peer.name RETURNING 1),
         k AS (SELECT EXISTS (SELECT 1 FROM d) OR EXISTS (SELECT 1 FROM l)
                      OR EXISTS (SELECT 1 FROM mesh.mesh_regions r WHERE r.name = forget_peer.name)
                      OR EXISTS (SELECT 1 FROM mesh.region_floors f WHERE f.region = forget_peer.name)
                      OR EXISTS (SELECT 1 FROM mesh.changelog c WHERE c.origin = forget_peer.name) AS k),
         r AS (INSERT INTO mesh.mesh_regions (name, forgotten)
               SELECT forget_peer.name, true FROM k WHERE k.k
               ON CONFLICT (name) DO UPDATE SET forgotten = true, updated_at = now())
    -- Data-modifying CTEs run whether or not the query reads them.
    SELECT k.k INTO known FROM k;
    RETURN known;
END
$$;

-- A region that forgot itself under version 10 remembers itself again.
UPDATE mesh.mesh_regions m SET forgotten = false, updated_at = now()
FROM mesh.regions r
WHERE r.is_local AND m.name = r.name AND m.forgotten;

INSERT INTO mesh.schema_versions (version, description)
VALUES (13, 'mesh.forget_peer refuses the local region')
ON CONFLICT (version) DO NOTHING;
