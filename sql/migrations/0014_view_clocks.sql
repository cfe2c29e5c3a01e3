-- pgmesh catalog, version 14: admin views read the clock, not the transaction start,
-- and never show a negative lag; open dead letters get an index of their own.
--
-- mesh.links.lag_ms subtracted the last applied commit time from the clock; a peer
-- whose clock runs ahead made it negative (and pgmesh_replication_lag_seconds with
-- it). It is now at least 0. mesh.nodes.alive compared heartbeats with now(), the
-- start of the reading transaction, so a long monitoring transaction kept a dead
-- node alive; it uses clock_timestamp() as mesh.links does.
CREATE OR REPLACE VIEW mesh.links AS
SELECT l.peer AS name,
       l.peer AS source,
       (SELECT name FROM mesh.regions WHERE is_local) AS target,
       l.address,
       CASE WHEN s.stale AND l.status = 'active' THEN 'degraded' ELSE l.status END AS status,
       l.checkpoint,
       l.peer_head,
       greatest(l.peer_head - l.checkpoint, 0) AS backlog_events,
       greatest(
           CASE WHEN l.peer_head <= l.checkpoint THEN 0
                ELSE (extract(epoch FROM (clock_timestamp() - coalesce(l.last_commit_ts, l.updated_at))) * 1000)::bigint
           END,
           CASE WHEN s.stale OR l.status = 'degraded'
                THEN (extract(epoch FROM (clock_timestamp() - l.contact_at)) * 1000)::bigint
           END,
           0) AS lag_ms,
       l.last_applied_at,
       l.error,
       l.contact_at AS last_contact_at
FROM mesh.link_state l,
     LATERAL (SELECT l.status <> 'decommissioned'
                     AND l.contact_at < clock_timestamp() - interval '30 seconds' AS stale) s;

CREATE OR REPLACE VIEW mesh.nodes AS
SELECT n.node,
       n.region,
       n.role,
       n.started_at,
       n.heartbeat,
       (n.role <> 'stopped' AND n.heartbeat > clock_timestamp() - interval '10 seconds') AS alive,
       n.relay
FROM mesh.node_state n;

-- The oldest open dead letter of an origin (a region's floor stays below it), read
-- once a second per peer session, without walking the settled ones.
CREATE INDEX IF NOT EXISTS dead_letters_open ON mesh.dead_letters (origin, hlc)
    WHERE status IN ('pending', 'retry');

INSERT INTO mesh.schema_versions (version, description)
VALUES (14, 'admin views read the clock; lag_ms is never negative; index of open dead letters')
ON CONFLICT (version) DO NOTHING;
