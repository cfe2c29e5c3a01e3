//! The versioned SQL migrations of the `mesh` catalog, embedded in the binary.
//!
//! Each migration is a file `migrations/NNNN_name.sql` applied once, in order, in its
//! own transaction; `mesh.schema_versions` records which ran. This module only lists
//! them; applying them is the replicator's `catalog` module.

/// One migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "catalog",
        sql: include_str!("../migrations/0001_catalog.sql"),
    },
    Migration {
        version: 2,
        name: "replication",
        sql: include_str!("../migrations/0002_replication.sql"),
    },
    Migration {
        version: 3,
        name: "nodes_view",
        sql: include_str!("../migrations/0003_nodes_view.sql"),
    },
    Migration {
        version: 4,
        name: "version_xids",
        sql: include_str!("../migrations/0004_version_xids.sql"),
    },
    Migration {
        version: 5,
        name: "text_version_keys",
        sql: include_str!("../migrations/0005_text_version_keys.sql"),
    },
    Migration {
        version: 6,
        name: "json_changes",
        sql: include_str!("../migrations/0006_json_changes.sql"),
    },
    Migration {
        version: 7,
        name: "log_pruning",
        sql: include_str!("../migrations/0007_log_pruning.sql"),
    },
    Migration {
        version: 8,
        name: "link_contact",
        sql: include_str!("../migrations/0008_link_contact.sql"),
    },
    Migration {
        version: 9,
        name: "tombstone_index",
        sql: include_str!("../migrations/0009_tombstone_index.sql"),
    },
    Migration {
        version: 10,
        name: "region_floors",
        sql: include_str!("../migrations/0010_region_floors.sql"),
    },
    Migration {
        version: 11,
        name: "capture_epochs",
        sql: include_str!("../migrations/0011_capture_epochs.sql"),
    },
    Migration {
        version: 12,
        name: "node_relay",
        sql: include_str!("../migrations/0012_node_relay.sql"),
    },
    Migration {
        version: 13,
        name: "forget_local",
        sql: include_str!("../migrations/0013_forget_local.sql"),
    },
    Migration {
        version: 14,
        name: "view_clocks",
        sql: include_str!("../migrations/0014_view_clocks.sql"),
    },
    Migration {
        version: 15,
        name: "version_check",
        sql: include_str!("../migrations/0015_version_check.sql"),
    },
    Migration {
        version: 16,
        name: "hot_row_versions",
        sql: include_str!("../migrations/0016_hot_row_versions.sql"),
    },
    Migration {
        version: 17,
        name: "cheap_analyze",
        sql: include_str!("../migrations/0017_cheap_analyze.sql"),
    },
];

/// The newest catalog version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_and_ordered() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(
                m.sql.contains(&format!("VALUES ({},", m.version)),
                "{} records itself",
                m.name
            );
        }
    }
}
