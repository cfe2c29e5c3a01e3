-- pgmesh catalog, version 11: capture leaders are fenced by an epoch.
--
-- Each node that becomes its region's capture leader takes the next epoch, under
-- the change log's append lock, before it reads where to resume; each append of
-- captured events checks, under the same lock, that its leader's epoch is still
-- the current one. So a previous leader that lost its lock but still has an append
-- on its way can never log after the new leader read where to resume (it would log
-- the same transactions twice). See replicator/src/log/fence.rs.
CREATE TABLE IF NOT EXISTS mesh.capture_epochs (
    region     text PRIMARY KEY,
    epoch      bigint NOT NULL,
    node       text,
    taken_at   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO mesh.schema_versions (version, description)
VALUES (11, 'capture leader epochs')
ON CONFLICT (version) DO NOTHING;
