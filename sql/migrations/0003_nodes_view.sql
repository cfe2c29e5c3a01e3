-- pgmesh catalog, version 3: mesh.nodes shows whether a node is alive (its capture
-- heartbeat is recent), so a crashed leader is not mistaken for a live one.

CREATE OR REPLACE VIEW mesh.nodes AS
SELECT n.node,
       n.region,
       n.role,
       n.started_at,
       n.heartbeat,
       (n.role <> 'stopped' AND n.heartbeat > now() - interval '10 seconds') AS alive
FROM mesh.node_state n;

INSERT INTO mesh.schema_versions (version, description)
VALUES (3, 'mesh.nodes shows liveness')
ON CONFLICT (version) DO NOTHING;
