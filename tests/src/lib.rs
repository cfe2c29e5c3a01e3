//! End-to-end harness: real PostgreSQL clusters and pgmesh nodes for tests.
