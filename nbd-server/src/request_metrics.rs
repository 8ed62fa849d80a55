//! Per-connection request metrics (Prometheus names; docs/OPERATIONS.md lists them all).
//!
//! Handles are resolved once per connection and op, so recording a request costs a few atomic
//! adds and no label lookup.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::proto::*;

/// Op label values, indexed by [`op_index`].
const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

/// Index into [`OPS`] of an NBD command type; `None` for unknown types (rejected with
/// `NBD_EINVAL` and not counted per op).
fn op_index(kind: u16) -> Option<usize> {
    Some(match kind {
        NBD_CMD_READ => 0,
        NBD_CMD_WRITE => 1,
        NBD_CMD_FLUSH => 2,
        NBD_CMD_TRIM => 3,
        NBD_CMD_WRITE_ZEROES => 4,
        NBD_CMD_BLOCK_STATUS => 5,
        NBD_CMD_CACHE => 6,
        _ => return None,
    })
}

struct Op {
    /// `vblock_nbd_requests_total{volume,op}`.
    requests: Counter,
    /// `vblock_nbd_request_errors_total{volume,op}`: replies with a non-zero NBD error.
    errors: Counter,
    /// `vblock_nbd_request_bytes_total{volume,op}`: payload bytes of reads and writes.
    bytes: Counter,
    /// `vblock_nbd_request_duration_seconds{volume,op}`: from parsed request to queued reply.
    seconds: Histogram,
}

/// The metrics of one NBD connection's export.
pub(crate) struct ConnMetrics {
    ops: Vec<Op>,
    /// `vblock_nbd_connections{volume}`: connections in the transmission phase now.
    connections: Gauge,
}

impl ConnMetrics {
    /// Handles for export `volume`; counts the connection as open until dropped.
    pub(crate) fn new(volume: &str) -> Self {
        let ops = OPS
            .iter()
            .map(|op| {
                let labels = [("volume", volume.to_owned()), ("op", (*op).to_owned())];
                Op {
                    requests: counter!("vblock_nbd_requests_total", &labels),
                    errors: counter!("vblock_nbd_request_errors_total", &labels),
                    bytes: counter!("vblock_nbd_request_bytes_total", &labels),
                    seconds: histogram!("vblock_nbd_request_duration_seconds", &labels),
                }
            })
            .collect();
        let connections = gauge!("vblock_nbd_connections", "volume" => volume.to_owned());
        connections.increment(1.0);
        Self { ops, connections }
    }

    /// Records one request of NBD command type `kind` with `len` bytes (counted for reads and
    /// writes only), finished after `took`.
    pub(crate) fn record(&self, kind: u16, len: u32, failed: bool, took: Duration) {
        let Some(op) = op_index(kind).and_then(|i| self.ops.get(i)) else {
            return;
        };
        op.requests.increment(1);
        if failed {
            op.errors.increment(1);
        } else if matches!(kind, NBD_CMD_READ | NBD_CMD_WRITE) {
            op.bytes.increment(u64::from(len));
        }
        op.seconds.record(took);
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.connections.decrement(1.0);
    }
}
