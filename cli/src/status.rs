//! `vblock status`: a live table of a daemon's volumes, read from its Prometheus endpoint.
//!
//! Two scrapes `--interval` apart give the rates (IOPS, MB/s); gauges come from the second.
//! Reading `/metrics` rather than a private API means the table shows exactly what Prometheus
//! would record, and works against any daemon an operator can reach over HTTP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use prometheus_parse::{Scrape, Value};
use serde::Serialize;

/// Errors of `vblock status` (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The URL is not `http://HOST:PORT/PATH`.
    #[error("bad metrics URL {0}: expected http://HOST:PORT/metrics")]
    Url(String),
    /// The endpoint could not be reached or answered badly.
    #[error("cannot scrape {url}: {message}")]
    Scrape {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
}

/// One volume's row.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VolumeStatus {
    /// VolumeId.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Size in GiB.
    #[serde(rename = "Size")]
    pub size_gib: f64,
    /// Attached to an instance.
    #[serde(rename = "Attached")]
    pub attached: bool,
    /// Mounted (ebs.mount) for a VM.
    #[serde(rename = "Mounted")]
    pub mounted: bool,
    /// NBD connections in the transmission phase.
    #[serde(rename = "Connections")]
    pub connections: f64,
    /// NBD reads per second over the interval.
    #[serde(rename = "ReadIops")]
    pub read_iops: f64,
    /// NBD writes (write, trim, write-zeroes) per second over the interval.
    #[serde(rename = "WriteIops")]
    pub write_iops: f64,
    /// NBD read payload in MB/s (10^6 bytes).
    #[serde(rename = "ReadMBps")]
    pub read_mbps: f64,
    /// NBD write payload in MB/s (10^6 bytes).
    #[serde(rename = "WriteMBps")]
    pub write_mbps: f64,
    /// Bytes in WAL segments not yet trimmed.
    #[serde(rename = "WalPendingBytes")]
    pub wal_pending_bytes: f64,
    /// Bytes written but not yet in chunk objects (the upload lag).
    #[serde(rename = "UploadLagBytes")]
    pub upload_lag_bytes: f64,
}

/// Fetches `url` (plain HTTP/1.1 GET) and parses it as Prometheus text.
pub async fn scrape(url: &str, timeout: Duration) -> Result<Scrape, StatusError> {
    let uri: hyper::Uri = url.parse().map_err(|_| StatusError::Url(url.into()))?;
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(StatusError::Url(url.into()));
    };
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let fail = |message: String| StatusError::Scrape {
        url: url.into(),
        message,
    };
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(uri.path())
            .header(hyper::header::HOST, addr.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))??;
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).map_err(|e| fail(e.to_string()))
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

/// Sum per volume of the samples of `metric` whose `op` label is one of `ops` (any op if empty).
fn per_volume(s: &Scrape, metric: &str, ops: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for sample in s.samples.iter().filter(|x| x.metric == metric) {
        let Some(vol) = sample.labels.get("volume") else {
            continue;
        };
        if !ops.is_empty() && !sample.labels.get("op").is_some_and(|o| ops.contains(&o)) {
            continue;
        }
        *out.entry(vol.to_owned()).or_insert(0.0) += number(&sample.value);
    }
    out
}

/// The rows for two scrapes `dt` apart, ordered by VolumeId.
pub fn rows(before: &Scrape, after: &Scrape, dt: Duration) -> Vec<VolumeStatus> {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |metric: &str, ops: &[&str], scale: f64| {
        let (a, b) = (
            per_volume(before, metric, ops),
            per_volume(after, metric, ops),
        );
        b.into_iter()
            .map(|(v, x)| {
                let d = (x - a.get(&v).copied().unwrap_or(0.0)).max(0.0);
                (v, d / secs / scale)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let gauge = |metric: &str| per_volume(after, metric, &[]);
    let writes = ["write", "trim", "write_zeroes"];
    let (read_iops, write_iops) = (
        rate("vblock_nbd_requests_total", &["read"], 1.0),
        rate("vblock_nbd_requests_total", &writes, 1.0),
    );
    let (read_mbps, write_mbps) = (
        rate("vblock_nbd_request_bytes_total", &["read"], 1e6),
        rate("vblock_nbd_request_bytes_total", &["write"], 1e6),
    );
    let (attached, mounted, conns, wal, lag) = (
        gauge("vblock_volume_attached"),
        gauge("vblock_volume_mounted"),
        gauge("vblock_nbd_connections"),
        gauge("vblock_wal_pending_bytes"),
        gauge("vblock_buffer_bytes"),
    );
    let get = |m: &BTreeMap<String, f64>, v: &str| m.get(v).copied().unwrap_or(0.0);
    gauge("vblock_volume_size_bytes")
        .into_iter()
        .map(|(v, size)| VolumeStatus {
            size_gib: size / (1u64 << 30) as f64,
            attached: get(&attached, &v) > 0.0,
            mounted: get(&mounted, &v) > 0.0,
            connections: get(&conns, &v),
            read_iops: get(&read_iops, &v),
            write_iops: get(&write_iops, &v),
            read_mbps: get(&read_mbps, &v),
            write_mbps: get(&write_mbps, &v),
            wal_pending_bytes: get(&wal, &v),
            upload_lag_bytes: get(&lag, &v),
            volume_id: v,
        })
        .collect()
}

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1u64 << 20) as f64)
}

