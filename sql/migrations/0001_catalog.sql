-- pgmesh catalog, version 1: schema versions, nodes, the change log and capture state.
-- Applied by `pgmesh init` inside one transaction. Never edit an applied migration;
-- add a new file instead.

CREATE SCHEMA IF NOT EXISTS mesh;

CREATE TABLE IF NOT EXISTS mesh.schema_versions (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per region known to this database; origin_id is the small stable integer
-- that breaks HLC ties.
CREATE TABLE IF NOT EXISTS mesh.regions (
    name       text PRIMARY KEY,
    origin_id  smallint NOT NULL UNIQUE,
    is_local   boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS regions_one_local ON mesh.regions (is_local) WHERE is_local;

-- Nodes that have run capture for this region (leader and standbys).
CREATE TABLE IF NOT EXISTS mesh.node_state (
    node        text PRIMARY KEY,
    region      text NOT NULL,
    role        text NOT NULL CHECK (role IN ('leader', 'standby', 'stopped')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    heartbeat   timestamptz NOT NULL DEFAULT now()
);

-- The durable change log: one row per committed source transaction.
-- Event id is (origin, hlc). `changes` holds values as PostgreSQL text (strings) or
-- null, never as JSON numbers.
CREATE TABLE IF NOT EXISTS mesh.changelog (
    seq         bigserial PRIMARY KEY,
    origin      text NOT NULL,
    hlc         bigint NOT NULL,
    source_lsn  pg_lsn NOT NULL,
    xid         bigint NOT NULL,
    commit_ts   timestamptz NOT NULL,
    logged_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    stamped     boolean NOT NULL,
    local_only  boolean NOT NULL DEFAULT false,
    tags        jsonb NOT NULL DEFAULT '{}',
    changes     jsonb NOT NULL,
    UNIQUE (origin, hlc)
);
-- Capture resumes after the highest logged source LSN of its own region.
CREATE UNIQUE INDEX IF NOT EXISTS changelog_origin_lsn ON mesh.changelog (origin, source_lsn);

INSERT INTO mesh.schema_versions (version, description)
VALUES (1, 'catalog: regions, node_state, changelog')
ON CONFLICT (version) DO NOTHING;
