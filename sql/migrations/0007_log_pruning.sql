-- pgmesh catalog, version 7: pruning the change log.
--
-- A region's log keeps every event it captured or applied. Events below the
-- horizon (the lowest log position that every region pulling from this one has
-- durably applied) are no longer needed to serve anyone: a node deletes its own
-- region's events below it (all but the newest, from which capture resumes) and
-- strips the changes of other regions' events, keeping their ids (origin, hlc),
-- which apply uses to recognise duplicates.

-- The highest checkpoint of each link known to be durable (a synchronous commit
-- covered it); what the link reports to its peer for pruning.
ALTER TABLE mesh.link_state
    ADD COLUMN IF NOT EXISTS durable_checkpoint bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW mesh.checkpoints AS
SELECT peer, checkpoint, applied_hlc, updated_at, durable_checkpoint FROM mesh.link_state;

-- What each region that pulls from this one has durably applied of this log.
-- A region listed here holds back pruning until it catches up or is forgotten
-- with mesh.forget_peer.
CREATE TABLE IF NOT EXISTS mesh.peer_acks (
    peer        text PRIMARY KEY,
    durable_seq bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- How far the log was pruned: seq values at or below pruned_upto may be gone or
-- stripped, so a peer asking for events after an older position is refused.
CREATE TABLE IF NOT EXISTS mesh.log_prune (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    pruned_upto bigint NOT NULL DEFAULT 0,
    pruned_at   timestamptz
);
INSERT INTO mesh.log_prune DEFAULT VALUES ON CONFLICT DO NOTHING;

-- A region that will never pull from this one again (decommissioned) stops
-- holding back pruning. Returns whether it was known.
CREATE OR REPLACE FUNCTION mesh.forget_peer(name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM mesh.peer_acks WHERE peer = name RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

INSERT INTO mesh.schema_versions (version, description)
VALUES (7, 'change log pruning: durable acks, prune horizon')
ON CONFLICT (version) DO NOTHING;
