-- pgmesh catalog, version 2: row versions, links, conflicts, dead letters, admin views
-- and functions for multi-region replication.

-- The version of each replicated row: the (hlc, origin) of the last change that won
-- on it, local or remote. Deletes leave tombstones (deleted = true).
CREATE TABLE IF NOT EXISTS mesh.row_versions (
    tbl      text NOT NULL,
    pk       jsonb NOT NULL,
    hlc      bigint NOT NULL,
    origin   smallint NOT NULL,
    deleted  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tbl, pk)
);

-- Replication links: this region pulls from `peer`. checkpoint = the last sequence
-- number of the peer's change log applied here.
CREATE TABLE IF NOT EXISTS mesh.link_state (
    peer          text PRIMARY KEY,
    address       text NOT NULL DEFAULT '',
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'paused', 'degraded', 'decommissioned')),
    checkpoint    bigint NOT NULL DEFAULT 0,
    applied_hlc   bigint NOT NULL DEFAULT 0,
    last_commit_ts timestamptz,
    last_applied_at timestamptz,
    peer_head     bigint NOT NULL DEFAULT 0,
    error         text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mesh.conflicts (
    id            bigserial PRIMARY KEY,
    tbl           text NOT NULL,
    pk            jsonb NOT NULL,
    local_origin  text NOT NULL,
    local_hlc     bigint NOT NULL,
    remote_origin text NOT NULL,
    remote_hlc    bigint NOT NULL,
    local_op      text,
    remote_op     text NOT NULL,
    winner        text NOT NULL CHECK (winner IN ('local', 'remote')),
    strategy      text NOT NULL,
    detected_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mesh.dead_letters (
    id          bigserial PRIMARY KEY,
    peer        text NOT NULL,
    origin      text NOT NULL,
    hlc         bigint NOT NULL,
    event       jsonb NOT NULL,
    error       text NOT NULL,
    sqlstate    text,
    attempts    integer NOT NULL DEFAULT 1,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'retry', 'skipped', 'applied')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (origin, hlc)
);

CREATE OR REPLACE FUNCTION mesh.pause_link(name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mesh.link_state SET status = 'paused', updated_at = now() WHERE peer = name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no link to peer %', name USING ERRCODE = '42704';
    END IF;
    PERFORM pg_notify('pgmesh_links', name);
END $$;

CREATE OR REPLACE FUNCTION mesh.resume_link(name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mesh.link_state SET status = 'active', updated_at = now() WHERE peer = name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no link to peer %', name USING ERRCODE = '42704';
    END IF;
    PERFORM pg_notify('pgmesh_links', name);
END $$;

-- Retry: the node applies the event again on its next batch of that link.
CREATE OR REPLACE FUNCTION mesh.retry_dead_letter(dead_letter_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mesh.dead_letters SET status = 'retry', updated_at = now()
    WHERE id = dead_letter_id AND status IN ('pending', 'retry');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no pending dead letter %', dead_letter_id USING ERRCODE = '42704';
    END IF;
    PERFORM pg_notify('pgmesh_links', 'dead_letters');
END $$;

CREATE OR REPLACE FUNCTION mesh.skip_dead_letter(dead_letter_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mesh.dead_letters SET status = 'skipped', updated_at = now()
    WHERE id = dead_letter_id AND status IN ('pending', 'retry');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no pending dead letter %', dead_letter_id USING ERRCODE = '42704';
    END IF;
END $$;

CREATE OR REPLACE VIEW mesh.links AS
SELECT l.peer AS name,
       l.peer AS source,
       (SELECT name FROM mesh.regions WHERE is_local) AS target,
       l.address,
       l.status,
       l.checkpoint,
       l.peer_head,
       greatest(l.peer_head - l.checkpoint, 0) AS backlog_events,
       CASE WHEN l.peer_head <= l.checkpoint THEN 0
            ELSE (extract(epoch FROM (clock_timestamp() - coalesce(l.last_commit_ts, l.updated_at))) * 1000)::bigint
       END AS lag_ms,
       l.last_applied_at,
       l.error
FROM mesh.link_state l;

CREATE OR REPLACE VIEW mesh.checkpoints AS
SELECT peer, checkpoint, applied_hlc, updated_at FROM mesh.link_state;

CREATE OR REPLACE VIEW mesh.nodes AS
SELECT n.node, n.region, n.role, n.started_at, n.heartbeat FROM mesh.node_state n;

INSERT INTO mesh.schema_versions (version, description)
VALUES (2, 'replication: row versions, links, conflicts, dead letters')
ON CONFLICT (version) DO NOTHING;
