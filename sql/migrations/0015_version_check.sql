-- pgmesh catalog, version 15: apply checks, under the change log's append lock, that
-- the row versions it resolved against are still the stored ones before it stores
-- its own.
--
-- A remote delete of a row that is absent here writes no row, only a tombstone, so
-- no row lock or unique index orders it against a local insert of the same key
-- that is still uncommitted when apply locks. Capture could log that insert (and
-- store its version) before apply stored the tombstone, which then overwrote it.
-- Capture stores versions under the append lock; apply now takes it before the
-- check, so capture either stored before the check (which fails, and apply resolves
-- the batch again, seeing the local write) or stores after apply's commit (and then
-- raises the local write's HLC above the tombstone its row stands on).
CREATE OR REPLACE FUNCTION mesh.versions_unchanged(append_lock bigint, tbls text[], pks text[],
                                                   hlcs bigint[], origins smallint[])
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    PERFORM pg_advisory_xact_lock(append_lock);
    -- A new snapshot (this function is volatile): capture's appends that committed
    -- while we waited for the lock are visible.
    SELECT e.t || ' ' || e.k INTO changed
      FROM unnest(tbls, pks, hlcs, origins) AS e(t, k, h, o)
      LEFT JOIN LATERAL (SELECT r.hlc, r.origin FROM mesh.row_versions r
                          WHERE r.tbl = e.t AND r.pk = e.k LIMIT 1) v ON true
     WHERE v.hlc IS DISTINCT FROM e.h OR v.origin IS DISTINCT FROM e.o
     LIMIT 1;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'the row version of % changed while apply resolved it', changed
            USING ERRCODE = '40001';
    END IF;
    RETURN true;
END $$;

INSERT INTO mesh.schema_versions (version, description)
VALUES (15, 'apply checks row versions under the append lock before storing its own')
ON CONFLICT (version) DO NOTHING;
