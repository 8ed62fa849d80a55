//! The `ebs.*` control plane over NATS (request/reply, JSON bodies), as specified in
//! `../shared/nats-api.md`: EC2-shaped volume subjects and Hive's mount/unmount/delete.

pub mod api;
pub mod cluster;
pub mod handlers;
mod hive;
mod records;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

pub use handlers::{Control, Handled};

use crate::engine::Engine;

/// Every subject served with the queue group (the operation is the last token).
pub const SUBJECTS: &[&str] = &[
    "ebs.createvolume",
    "ebs.describevolumes",
    "ebs.attachvolume",
    "ebs.detachvolume",
    "ebs.deletevolume",
    "ebs.modifyvolume",
    "ebs.createsnapshot",
    "ebs.describesnapshots",
    "ebs.deletesnapshot",
    "ebs.describevolumespace",
    "ebs.mount",
    "ebs.unmount",
    "ebs.delete",
];

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// NATS server URL.
    pub nats_url: String,
    /// Queue group for the shared subjects.
    pub queue_group: String,
    /// Node name: also serve `ebs.NODE.mount` and `ebs.NODE.unmount` (no queue group).
    pub node: Option<String>,
    /// `host:port` put into mount URIs.
    pub nbd_advertise: String,
    /// The NBD server requires TLS: mount URIs use the `nbds://` scheme (NBD URI spec).
    pub nbd_tls: bool,
    /// Mount URIs name exports by the bare id (`--nbd-open-exports`).
    pub open_exports: bool,
    /// Cluster mode (`--cluster`): the volume leases' time (`--lease-ttl`); needs `node` and
    /// JetStream on the NATS server.
    pub lease_ttl: Option<Duration>,
    /// Cluster mode: copies of the catalog's and the leases' KV buckets when this node creates
    /// them (`--kv-replicas`: 3 on a NATS cluster of 3 or more servers keeps them through the
    /// loss of one).
    pub kv_replicas: usize,
    /// Cluster mode: how long a half-made catalog entry (a ClientToken claim without its
    /// volume, a clone left `creating`) must stay unchanged, as this node sees it, before it
    /// counts as abandoned by its node (`--abandon-after`, default 10 min).
    pub abandon_after: Duration,
}

/// The JetStream KV bucket of the volume leases.
pub const LEASE_BUCKET: &str = "vblock-leases";

/// The JetStream KV bucket of the cluster's catalog (volume and snapshot records).
pub const CATALOG_BUCKET: &str = "vblock-catalog";

/// Why the control plane cannot serve at all (the daemon stops).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Cluster mode: a daemon already answers on `vblock.NODE.*` for this `--node` name. Node
    /// names must be unique in a cluster (requests addressed to a node would reach both).
    #[error("another daemon already serves cluster node name {0:?} (it answers on vblock.{0}.*); node names must be unique in a cluster")]
    NodeNameTaken(String),
}

/// How long a starting cluster node waits for another daemon of its name to answer.
const NODE_NAME_PROBE: Duration = Duration::from_secs(2);