/// Prints `rows` as a table.
pub fn print_table(rows: &[VolumeStatus]) {
    println!(
        "{:<22} {:>6} {:>8} {:>7} {:>5} {:>9} {:>9} {:>8} {:>8} {:>11} {:>11}",
        "VOLUME",
        "SIZE",
        "ATTACHED",
        "MOUNTED",
        "CONNS",
        "READ/s",
        "WRITE/s",
        "RD MB/s",
        "WR MB/s",
        "WAL MiB",
        "UNUPLOADED"
    );
    for r in rows {
        println!(
            "{:<22} {:>6} {:>8} {:>7} {:>5} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>11} {:>11}",
            r.volume_id,
            format!("{}G", r.size_gib),
            if r.attached { "yes" } else { "no" },
            if r.mounted { "yes" } else { "no" },
            r.connections,
            r.read_iops,
            r.write_iops,
            r.read_mbps,
            r.write_mbps,
            mib(r.wal_pending_bytes),
            mib(r.upload_lag_bytes)
        );
    }
}

/// Runs `vblock status`: one table (or JSON array), or with `watch` a new one every interval
/// until interrupted.
pub async fn run(
    url: &str,
    interval: Duration,
    watch: bool,
    json: bool,
) -> Result<(), StatusError> {
    let timeout = Duration::from_secs(10);
    let mut before = scrape(url, timeout).await?;
    let mut at = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let after = scrape(url, timeout).await?;
        let now = Instant::now();
        let table = rows(&before, &after, now - at);
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&table).unwrap_or_default()
            );
        } else {
            if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // Clear the screen and home the cursor (ANSI), like top(1).
                print!("\x1b[2J\x1b[H");
            }
            print_table(&table);
        }
        if !watch {
            return Ok(());
        }
        (before, at) = (after, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse")
    }

    #[test]
    fn rates_come_from_counter_deltas_and_gauges_from_the_second_scrape() {
        let before = parse(
            "# TYPE vblock_nbd_requests_total counter\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"read\"} 100\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"write\"} 10\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"trim\"} 0\n\
             # TYPE vblock_volume_size_bytes gauge\n\
             vblock_volume_size_bytes{volume=\"vol-a\"} 1073741824\n",
        );
        let after = parse(
            "# TYPE vblock_nbd_requests_total counter\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"read\"} 300\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"write\"} 50\n\
             vblock_nbd_requests_total{volume=\"vol-a\",op=\"trim\"} 10\n\
             # TYPE vblock_nbd_request_bytes_total counter\n\
             vblock_nbd_request_bytes_total{volume=\"vol-a\",op=\"write\"} 4000000\n\
             # TYPE vblock_volume_size_bytes gauge\n\
             vblock_volume_size_bytes{volume=\"vol-a\"} 2147483648\n\
             vblock_volume_size_bytes{volume=\"vol-b\"} 1073741824\n\
             # TYPE vblock_volume_mounted gauge\n\
             vblock_volume_mounted{volume=\"vol-a\"} 1\n\
             # TYPE vblock_wal_pending_bytes gauge\n\
             vblock_wal_pending_bytes{volume=\"vol-a\"} 4096\n",
        );
        let rows = rows(&before, &after, Duration::from_secs(2));
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!(a.volume_id, "vol-a");
        assert_eq!(a.size_gib, 2.0);
        assert_eq!(a.read_iops, 100.0);
        assert_eq!(a.write_iops, 25.0, "writes and trims: (40 + 10) / 2 s");
        assert_eq!(
            a.write_mbps, 2.0,
            "a counter new in the second scrape starts at 0"
        );
        assert!(a.mounted && !a.attached);
        assert_eq!(a.wal_pending_bytes, 4096.0);
        assert_eq!(rows[1].volume_id, "vol-b");
        assert_eq!(rows[1].read_iops, 0.0);
    }
}
