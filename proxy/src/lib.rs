//! pgmesh node library: the wire-protocol proxy and its CLI.