/// Serves the control plane until the process ends. Connects in the background and reconnects
/// for ever, logging each disconnect and reconnect; NBD keeps serving meanwhile.
///
/// Errors: [`ControlError::NodeNameTaken`] (cluster mode, at start).
pub async fn run(engine: Arc<Engine>, config: ControlConfig) -> Result<(), ControlError> {
    let scheme = if config.nbd_tls { "nbds" } else { "nbd" };
    let options = |url: String| {
        async_nats::ConnectOptions::new()
            .name("vblock")
            .retry_on_initial_connect()
            .max_reconnects(None)
            // At most 250 ms between attempts (the client's default grows to 4 s): a kept
            // lease is given up 2/3 of --lease-ttl after its last renewal, so the control
            // plane must be back soon after NATS is.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((1u64 << attempts.min(8)).min(250))
            })
            .event_callback(move |event| {
                let url = url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%url, "NATS connected"),
                        async_nats::Event::Disconnected => tracing::warn!(%url, "NATS disconnected; reconnecting in the background"),
                        other => tracing::info!(%url, event = %other, "NATS event"),
                    }
                }
            })
    };
    let client = loop {
        match options(config.nats_url.clone())
            .connect(config.nats_url.as_str())
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                // Only a bad URL fails here (connection failures retry in the background).
                tracing::error!(url = %config.nats_url, error = %e, "NATS connect failed; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    if let (Some(_), Some(node)) = (config.lease_ttl, &config.node) {
        // Before this process subscribes: a daemon already answering for this node name is
        // another process (a restarted one's earlier process is dead: NATS dropped its
        // subscriptions with its connection). Two starting at once are not caught.
        // A cheap request (an id no volume has: one catalog read there); only a daemon's
        // answer (its JSON reply) counts.
        let subject = format!("vblock.{node}.describevolumes");
        let body = br#"{"VolumeIds":["vol-00000000000000000"]}"#;
        let asked = tokio::time::timeout(
            NODE_NAME_PROBE,
            client.request(subject, bytes::Bytes::from_static(body)),
        )
        .await;
        let daemon = |m: &async_nats::Message| {
            serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v.get("Volumes").is_some() || v.get("Error").is_some())
        };
        match asked {
            Ok(Ok(m)) if daemon(&m) => return Err(ControlError::NodeNameTaken(node.clone())),
            Err(_) => {
                tracing::warn!(%node, "no answer within 2 s on vblock.{node}.* (NATS down or slow): starting without knowing whether another daemon has this node name")
            }
            Ok(_) => {}
        }
    }
    let cluster = match (config.lease_ttl, &config.node) {
        (Some(ttl), Some(node)) => loop {
            let opened = async {
                let replicas = config.kv_replicas;
                let leases = crate::cluster::lease::Leases::open(
                    client.clone(),
                    LEASE_BUCKET,
                    ttl,
                    replicas,
                )
                .await
                .map_err(|e| e.to_string())?;
                let catalog = crate::cluster::catalog::Catalog::open(
                    client.clone(),
                    CATALOG_BUCKET,
                    replicas,
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok::<_, String>(cluster::ClusterMode::new(
                    leases,
                    catalog,
                    client.clone(),
                    node,
                    config.abandon_after,
                ))
            }
            .await;
            match opened {
                Ok(mode) => {
                    let mode = Arc::new(mode);
                    let keeps = mode.clone();
                    engine.set_cluster_gc(Arc::new(move |id| keeps.keeps(id)));
                    let held = mode.clone();
                    engine.set_cluster_tenure(Arc::new(move |id| held.tenure(id)));
                    break Some(mode);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cluster mode: the KV buckets are unreachable (is JetStream on?); retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        },
        _ => None,
    };
    let control = Arc::new(
        Control::new(engine, format!("{scheme}://{}", config.nbd_advertise))
            .with_node(config.node.clone())
            .with_open_exports(config.open_exports)
            .with_cluster(cluster.clone()),
    );
    if let Some(cluster) = cluster {
        if let Err(e) = control.fill_empty_catalog(&cluster).await {
            tracing::error!(error = %e, "cluster mode: filling the empty catalog from the bucket failed");
        }
        if let Err(e) = control.forget_mounts(&cluster).await {
            tracing::error!(error = %e, "cluster mode: forgetting the mounts of an earlier process failed");
        }
        tokio::spawn(control.clone().watch_leases(cluster));
    }
    let mut subs = Vec::new();
    for s in SUBJECTS {
        match client.queue_subscribe(*s, config.queue_group.clone()).await {
            Ok(sub) => subs.push(sub),
            Err(e) => tracing::error!(subject = s, error = %e, "subscribe failed"),
        }
    }
    if let Some(node) = &config.node {
        let mut subjects: Vec<String> = ["mount", "unmount"]
            .iter()
            .map(|op| format!("ebs.{node}.{op}"))
            .collect();
        if config.lease_ttl.is_some() {
            // Cluster mode: every operation addressed to this node (requests other nodes
            // forward to a volume's owner).
            subjects.extend(
                SUBJECTS
                    .iter()
                    .filter_map(|s| s.rsplit('.').next())
                    .map(|op| format!("vblock.{node}.{op}")),
            );
        }
        for subject in subjects {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => subs.push(sub),
                Err(e) => tracing::error!(%subject, error = %e, "subscribe failed"),
            }
        }
    }
    let mut messages = futures::stream::select_all(subs);
    while let Some(msg) = messages.next().await {
        let control = control.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let forwarded = msg
                .headers
                .as_ref()
                .is_some_and(|h| h.get(handlers::FORWARDED_HEADER).is_some());
            let handled = control
                .handle_request(msg.subject.as_str(), &msg.payload, forwarded)
                .await;
            // The operation (last token) labels the metrics: node subjects `ebs.NODE.mount`
            // count as `mount`, and the label set stays bounded.
            let op = operation(msg.subject.as_str());
            metrics::counter!("vblock_nats_requests_total", "op" => op, "result" => handled.result.clone())
                .increment(1);
            metrics::histogram!("vblock_nats_request_duration_seconds", "op" => op)
                .record(started.elapsed());
            if let Some(reply) = msg.reply {
                if let Err(e) = client.publish(reply, handled.reply.into()).await {
                    tracing::warn!(subject = %msg.subject, error = %e, "reply failed");
                }
            }
            if let Some((subject, body)) = handled.broadcast {
                if let Err(e) = client.publish(subject, body.into()).await {
                    tracing::warn!(subject = %msg.subject, error = %e, "broadcast failed");
                }
            }
        });
    }
    Ok(())
}

/// The operation label of `subject`: its last token when it is a served operation, else `other`.
fn operation(subject: &str) -> &'static str {
    let last = subject.rsplit('.').next().unwrap_or("");
    SUBJECTS
        .iter()
        .map(|s| s.rsplit('.').next().unwrap_or(""))
        .chain(["mount", "unmount"])
        .find(|op| *op == last)
        .unwrap_or("other")
}
