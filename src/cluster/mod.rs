//! Cluster mode (`vblock serve --cluster`): many daemons on one bucket. The design, and which
//! parts of it exist, is docs/design/cluster.md; this module holds the parts built so far.

pub mod catalog;
pub mod epoch;
pub mod lease;
pub mod walobj;

/// JetStream KV bucket `bucket`, created with one value per key and `replicas` copies (on as
/// many servers of a NATS cluster; 1 to 5) if it does not exist (the catalog's and the leases'
/// buckets). An existing bucket keeps its settings.
pub(crate) async fn open_bucket(
    client: async_nats::Client,
    bucket: &str,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, async_nats::jetstream::context::CreateKeyValueError> {
    let js = async_nats::jetstream::new(client);
    match js.get_key_value(bucket).await {
        Ok(kv) => Ok(kv),
        // Creating an existing bucket with the same settings succeeds, so two daemons starting
        // together both get it.
        Err(_) => {
            js.create_key_value(async_nats::jetstream::kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
        }
    }
}
