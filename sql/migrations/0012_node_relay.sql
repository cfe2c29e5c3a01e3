-- pgmesh catalog, version 12: each node records whether it relays other regions'
-- events (`--relay`). Every node of a region serves the same log, and a peer's link
-- moves between them, so they must agree: a node refuses to capture or serve while
-- the region's leader, or a live standby, runs with the other setting.

ALTER TABLE mesh.node_state ADD COLUMN IF NOT EXISTS relay boolean;

CREATE OR REPLACE VIEW mesh.nodes AS
SELECT n.node,
       n.region,
       n.role,
       n.started_at,
       n.heartbeat,
       (n.role <> 'stopped' AND n.heartbeat > now() - interval '10 seconds') AS alive,
       n.relay
FROM mesh.node_state n;

INSERT INTO mesh.schema_versions (version, description)
VALUES (12, 'nodes record --relay')
ON CONFLICT (version) DO NOTHING;
