//! pgmesh SQL helpers: statement classification and catalog migrations.
