//! Cluster mode (`vblock serve --cluster`): many daemons on one bucket. The design, and which
//! parts of it exist, is docs/design/cluster.md; this module holds the parts built so far.

pub mod epoch;
pub mod lease;
pub mod walobj;
