-- pgmesh catalog, version 8: a link that cannot reach its peer shows its lag.
--
-- Before, mesh.links computed lag_ms from the peer's log head as last seen. A link
-- whose peer went unreachable (a partition, a dead node) kept the head it saw last,
-- so it showed a lag of 0 for as long as the outage lasted, and so did
-- pgmesh_replication_lag_seconds, which reads it. Now each link records when it last
-- heard from its peer (a batch, a heartbeat, a handshake, or a paused link's head
-- check). While the link is down, what this region holds of the peer is at least
-- that old, and lag_ms says so.

-- A link not heard from since it was created counts from then; links that existed
-- before this version count from their last apply or update.
ALTER TABLE mesh.link_state ADD COLUMN IF NOT EXISTS contact_at timestamptz;
UPDATE mesh.link_state SET contact_at = coalesce(last_applied_at, updated_at)
 WHERE contact_at IS NULL;
ALTER TABLE mesh.link_state ALTER COLUMN contact_at SET DEFAULT now();

-- A link is stale when its node has not heard from the peer for 30 s: a connected
-- link hears a heartbeat every second and gives up after 15 s of silence, and a
-- paused one asks for the peer's head every 2 s. So its node is down or hung, or
-- the peer is unreachable. A 'decommissioned' link is never stale.
-- status: a stale 'active' link shows as 'degraded' (nobody updates its row).
-- lag_ms: the age of the oldest change not yet applied, from the peer head last seen
-- (0 when caught up), and, while the link is degraded or stale, at least the time
-- since the peer was last heard from.
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
           END) AS lag_ms,
       l.last_applied_at,
       l.error,
       l.contact_at AS last_contact_at
FROM mesh.link_state l,
     LATERAL (SELECT l.status <> 'decommissioned'
                     AND l.contact_at < clock_timestamp() - interval '30 seconds' AS stale) s;

-- Forgetting a region also marks the link from it decommissioned, so a link to a
-- region that is gone stops showing as degraded; the link's next connection, or
-- mesh.resume_link, reactivates it. (Version 9 redefines it.)
CREATE OR REPLACE FUNCTION mesh.forget_peer(name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM mesh.peer_acks WHERE peer = name RETURNING 1),
         l AS (UPDATE mesh.link_state SET status = 'decommissioned', updated_at = now()
               WHERE peer = name RETURNING 1)
    SELECT (SELECT count(*) FROM d) + (SELECT count(*) FROM l) > 0
$$;

INSERT INTO mesh.schema_versions (version, description)
VALUES (8, 'links: last contact with the peer, lag while a link is down')
ON CONFLICT (version) DO NOTHING;
