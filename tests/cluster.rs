//! Cluster building blocks against a real `nats-server -js` (docs/design/cluster.md): volume
//! leases in JetStream KV. The fencing primitive they rely on for safety
//! (`Backend::put_if_absent`) is tested in tests/s3.rs and the backend tests.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Nats;
use vblock::cluster::lease::{Claim, LeaseError, Leases, Owner};
use vblock::VolumeId;

/// The lease time of these tests.
const TTL: Duration = Duration::from_secs(2);

/// Daemon process `node` (a fresh instance each call).
fn owner(node: &str) -> Owner {
    Owner::new(node, 1, &format!("{node}:10809"))
}

/// A node's view of the leases: its own NATS connection, as a separate daemon would have.
async fn leases(nats: &Nats) -> Arc<Leases> {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    Arc::new(
        Leases::open(client, "vblock-leases", TTL, 1)
            .await
            .expect("KV bucket"),
    )
}

fn run(f: impl std::future::Future<Output = ()>) {
    common::run(Duration::from_secs(60), f);
}

/// Claims a free lease, which must be won at once.
async fn win(l: &Leases, id: &VolumeId, me: &Owner) -> (u64, Instant) {
    let started = Instant::now();
    match l.claim(id, me).await.expect("claim") {
        Claim::Won { revision, sent } => {
            assert!(started.elapsed() < TTL, "a free lease was watched");
            (revision, sent)
        }
        Claim::Held(o) => panic!("a free lease is held by {o:?}"),
    }
}

/// Another node writes volume `id`'s lease key behind its holder's back (as a takeover after
/// a KV fault would): the holder's lease is lost.
async fn overwrite_lease(nats: &Nats, id: &VolumeId) {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let kv = js.get_key_value("vblock-leases").await.expect("bucket");
    let other = serde_json::to_vec(&owner("z")).expect("json");
    kv.put(format!("owner.{id}"), other.into())
        .await
        .expect("put");
}

/// Whether `claim` reports `holder` as the lease's.
fn held_by(claim: &Claim, holder: &Owner) -> bool {
    matches!(claim, Claim::Held(o) if o.same_holder(holder))
}

/// While its holder keeps it, another node's claim returns the holder within a renewal (not
/// the TTL); a stopped and released lease is won at once.
#[test]
fn a_kept_lease_is_held_and_a_released_one_is_free() {
    let nats = Nats::start_jetstream();
    run(async {
        let (a, b) = (leases(&nats).await, leases(&nats).await);
        let (me_a, me_b) = (owner("a"), owner("b"));
        let id = VolumeId::generate();
        let (revision, sent) = win(&a, &id, &me_a).await;
        let kept = a.keep(&id, &me_a, revision, sent);
        let started = Instant::now();
        while started.elapsed() < 2 * TTL {
            let asked = Instant::now();
            let claim = b.claim(&id, &me_b).await.expect("claim");
            assert!(held_by(&claim, &me_a), "{claim:?}");
            assert!(
                asked.elapsed() < TTL,
                "a kept lease was watched for the whole TTL"
            );
        }
        assert!(!kept.is_lost());
        let revision = kept.stop().await.expect("still held");
        a.release(&id, revision).await.expect("release");
        win(&b, &id, &me_b).await;
    });
}

/// A holder that stops renewing loses the lease to a claimer once the TTL has passed on the
/// claimer's clock; its next renewal and its release are refused (`Lost`). A restarted daemon
/// of the same node is another holder: it waits out the TTL too.
#[test]
fn a_lease_not_renewed_for_the_ttl_is_taken_over() {
    let nats = Nats::start_jetstream();
    run(async {
        let (a, b) = (leases(&nats).await, leases(&nats).await);
        let (me_a, me_b) = (owner("a"), owner("b"));
        let id = VolumeId::generate();
        let (old, _) = win(&a, &id, &me_a).await;
        let started = Instant::now();
        let Claim::Won { revision, .. } = b.claim(&id, &me_b).await.expect("claim") else {
            panic!("a lease nobody renewed was not taken over");
        };
        assert!(started.elapsed() >= TTL, "taken over before the TTL passed");
        assert!(matches!(
            a.renew(&id, &me_a, old).await,
            Err(LeaseError::Lost(_))
        ));
        assert!(matches!(
            a.release(&id, old).await,
            Err(LeaseError::Lost(_))
        ));
        let (holder, at) = b.holder(&id).await.expect("holder").expect("held");
        assert!(holder.same_holder(&me_b) && at == revision);
        // The same holder claiming again keeps it at once; a restart of node b does not.
        win(&b, &id, &me_b).await;
        let started = Instant::now();
        assert!(matches!(
            b.claim(&id, &owner("b")).await.expect("claim"),
            Claim::Won { .. }
        ));
        assert!(started.elapsed() >= TTL, "a restarted node skipped the TTL");
    });
}

/// Nodes racing to take over one stale lease: exactly one wins, the others are told the
/// winner.
#[test]
fn racing_claims_on_a_stale_lease_have_one_winner() {
    let nats = Nats::start_jetstream();
    run(async {
        let a = leases(&nats).await;
        let id = VolumeId::generate();
        win(&a, &id, &owner("a")).await;
        let mut claims = Vec::new();
        for node in ["b", "c", "d"] {
            let (l, id, me) = (leases(&nats).await, id.clone(), owner(node));
            claims.push(tokio::spawn(async move {
                let claim = l.claim(&id, &me).await.expect("claim");
                (me, claim)
            }));
        }
        let mut winners = Vec::new();
        let mut told = Vec::new();
        for c in claims {
            match c.await.expect("claim task") {
                (me, Claim::Won { .. }) => winners.push(me),
                (_, Claim::Held(o)) => told.push(o),
            }
        }
        assert_eq!(winners.len(), 1, "winners {winners:?}");
        assert!(
            told.iter().all(|o| o.same_holder(&winners[0])),
            "losers were told {told:?}, the winner is {winners:?}"
        );
        let (holder, _) = a.holder(&id).await.expect("holder").expect("held");
        assert!(holder.same_holder(&winners[0]));
    });
}

/// A kept lease is reported lost as soon as another node overwrites it, and (another lease)
/// when NATS goes away for longer than its renewals allow.
#[test]
fn a_kept_lease_reports_its_loss() {
    let mut nats = Nats::start_jetstream();
    run(async {
        let a = leases(&nats).await;
        let me = owner("a");
        let id = VolumeId::generate();
        let (revision, sent) = win(&a, &id, &me).await;
        let kept = a.keep(&id, &me, revision, sent);
        // Another node writes the key (as a takeover after a KV fault would): lost.
        overwrite_lease(&nats, &id).await;
        tokio::time::timeout(TTL, kept.lost())
            .await
            .expect("the overwritten lease was not reported lost");
        assert!(kept.is_lost());
        assert_eq!(kept.stop().await, None);

        let id = VolumeId::generate();
        let (revision, sent) = win(&a, &id, &me).await;
        let kept = a.keep(&id, &me, revision, sent);
        nats.stop();
        tokio::time::timeout(TTL, kept.lost())
            .await
            .expect("a lease that cannot be renewed was not reported lost");
        assert!(
            sent.elapsed() >= TTL * 2 / 3,
            "reported lost while it could be trusted"
        );
    });
}

/// Node names are unique in a cluster: a second daemon started with the name of a node that
/// serves stops at start with exit code 2, naming it; once that node is gone, a daemon of its
/// name starts (a restart).
#[test]
fn a_node_name_in_use_is_refused() {
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let mut a = cluster_daemon(&nats, &s3, "vblock-names", "a");
    // Asked until a's control plane has subscribed (bounded): it answers the probe then.
    node_request(&nats, "a", "describevolumes", serde_json::json!({}));
    let args = cluster_args(&s3, "vblock-names", "a", "2s");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, log) = common::daemon::Daemon::start_expect_failure(
        &nats.url(),
        &args,
        &common::s3::S3Server::env(),
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("another daemon already serves cluster node name \"a\""),
        "{log}"
    );
    a.kill9();
    a.start_again();
    a.create_volume(1);
}

/// `--kv-replicas` reaches JetStream: a bucket created with 3 copies is refused by a single
/// server (it cannot keep them), with 1 it is made.
#[test]
fn kv_buckets_are_created_with_the_replicas_asked() {
    let nats = Nats::start_jetstream();
    run(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let refused = Leases::open(client.clone(), "vblock-replicas", TTL, 3).await;
        assert!(refused.is_err(), "a single server kept 3 copies");
        Leases::open(client, "vblock-replicas", TTL, 1)
            .await
            .expect("one copy");
    });
}

/// A NATS restart across a renewal does not lose the lease: the renewal due during the
/// outage waits for the reconnect, within the time the lease can still be trusted, and the
/// lease is kept. (A renewal that fails at once, such as a JetStream error, is tried again
/// after TTL/12; no real fault here makes one.)
#[test]
fn a_nats_restart_across_a_renewal_keeps_the_lease() {
    let mut nats = Nats::start_jetstream();
    let ttl = Duration::from_secs(6);
    let lease = async |nats: &Nats| {
        // As the daemon's client: reconnects at most 250 ms apart.
        let client = async_nats::ConnectOptions::new()
            .reconnect_delay_callback(|n| Duration::from_millis((1u64 << n.min(8)).min(250)))
            .connect(nats.url())
            .await
            .expect("connect");
        Arc::new(
            Leases::open(client, "vblock-leases", ttl, 1)
                .await
                .expect("KV bucket"),
        )
    };
    common::run(Duration::from_secs(60), async {
        let (a, b) = (lease(&nats).await, lease(&nats).await);
        let me = owner("a");
        let id = VolumeId::generate();
        let (revision, sent) = win(&a, &id, &me).await;
        let kept = a.keep(&id, &me, revision, sent);
        let renewed_after = async |b: &Leases, revision: u64| loop {
            if let Ok(Some((_, r))) = b.holder(&id).await {
                if r > revision {
                    return r;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let first = tokio::time::timeout(ttl, renewed_after(&b, revision))
            .await
            .expect("the first renewal");
        let renewed = Instant::now();
        // The next renewal is due TTL/3 after this one: NATS is down from just before it to
        // well after it.
        tokio::time::sleep((ttl / 3).saturating_sub(Duration::from_millis(300))).await;
        nats.stop();
        tokio::time::sleep(Duration::from_millis(900)).await;
        nats.restart();
        tokio::time::timeout(ttl, renewed_after(&b, first))
            .await
            .expect("no renewal after the outage");
        assert!(
            !kept.is_lost(),
            "the lease was given up {:?} after its last renewal",
            renewed.elapsed()
        );
    });
}

/// A kept lease's NBD address changes at once when its holder asks (a mount ended while a
/// snapshot still holds the lease: other nodes must give no URI), and the renewals after keep
/// the new one; asked of a lease that was lost, it fails.
#[test]
fn a_kept_lease_advertises_what_its_holder_serves() {
    let nats = Nats::start_jetstream();
    run(async {
        let (a, b) = (leases(&nats).await, leases(&nats).await);
        let me = owner("a");
        let id = VolumeId::generate();
        let (revision, sent) = win(&a, &id, &me).await;
        let kept = a.keep(&id, &me, revision, sent);
        let seen = |l: Arc<Leases>| {
            let id = id.clone();
            async move {
                let (o, revision) = l.holder(&id).await.expect("holder").expect("held");
                (o.nbd_advertise, revision)
            }
        };
        assert_eq!(seen(b.clone()).await.0, "a:10809");
        kept.advertise("").await.expect("advertise none");
        let (uri, cleared_at) = seen(b.clone()).await;
        assert_eq!(uri, "", "an ended mount's URI stayed in the lease");
        // Renewals (every TTL/3) go on with it.
        let renewed = tokio::time::timeout(TTL, async {
            loop {
                let (uri, revision) = seen(b.clone()).await;
                if revision > cleared_at {
                    return uri;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("no renewal within the TTL");
        assert_eq!(renewed, "", "a renewal brought the old URI back");
        kept.advertise("a:10900").await.expect("advertise");
        assert_eq!(seen(b.clone()).await.0, "a:10900");
        assert!(!kept.is_lost());

        // Lost (another node wrote the key): asking fails.
        overwrite_lease(&nats, &id).await;
        assert!(kept.advertise("").await.is_err(), "a lost lease advertised");
        assert!(kept.is_lost());
    });
}

/// A hung owner, and a claim waiting out its lease with the takeover after it, hold up no
/// request for another volume (a node that dies hands all its volumes to the survivors at
/// once). While the owner a of two volumes is paused, a listing of every volume's space
/// through b answers within one describe timeout (not one per volume), leaving a's volumes
/// out; and a mount of another volume through b answers while b still waits for the lease of
/// one of a's volumes.
#[test]
fn a_takeover_holds_up_no_other_volume() {
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    // A longer lease time than the other tests': the margin the other volume's mount has.
    let a = cluster_daemon_ttl(&nats, &s3, "vblock-locks", "a", "6s");
    let b = cluster_daemon_ttl(&nats, &s3, "vblock-locks", "b", "6s");
    let (held, also_held) = (a.create_volume(1), a.create_volume(1));
    // Created through b: b has a copy of its map, and describes it.
    let other = node_request(&nats, "b", "createvolume", serde_json::json!({"Size": 1}));
    let other = other["VolumeId"].as_str().expect("VolumeId").to_owned();
    mount_via(&a, &held, "a");
    mount_via(&a, &also_held, "a");
    signal(a.pid(), "STOP");
    let asked = Instant::now();
    let all = node_request(&nats, "b", "describevolumespace", serde_json::json!({}));
    let listed: Vec<&str> = all["VolumeSpaces"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s["VolumeId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, [other.as_str()], "{all}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "a listing waited {:?} for a paused owner",
        asked.elapsed()
    );
    let (other_done, held_done) = std::thread::scope(|s| {
        let taking = s.spawn(|| {
            let uri = mount_via(&b, &held, "b");
            assert!(uri.contains(&format!(":{}/", b.nbd_port)), "{uri}");
            Instant::now()
        });
        b.wait_for_log("watching a held lease", Duration::from_secs(30));
        let uri = mount_via(&b, &other, "b");
        assert!(uri.contains(&format!(":{}/", b.nbd_port)), "{uri}");
        let other_done = Instant::now();
        (other_done, taking.join().expect("the takeover's mount"))
    });
    signal(a.pid(), "CONT");
    assert!(
        other_done < held_done,
        "a mount of another volume waited for the takeover"
    );
}

/// The NATS server's store is lost (one KV replica): the daemon, started again, finds the
/// catalog empty and fills it from the bucket's record copies; the volume and its snapshot
/// are described as before, and the volume mounts (a fresh lease, a takeover) with its data.
#[test]
fn a_lost_catalog_is_filled_from_the_bucket() {
    use serde_json::json;
    let (mut nats, _s3, mut a, id) = one_node_with_data("vblock-lost-kv", "write -P 0x4d 0 128k");
    let snap = node_request(&nats, "a", "createsnapshot", json!({"VolumeId": id}));
    let snap = snap["SnapshotId"].as_str().expect("SnapshotId").to_owned();
    let state = |nats: &Nats| {
        node_request(
            nats,
            "a",
            "describesnapshots",
            json!({"SnapshotIds": [snap]}),
        )["Snapshots"][0]["State"]
            .clone()
    };
    assert!(
        common::daemon::wait_until(Duration::from_secs(30), || state(&nats) == "completed"),
        "the snapshot did not complete"
    );
    a.kill9();
    nats.restart_empty();
    a.start_again();
    a.wait_for_log(
        "filling the catalog from the bucket's record copies",
        Duration::from_secs(30),
    );
    let d = node_request(&nats, "a", "describevolumes", json!({"VolumeIds": [id]}));
    assert_eq!(d["Volumes"][0]["State"], "available", "{d}");
    assert_eq!(state(&nats), "completed");
    let uri = mount_via(&a, &id, "a");
    let out = common::daemon::qemu_io_read_only(&uri, &["read -P 0x4d 0 128k"]);
    assert!(
        !out.contains("failed"),
        "after the catalog was filled: {out}"
    );
}

/// The cluster test daemons' `--abandon-after` (default 10 min).
const ABANDON_AFTER: &str = "3s";

/// `vblock serve --cluster` flags for node `node` on bucket `bucket` of `s3`, lease time `ttl`.
fn cluster_args(s3: &common::s3::S3Server, bucket: &str, node: &str, ttl: &str) -> Vec<String> {
    let mut args = s3.serve_args(bucket);
    args.extend(
        [
            "--cluster",
            "--node",
            node,
            "--lease-ttl",
            ttl,
            "--abandon-after",
            ABANDON_AFTER,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

fn cluster_daemon(
    nats: &Nats,
    s3: &common::s3::S3Server,
    bucket: &str,
    node: &str,
) -> common::daemon::Daemon {
    cluster_daemon_ttl(nats, s3, bucket, node, "2s")
}

/// [`cluster_daemon`] with `--lease-ttl ttl`.
fn cluster_daemon_ttl(
    nats: &Nats,
    s3: &common::s3::S3Server,
    bucket: &str,
    node: &str,
    ttl: &str,
) -> common::daemon::Daemon {
    let args = cluster_args(s3, bucket, node, ttl);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::daemon::Daemon::start_with_env(&nats.url(), &args, &common::s3::S3Server::env())
}

/// NATS with JetStream, s3s-fs, and cluster node `a` on bucket `bucket` with a new 1 GiB
/// volume mounted through it, written by qemu-io command `write` and flushed.
fn one_node_with_data(
    bucket: &str,
    write: &str,
) -> (Nats, common::s3::S3Server, common::daemon::Daemon, String) {
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let a = cluster_daemon(&nats, &s3, bucket, "a");
    let id = a.create_volume(1);
    let uri = mount_via(&a, &id, "a");
    common::daemon::qemu_io(&uri, &[write, "flush"]);
    (nats, s3, a, id)
}

/// `vblock mount ID --node NODE` through `d`'s NATS; the URI.
fn mount_via(d: &common::daemon::Daemon, id: &str, node: &str) -> String {
    d.cli(&["mount", id, "--node", node, "--timeout", "30"])
        .trim()
        .to_owned()
}

/// Failover (issue tests 2 and 4 in small, with real daemons): two daemons in cluster mode on
/// one s3s-fs bucket. A mount through node a makes a the owner; a mount through b while a is
/// alive returns a's URI. After a is killed (-9) and its lease time has passed, a mount through
/// b makes b the owner (a takeover: epoch, fence, rebuild from the bucket), and b serves every
/// write a flushed. An unmount or a detach through a node that does not own the volume is
/// forwarded to the owner, which ends its mount and releases the lease at once.
#[test]
fn a_mount_fails_over_to_a_surviving_node() {
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let mut a = cluster_daemon(&nats, &s3, "vblock-cluster", "a");
    let mut b = cluster_daemon(&nats, &s3, "vblock-cluster", "b");
    let id = a.create_volume(1);

    let uri_a = mount_via(&a, &id, "a");
    assert!(
        uri_a.contains(&format!(":{}/", a.nbd_port)),
        "a mount through a is served by a: {uri_a}"
    );
    common::daemon::qemu_io(
        &uri_a,
        &["write -P 0xa1 0 1M", "write -P 0xb2 4M 64k", "flush"],
    );
    assert_eq!(
        mount_via(&b, &id, "b"),
        uri_a,
        "a mount through b while a is alive answers a's URI"
    );

    // Flushed just before the kill: in a's WAL and shipped objects only (the flusher turns an
    // idle buffer into chunks after 2 s).
    common::daemon::qemu_io(&uri_a, &["write -P 0xd4 12M 256k", "flush"]);
    a.kill9();
    let started = Instant::now();
    let uri_b = mount_via(&b, &id, "b");
    let failover = started.elapsed();
    assert!(
        uri_b.contains(&format!(":{}/", b.nbd_port)),
        "after a died, b owns the volume: {uri_b}"
    );
    assert!(
        failover >= TTL,
        "b took the volume over before a's lease time passed ({failover:?})"
    );
    println!("failover: kill -9 to a mount through b in {failover:?}");
    let out = common::daemon::qemu_io_read_only(
        &uri_b,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xb2 4M 64k",
            "read -P 0 1M 3M",
            "read -P 0xd4 12M 256k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    common::daemon::qemu_io(&uri_b, &["write -P 0xc3 8M 4k", "flush"]);

    // An unmount through a node that does not own the volume goes to the owner, b, which ends
    // its mount and releases the lease: a owns the volume again at once (well within the lease
    // time), and mounts through b now answer a's URI.
    // (An unmount that names a node, ebs.a.unmount, still ends only a mount through a.)
    a.start_again();
    node_request(&nats, "a", "describevolumes", serde_json::json!({}));
    let refused = a.cli_refused(&["unmount", &id, "--node", "a", "--timeout", "10"]);
    assert!(refused.contains("mounted on node \"b\""), "{refused}");
    let r = node_request(&nats, "a", "unmount", serde_json::json!({ "Name": id }));
    assert_eq!(r["Error"], "", "an unmount through a, sent on to b: {r}");
    assert_eq!(r["Mounted"], false, "{r}");
    let started = Instant::now();
    let again = mount_via(&a, &id, "a");
    assert!(
        started.elapsed() < TTL,
        "the released lease was waited out: {:?}",
        started.elapsed()
    );
    assert!(again.contains(&format!(":{}/", a.nbd_port)), "{again}");
    assert_eq!(mount_via(&b, &id, "b"), again, "b answers a's current URI");
    let out = common::daemon::qemu_io_read_only(
        &again,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xb2 4M 64k",
            "read -P 0xc3 8M 4k",
            "read -P 0xd4 12M 256k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // A detach of the mount through b goes to the owner, a: its mount ends and the lease is
    // released, so b owns the volume at once.
    detach_via(&nats, "b", &id);
    let started = Instant::now();
    let on_b = mount_via(&b, &id, "b");
    assert!(on_b.contains(&format!(":{}/", b.nbd_port)), "{on_b}");
    assert!(
        started.elapsed() < TTL,
        "the detached volume's lease was waited out: {:?}",
        started.elapsed()
    );

    // The owner dies with the volume mounted: an unmount through a survivor takes the volume
    // over once the lease time has passed and ends the mount there, releasing the lease.
    b.kill9();
    // A listing of every volume's space leaves out the one whose owner does not answer.
    let all = node_request(&nats, "a", "describevolumespace", serde_json::json!({}));
    assert!(all["VolumeSpaces"].is_array(), "{all}");
    let started = Instant::now();
    let r = node_request(&nats, "a", "unmount", serde_json::json!({ "Name": id }));
    assert_eq!(r["Error"], "", "an unmount of a dead owner's mount: {r}");
    assert!(started.elapsed() >= TTL, "{:?}", started.elapsed());
    let started = Instant::now();
    let again = mount_via(&a, &id, "a");
    assert!(started.elapsed() < TTL, "{:?}", started.elapsed());
    let out = common::daemon::qemu_io_read_only(&again, &["read -P 0xa1 0 1M"]);
    assert!(!out.contains("failed"), "{out}");
    // The same for a detach.
    b.start_again();
    a.kill9();
    let started = Instant::now();
    detach_via(&nats, "b", &id);
    assert!(started.elapsed() >= TTL, "{:?}", started.elapsed());
    let started = Instant::now();
    let on_b = mount_via(&b, &id, "b");
    assert!(on_b.contains(&format!(":{}/", b.nbd_port)), "{on_b}");
    assert!(started.elapsed() < TTL, "{:?}", started.elapsed());
}

/// Sends `sig` (`STOP`, `CONT`) to process `pid`.
/// Detaches volume `id`'s mount through node `node` (`vblock.NODE.detachvolume`); requires
/// `detached`.
fn detach_via(nats: &Nats, node: &str, id: &str) {
    let r = node_request(
        nats,
        node,
        "detachvolume",
        serde_json::json!({ "VolumeId": id }),
    );
    assert_eq!(r["State"], "detached", "a detach through {node}: {r}");
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// The zombie (issue test 3): the owner a is paused (SIGSTOP) with a client connected; b takes
/// the volume over after the lease time, writes and flushes; a resumes (SIGCONT): a read the
/// client sent while a was paused is refused (it would be stale), the client's write+flush
/// through a fails, b's data is intact, and a daemon recovering the bucket on an empty data
/// directory sees b's writes and none of a's late ones.
#[test]
fn a_paused_owner_resumes_fenced() {
    use std::io::{Seek, SeekFrom, Write};
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let a = cluster_daemon(&nats, &s3, "vblock-zombie", "a");
    let mut b = cluster_daemon(&nats, &s3, "vblock-zombie", "b");
    let id = a.create_volume(1);
    let uri_a = mount_via(&a, &id, "a");
    common::daemon::qemu_io(&uri_a, &["write -P 0xa1 0 1M", "flush"]);
    let export = uri_a.rsplit('/').next().expect("export").to_owned();
    let mut client = common::daemon::nbd_client(a.nbd_port, &export, Duration::from_secs(30));
    let (_reader, mut read_socket) =
        common::daemon::nbd_client_and_socket(a.nbd_port, &export, Duration::from_secs(30));

    signal(a.pid(), "STOP");
    let uri_b = mount_via(&b, &id, "b");
    assert!(uri_b.contains(&format!(":{}/", b.nbd_port)), "{uri_b}");
    common::daemon::qemu_io(&uri_b, &["write -P 0xc3 8M 64k", "flush"]);

    // NBD_CMD_READ of b's new data, queued in a's socket before a runs again: a must not
    // answer it from its stale copy (the NBD proto.md request and simple reply layouts).
    let mut request = Vec::with_capacity(28);
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes()); // flags
    request.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    request.extend_from_slice(&7u64.to_be_bytes()); // handle
    request.extend_from_slice(&(8u64 << 20).to_be_bytes());
    request.extend_from_slice(&65536u32.to_be_bytes());
    read_socket.write_all(&request).expect("send the read");
    signal(a.pid(), "CONT");
    let mut reply = [0u8; 16];
    match std::io::Read::read_exact(&mut read_socket, &mut reply) {
        // The connection closed: refused as well.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("the read's reply: {e}"),
        Ok(()) => {
            assert_eq!(
                reply[..4],
                0x6744_6698u32.to_be_bytes(),
                "simple reply magic"
            );
            let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
            assert_eq!(
                error, 108,
                "the resumed old owner answered a read (error {error}); NBD_ESHUTDOWN expected"
            );
        }
    }
    let late = client
        .seek(SeekFrom::Start(0))
        .and_then(|_| client.write_all(&[0xee; 65536]))
        .and_then(|()| client.flush());
    assert!(late.is_err(), "the resumed old owner acknowledged a flush");
    // The new owner counts its takeover and keeps the lease; the old one counts what told it
    // (the lease taken, or a conditional PUT refused), each refusal as it logged it.
    let b_metrics = common::metrics::scrape(b.metrics_port);
    assert_eq!(
        common::metrics::value(&b_metrics, "vblock_takeovers_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        common::metrics::value(&b_metrics, "vblock_leases_kept", &[]),
        1.0
    );
    let mut told = (0.0, 0.0);
    let noticed = common::daemon::wait_until(Duration::from_secs(10), || {
        let m = common::metrics::scrape(a.metrics_port);
        told = (
            common::metrics::value(&m, "vblock_leases_lost_total", &[]),
            common::metrics::value(&m, "vblock_fence_refusals_total", &[]),
        );
        told.0 >= 1.0
    });
    assert!(
        noticed,
        "the old owner's lease loss was not counted: {told:?}"
    );
    assert_eq!(
        told.1,
        a.log().matches("is another writer's").count() as f64,
        "fence refusals counted as logged"
    );
    let out =
        common::daemon::qemu_io_read_only(&uri_b, &["read -P 0xa1 0 1M", "read -P 0xc3 8M 64k"]);
    assert!(!out.contains("failed"), "{out}");

    // The bucket alone: b's writes, none of a's late ones.
    b.stop();
    drop(a);
    let mut args = s3.serve_args("vblock-zombie");
    args.push("--nbd-open-exports".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c =
        common::daemon::Daemon::start_with_env(&nats.url(), &args, &common::s3::S3Server::env());
    c.wait_for_log(
        "recovered volumes from the backend",
        Duration::from_secs(30),
    );
    let out = common::daemon::qemu_io_read_only(
        &c.uri(&id),
        &["read -P 0xa1 0 1M", "read -P 0xc3 8M 64k"],
    );
    assert!(!out.contains("failed"), "{out}");
}

/// A restarted owner serves no volume before its control plane knows which leases it keeps:
/// with NATS down, a client reconnecting to its old export is refused (the volume does not
/// open without a lease: another node may own it by now, and the open would also clean up
/// chunk ids a taker may use); once NATS is back, a mount claims the lease and serves the
/// flushed data.
#[test]
fn a_restarted_node_serves_nothing_before_it_knows_its_leases() {
    let (mut nats, _s3, mut a, id) = one_node_with_data("vblock-restart", "write -P 0x7e 0 64k");
    let uri = mount_via(&a, &id, "a");
    a.kill9();
    nats.stop();
    a.start_again();
    let out = common::daemon::qemu_io_output(&uri, &["read -P 0x7e 0 64k"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || said.contains("failed"),
        "the restarted node served its old export without a lease: {said}"
    );
    assert!(
        said.contains("no lease kept here"),
        "the open was not refused for want of a lease: {said}"
    );
    nats.restart();
    // Asked until a's control plane has subscribed again (bounded); mounting again answers
    // the same URI.
    let r = node_request(&nats, "a", "mount", serde_json::json!({ "Name": id }));
    assert_eq!(r["Error"], "", "{r}");
    let again = mount_via(&a, &id, "a");
    let out = common::daemon::qemu_io_read_only(&again, &["read -P 0x7e 0 64k"]);
    assert!(!out.contains("failed"), "{out}");
}

/// 4 KiB block `b` at generation `g`: both numbers, then a fill depending on both.
fn gen_block(b: u64, g: u64) -> Vec<u8> {
    let mut v = vec![((b * 31 + g) % 251) as u8 | 1; 4096];
    v[0..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&g.to_le_bytes());
    v
}

/// The random seed of test `what`: `VBLOCK_TEST_SEED` when set (to replay a run), else a new
/// one; printed either way.
fn test_seed(what: &str) -> u64 {
    let seed = std::env::var("VBLOCK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{what} seed {seed} (VBLOCK_TEST_SEED={seed} replays it)");
    seed
}

/// Per-block generations written through NBD to a volume of [`Generations::BLOCKS`] blocks
/// while its owner is killed: what each block may read back afterwards.
struct Generations {
    /// Per block: the newest generation sent (a write the kill cut short may have landed).
    written: Vec<u64>,
    /// Per block: the newest generation a flush acknowledged.
    flushed: Vec<u64>,
    /// The writes sent since the last read-back, in order: (block, generation).
    sent: Vec<(u64, u64)>,
    generation: u64,
    rng: rand::rngs::StdRng,
}

impl Generations {
    const BLOCKS: u64 = 64;

    fn new(seed: u64) -> Self {
        Self {
            written: vec![0; Self::BLOCKS as usize],
            flushed: vec![0; Self::BLOCKS as usize],
            sent: Vec::new(),
            generation: 0,
            rng: rand::SeedableRng::seed_from_u64(seed),
        }
    }

    /// Writes random blocks (a flush after about one in five) through export `uri` of
    /// daemon `d` until a request fails, while another thread kills `d` (-9) `kill_in`
    /// milliseconds in (drawn from the range): the kill lands inside a write or a flush (a
    /// WAL append, a shipped-WAL PUT). Without `kill_in`, `d` dies by itself (an armed crash
    /// point). Returns the writes and flushes acknowledged, and when the kill was sent (or the
    /// request failed).
    fn write_until_killed(
        &mut self,
        d: &common::daemon::Daemon,
        uri: &str,
        kill_in: Option<std::ops::Range<u64>>,
    ) -> (u64, u64, Instant) {
        use std::io::{Seek, SeekFrom, Write};
        let export = uri.rsplit('/').next().expect("export");
        let mut c = common::daemon::nbd_client(d.nbd_port, export, Duration::from_secs(30));
        let killer = kill_in.map(|range| {
            let (pid, after) = (
                d.pid(),
                Duration::from_millis(rand::Rng::gen_range(&mut self.rng, range)),
            );
            std::thread::spawn(move || {
                std::thread::sleep(after);
                signal(pid, "KILL");
                Instant::now()
            })
        });
        let (mut writes, mut flushes, mut pending) = (0, 0, Vec::new());
        let give_up = Instant::now() + TTL * 10;
        while Instant::now() < give_up {
            let b = rand::Rng::gen_range(&mut self.rng, 0..Self::BLOCKS);
            self.generation += 1;
            let g = self.generation;
            self.written[b as usize] = g;
            self.sent.push((b, g));
            let sent = c
                .seek(SeekFrom::Start(b * 4096))
                .and_then(|_| c.write_all(&gen_block(b, g)));
            if sent.is_err() {
                break;
            }
            writes += 1;
            pending.push((b, g));
            if rand::Rng::gen_bool(&mut self.rng, 0.2) {
                if c.flush().is_err() {
                    break;
                }
                flushes += 1;
                for (b, g) in pending.drain(..) {
                    self.flushed[b as usize] = self.flushed[b as usize].max(g);
                }
            }
        }
        let killed = match killer {
            Some(k) => k.join().expect("the killer thread"),
            None => Instant::now(),
        };
        assert!(
            Instant::now() < give_up,
            "the client went on after the kill"
        );
        (writes, flushes, killed)
    }

    /// Reads the whole volume through export `uri` of daemon `d` and checks it (`what` names
    /// the round): every block holds a generation written to it, at or after the newest one a
    /// flush acknowledged, or zeros if none was; and the volume holds a prefix of the writes
    /// sent since the last read-back (every write up to the newest one it holds, and none
    /// after). What it holds is the volume's history from here on.
    fn read_back(&mut self, d: &common::daemon::Daemon, uri: &str, what: &str) {
        use std::io::{Read, Seek, SeekFrom};
        let export = uri.rsplit('/').next().expect("export");
        let mut c = common::daemon::nbd_client(d.nbd_port, export, Duration::from_secs(30));
        let mut image = vec![0u8; (Self::BLOCKS * 4096) as usize];
        c.seek(SeekFrom::Start(0)).expect("seek");
        c.read_exact(&mut image)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        for b in 0..Self::BLOCKS {
            let blk = &image[(b * 4096) as usize..((b + 1) * 4096) as usize];
            let g = if blk.iter().all(|x| *x == 0) {
                0
            } else {
                u64::from_le_bytes(blk[8..16].try_into().expect("8 bytes"))
            };
            assert!(
                g == 0 || blk == gen_block(b, g).as_slice(),
                "{what}: block {b} holds data never written to it"
            );
            let (flushed, written) = (self.flushed[b as usize], self.written[b as usize]);
            assert!(
                g >= flushed && g <= written,
                "{what}: block {b} reads generation {g}; flushed {flushed}, written {written}"
            );
        }
        let held = |b: u64| {
            let blk = &image[(b * 4096) as usize..(b * 4096 + 16) as usize];
            u64::from_le_bytes(blk[8..16].try_into().expect("8 bytes"))
        };
        // The newest write it holds: every write sent before it is there too (or overwritten
        // by a later one it holds).
        let cut = (0..Self::BLOCKS).map(held).max().unwrap_or(0);
        for &(b, g) in self.sent.iter().filter(|(_, g)| *g <= cut) {
            assert!(
                held(b) >= g,
                "{what}: not a prefix: block {b} lost generation {g} (holds {}), though generation {cut} is there",
                held(b)
            );
        }
        for b in 0..Self::BLOCKS {
            self.written[b as usize] = held(b);
            self.flushed[b as usize] = held(b);
        }
        self.sent.clear();
    }
}

/// Issue test 2: the owner is killed (-9) under a write+flush workload with per-block
/// generations, at a random moment while the client writes and flushes (so inside a request,
/// a WAL append or a shipped-WAL PUT), round after round, the two nodes taking turns. After
/// each kill a mount through the survivor serves the volume; every flush-acknowledged
/// generation reads back (or a later one), and no block holds data never written to it. Prints
/// the failover time (kill to the first successful read) p50/p99. Rounds:
/// `VBLOCK_FAILOVER_ROUNDS` (default 4; docs/BENCHMARKS.md, "Failover", runs 20).
#[test]
fn owners_killed_under_writes_lose_no_flushed_write() {
    let rounds: usize = std::env::var("VBLOCK_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed = test_seed("failover test");
    println!("{rounds} rounds");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let mut nodes = [
        cluster_daemon(&nats, &s3, "vblock-failover", "a"),
        cluster_daemon(&nats, &s3, "vblock-failover", "b"),
    ];
    let id = nodes[0].create_volume(1);
    let mut volume = Generations::new(seed);
    let (mut failovers, mut flushed) = (Vec::new(), 0);
    for round in 0..rounds {
        let (owner, survivor) = (round % 2, 1 - round % 2);
        let uri = mount_via(&nodes[owner], &id, ["a", "b"][owner]);
        assert!(
            uri.contains(&format!(":{}/", nodes[owner].nbd_port)),
            "round {round}: {uri}"
        );
        let (writes, flushes, killed) =
            volume.write_until_killed(&nodes[owner], &uri, Some(20..600));
        flushed += flushes;
        nodes[owner].kill9();
        let uri = mount_via(&nodes[survivor], &id, ["a", "b"][survivor]);
        let mounted = killed.elapsed();
        volume.read_back(&nodes[survivor], &uri, &format!("round {round}"));
        failovers.push(killed.elapsed());
        println!(
            "round {round}: {writes} writes, failover {:?} (mount answered after {mounted:?})",
            killed.elapsed()
        );
        nodes[owner].start_again();
    }
    assert!(flushed > 0, "no round acknowledged a flush before its kill");
    failovers.sort();
    let pct = |p: f64| failovers[((failovers.len() - 1) as f64 * p).round() as usize];
    println!(
        "failover (kill -9 to the first read through the survivor, lease TTL {TTL:?}): p50 {:?}, p99 {:?}, over {} rounds",
        pct(0.5),
        pct(0.99),
        failovers.len()
    );
}

/// Issue test 5, inside WAL shipping: the owner dies at a crash point of its shipped-WAL PUT
/// (`ship-before-put`: the object not yet stored, the local WAL's sync running beside it;
/// `ship-after-put`: the object stored, its flushes not yet answered), after a few flushes
/// went through, and the other node takes the volume over: every flushed generation reads
/// back, as a prefix of the writes. The two nodes take turns.
#[test]
fn owners_crashed_inside_wal_shipping_lose_no_flushed_write() {
    let seed = test_seed("shipping crash test");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let bucket = "vblock-ship-crash";
    let mut nodes = [
        cluster_daemon(&nats, &s3, bucket, "a"),
        cluster_daemon(&nats, &s3, bucket, "b"),
    ];
    let id = nodes[0].create_volume(1);
    let mut volume = Generations::new(seed);
    for (round, point) in ["ship-before-put", "ship-after-put"]
        .into_iter()
        .enumerate()
    {
        let (owner, next) = (round % 2, 1 - round % 2);
        let names = ["a", "b"];
        let spec = format!("{point}=4*off->return");
        let mut envs = common::s3::S3Server::env().to_vec();
        envs.push(("VBLOCK_FAILPOINTS", &spec));
        nodes[owner].kill9();
        nodes[owner].set_envs(&envs);
        nodes[owner].start_again();
        let uri = mount_via(&nodes[owner], &id, names[owner]);
        let (writes, flushes, _) = volume.write_until_killed(&nodes[owner], &uri, None);
        let died =
            common::daemon::wait_until(Duration::from_secs(30), || nodes[owner].exited().is_some());
        assert!(
            died && nodes[owner]
                .log()
                .contains(&format!("fail point {point}: aborting")),
            "round {round}: the owner did not die at {point}"
        );
        assert!(flushes > 0, "round {round}: no flush went through first");
        println!("round {round} ({point}): {writes} writes, {flushes} flushes");
        let uri = mount_via(&nodes[next], &id, names[next]);
        volume.read_back(&nodes[next], &uri, &format!("round {round} ({point})"));
        nodes[owner].kill9();
        nodes[owner].set_envs(&common::s3::S3Server::env());
        nodes[owner].start_again();
    }
}

/// Issue test 6 with `--cluster` daemons: every node's local disk is lost. The owner of a
/// volume is killed (-9) inside its write+flush stream, and so is the other node; neither
/// comes back. A new node on an empty data directory, with only the bucket and the catalog,
/// serves the volume on its first mount: every flush-acknowledged generation, as a prefix of
/// the writes. A second volume, unmounted before the loss, reads back whole.
#[test]
fn every_local_disk_lost_loses_no_flushed_write() {
    let seed = test_seed("disk loss test");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let mut a = cluster_daemon(&nats, &s3, "vblock-disks", "a");
    let mut b = cluster_daemon(&nats, &s3, "vblock-disks", "b");
    let quiet = b.create_volume(1);
    let uri = mount_via(&b, &quiet, "b");
    common::daemon::qemu_io(&uri, &["write -P 0x3c 0 256k", "flush"]);
    b.cli(&["unmount", &quiet, "--node", "b"]);

    let id = a.create_volume(1);
    let mut volume = Generations::new(seed);
    let uri = mount_via(&a, &id, "a");
    let (writes, flushes, _) = volume.write_until_killed(&a, &uri, Some(300..800));
    a.kill9();
    b.kill9();
    println!("{writes} writes and {flushes} flushes acknowledged before the kill");
    assert!(flushes > 0, "no flush was acknowledged before the kill");

    let c = cluster_daemon(&nats, &s3, "vblock-disks", "c");
    let uri = mount_via(&c, &id, "c");
    volume.read_back(&c, &uri, "after every disk was lost");
    let uri = mount_via(&c, &quiet, "c");
    let out =
        common::daemon::qemu_io_read_only(&uri, &["read -P 0x3c 0 256k", "read -P 0 256k 256k"]);
    assert!(!out.contains("failed"), "the unmounted volume: {out}");
}

/// Sends `body` to node `node`'s copy of operation `op` (`vblock.NODE.OP`, cluster mode) and
/// returns the JSON reply; asks again while the node has not subscribed yet (bounded).
fn node_request(nats: &Nats, node: &str, op: &str, body: serde_json::Value) -> serde_json::Value {
    let subject = format!("vblock.{node}.{op}");
    let url = nats.url();
    let mut reply = serde_json::Value::Null;
    common::run(Duration::from_secs(120), async {
        let client = async_nats::connect(url).await.expect("connect");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let request = async_nats::Request::new()
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(60)));
            match client.send_request(subject.clone(), request).await {
                Ok(msg) => {
                    reply = serde_json::from_slice(&msg.payload)
                        .unwrap_or_else(|e| panic!("{subject}: the reply is not JSON: {e}"));
                    return;
                }
                Err(e)
                    if e.kind() == async_nats::client::RequestErrorKind::NoResponders
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{subject}: {e}"),
            }
        }
    });
    reply
}

/// Rewrites catalog record `key` (KV bucket `vblock-catalog`) behind the daemons' backs, as a
/// node that died mid-request leaves it: `edit` changes its JSON, stored under `to` (another
/// key makes a new record from it; `""` deletes `key` instead).
fn edit_catalog(nats: &Nats, key: &str, to: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let url = nats.url();
    common::run(Duration::from_secs(30), async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("nats"));
        let kv = js.get_key_value("vblock-catalog").await.expect("catalog");
        if to.is_empty() {
            kv.delete(key).await.expect("delete");
            return;
        }
        let entry = kv.entry(key).await.expect("get").expect("the record");
        let mut rec: serde_json::Value = serde_json::from_slice(&entry.value).expect("json");
        edit(&mut rec);
        kv.put(to, serde_json::to_vec(&rec).expect("json").into())
            .await
            .expect("put");
    });
}

/// The EC2 error code of `reply` (panics when it is not an error).
/// A new volume left `creating` as by a node that failed mid-clone: a copy of catalog record
/// `volume.TEMPLATE` under a new VolumeId, unmounted, changed further by `also`. Returns its id.
fn stuck_clone(nats: &Nats, template: &str, also: impl FnOnce(&mut serde_json::Value)) -> String {
    let stuck = vblock::VolumeId::generate().to_string();
    edit_catalog(
        nats,
        &format!("volume.{template}"),
        &format!("volume.{stuck}"),
        |r| {
            r["volume_id"] = stuck.clone().into();
            r["state"] = "creating".into();
            r["mount"] = serde_json::Value::Null;
            also(r);
        },
    );
    stuck
}

/// Deletes volume `id` through node a once a has seen it `creating` unchanged for
/// `--abandon-after` (asked again until then, bounded).
fn delete_once_abandoned(nats: &Nats, id: &str) {
    assert!(
        common::daemon::wait_until(Duration::from_secs(60), || {
            node_request(
                nats,
                "a",
                "deletevolume",
                serde_json::json!({"VolumeId": id}),
            )["Return"]
                == true
        }),
        "an abandoned clone is never deleted"
    );
}

fn error_code(reply: &serde_json::Value) -> &str {
    reply["Error"]["Code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

/// One catalog (issue test 1): three daemons in cluster mode on one bucket, each request
/// addressed to one node. A volume created through a is described through b and c; a snapshot
/// through c of the volume a serves (forwarded to a) completes; a clone of it created and
/// mounted through b reads the snapshot's data, not the writes after it. The snapshot is
/// deleted through a while the catalog has lost the clone's record (its pin in the bucket
/// keeps the snapshot's map), then the source volume through c, which has no copy of the
/// snapshot or the clone: its garbage collection spares the chunks the clone shares only
/// because the snapshot's map stays in the bucket while a clone pins it. The clone still reads its
/// data, also once it moved to c (a takeover from the bucket, reading every chunk afresh).
#[test]
fn one_catalog_serves_every_node() {
    use serde_json::json;
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let a = cluster_daemon(&nats, &s3, "vblock-catalog", "a");
    let b = cluster_daemon(&nats, &s3, "vblock-catalog", "b");
    let mut c = cluster_daemon(&nats, &s3, "vblock-catalog", "c");

    let created = node_request(
        &nats,
        "a",
        "createvolume",
        json!({"Size": 1, "ClientToken": "source-1"}),
    );
    let id = created["VolumeId"]
        .as_str()
        .unwrap_or_else(|| panic!("createvolume: {created}"))
        .to_owned();
    for node in ["b", "c"] {
        let d = node_request(&nats, node, "describevolumes", json!({"VolumeIds": [id]}));
        assert_eq!(
            d["Volumes"][0]["VolumeId"],
            id.as_str(),
            "through {node}: {d}"
        );
        assert_eq!(d["Volumes"][0]["Size"], 1, "through {node}: {d}");
        assert_eq!(d["Volumes"][0]["State"], "available", "through {node}: {d}");
    }
    let again = node_request(
        &nats,
        "b",
        "createvolume",
        json!({"Size": 1, "ClientToken": "source-1"}),
    );
    assert_eq!(
        again["VolumeId"],
        id.as_str(),
        "a ClientToken is idempotent across nodes: {again}"
    );

    let uri = mount_via(&a, &id, "a");
    common::daemon::qemu_io(
        &uri,
        &["write -P 0x5a 0 1M", "write -P 0x6b 2M 64k", "flush"],
    );
    let d = node_request(&nats, "c", "describevolumes", json!({"VolumeIds": [id]}));
    assert_eq!(d["Volumes"][0]["State"], "in-use", "{d}");
    // Its space through c and b, which never held it: described by the owner a, from its map
    // (the writes counted once they are in chunks), by id and in a listing.
    let mut space = serde_json::Value::Null;
    let described = common::daemon::wait_until(Duration::from_secs(30), || {
        space = node_request(
            &nats,
            "c",
            "describevolumespace",
            json!({"VolumeIds": [id]}),
        );
        space["VolumeSpaces"][0]["AllocatedBytes"] == (1 << 20) + (64 << 10)
    });
    assert!(described, "describevolumespace through c: {space}");
    let all = node_request(&nats, "b", "describevolumespace", json!({}));
    let listed = all["VolumeSpaces"]
        .as_array()
        .is_some_and(|v| v.iter().any(|s| s["VolumeId"] == id.as_str()));
    assert!(
        listed,
        "describevolumespace of every volume through b: {all}"
    );

    // Through c, which does not own the volume: taken by the owner a, from its newest map.
    let snap = node_request(
        &nats,
        "c",
        "createsnapshot",
        json!({"VolumeId": id, "Description": "through b"}),
    );
    let snap_id = snap["SnapshotId"]
        .as_str()
        .unwrap_or_else(|| panic!("createsnapshot: {snap}"))
        .to_owned();
    common::daemon::qemu_io(&uri, &["write -P 0x7c 0 64k", "flush"]);
    let completed = common::daemon::wait_until(Duration::from_secs(30), || {
        let d = node_request(
            &nats,
            "b",
            "describesnapshots",
            json!({"SnapshotIds": [snap_id]}),
        );
        d["Snapshots"][0]["State"] == "completed"
    });
    assert!(completed, "the snapshot did not complete in the catalog");
    // A catalog record left pending (its node died after storing the snapshot, before the
    // catalog write) is settled from the bucket's record copy when read.
    let key = format!("snapshot.{snap_id}");
    edit_catalog(&nats, &key, &key, |r| r["state"] = "pending".into());
    let d = node_request(
        &nats,
        "a",
        "describesnapshots",
        json!({"SnapshotIds": [snap_id]}),
    );
    assert_eq!(d["Snapshots"][0]["State"], "completed", "{d}");
    let d = node_request(&nats, "b", "describesnapshots", json!({}));
    assert_eq!(d["Snapshots"][0]["State"], "completed", "{d}");
    // A record whose node died after writing it to the catalog and before taking the
    // snapshot (no copy in the bucket): pending, then `error` once the node asked has seen it
    // so for --abandon-after, and deletable.
    let never = vblock::SnapshotId::generate().to_string();
    edit_catalog(&nats, &key, &format!("snapshot.{never}"), |r| {
        r["snapshot_id"] = never.clone().into();
        r["state"] = "pending".into();
    });
    let describe = || {
        node_request(
            &nats,
            "a",
            "describesnapshots",
            json!({"SnapshotIds": [never]}),
        )["Snapshots"][0]["State"]
            .clone()
    };
    assert_eq!(describe(), "pending");
    assert!(
        common::daemon::wait_until(Duration::from_secs(60), || describe() == "error"),
        "a snapshot never taken stays pending"
    );
    let deleted = node_request(&nats, "c", "deletesnapshot", json!({"SnapshotId": never}));
    assert_eq!(deleted["Return"], true, "{deleted}");

    let clone = node_request(&nats, "b", "createvolume", json!({"SnapshotId": snap_id}));
    let clone_id = clone["VolumeId"]
        .as_str()
        .unwrap_or_else(|| panic!("createvolume from a snapshot: {clone}"))
        .to_owned();
    let clone_uri = mount_via(&b, &clone_id, "b");
    let snapshot_data = [
        "read -P 0x5a 0 1M",
        "read -P 0x6b 2M 64k",
        "read -P 0 1M 1M",
    ];
    let out = common::daemon::qemu_io_read_only(&clone_uri, &snapshot_data);
    assert!(!out.contains("failed"), "the clone through b: {out}");

    // A snapshot is exported through one node at a time, and not deleted while exported.
    let snap_uri = mount_via(&c, &snap_id, "c");
    let out = common::daemon::qemu_io_read_only(&snap_uri, &["read -P 0x5a 0 1M"]);
    assert!(!out.contains("failed"), "the snapshot through c: {out}");
    let refused = a.cli_refused(&["mount", &snap_id, "--node", "a", "--timeout", "10"]);
    assert!(refused.contains("mounted through node c"), "{refused}");
    let refused = node_request(&nats, "a", "deletesnapshot", json!({"SnapshotId": snap_id}));
    assert_eq!(error_code(&refused), "VolumeInUse", "{refused}");
    // An unmount through any node ends the export (forwarded to c when another answers).
    a.cli(&["unmount", &snap_id]);
    let snap_uri = mount_via(&a, &snap_id, "a");
    let out = common::daemon::qemu_io_read_only(&snap_uri, &["read -P 0x5a 0 1M"]);
    assert!(!out.contains("failed"), "the snapshot through a: {out}");
    a.cli(&["unmount", &snap_id, "--node", "a"]);
    // A node that is alive but did not answer when another removed its mount from the catalog
    // (an unmount through another node does so when no daemon of its name answers) ends its
    // export within a lease time.
    let snap_uri = mount_via(&b, &snap_id, "b");
    let key = format!("snapshot.{snap_id}");
    edit_catalog(&nats, &key, &key, |r| r["mount"] = serde_json::Value::Null);
    b.wait_for_log(
        "ending a snapshot mount the catalog no longer records",
        Duration::from_secs(30),
    );
    let out = common::daemon::qemu_io_output(&snap_uri, &["read -P 0x5a 0 64k"]);
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"),
        "an export the catalog no longer records still serves"
    );
    // The node a snapshot is exported through dies: an unmount through another node removes
    // its mount from the catalog, and the node, back, ends its export.
    mount_via(&c, &snap_id, "c");
    c.kill9();
    b.cli(&["unmount", &snap_id]);

    // The catalog lost the clone's record (JetStream lost a write, or a listing is stale)
    // while the snapshot is deleted: its pin in the bucket still keeps the snapshot's map.
    let clone_key = format!("volume.{clone_id}");
    let hidden = format!("hidden.{clone_id}");
    edit_catalog(&nats, &clone_key, &hidden, |_| {});
    edit_catalog(&nats, &clone_key, "", |_| {});
    let deleted = node_request(&nats, "a", "deletesnapshot", json!({"SnapshotId": snap_id}));
    assert_eq!(deleted["Return"], true, "{deleted}");
    edit_catalog(&nats, &hidden, &clone_key, |_| {});
    edit_catalog(&nats, &hidden, "", |_| {});
    c.start_again();
    c.wait_for_log(
        "ending a snapshot mount the catalog no longer records",
        Duration::from_secs(30),
    );
    let gone = node_request(
        &nats,
        "b",
        "describesnapshots",
        json!({"SnapshotIds": [snap_id]}),
    );
    assert_eq!(error_code(&gone), "InvalidSnapshot.NotFound");

    a.cli(&["unmount", &id, "--node", "a"]);
    // The drained unmount stored a map checkpoint above every chunk: the next owner reads it
    // and no chunk index.
    let ids = |dir: &str| -> Vec<u64> {
        let path = s3
            .dir
            .path()
            .join("vblock-catalog/vblock")
            .join(&id)
            .join(dir);
        std::fs::read_dir(&path)
            .map(|d| {
                d.filter_map(|e| {
                    u64::from_str_radix(&e.ok()?.file_name().to_string_lossy(), 16).ok()
                })
                .collect()
            })
            .unwrap_or_default()
    };
    let (checkpoint, chunks) = (ids("map").into_iter().max(), ids("chunks"));
    assert!(
        !chunks.is_empty() && chunks.iter().all(|c| Some(*c) < checkpoint),
        "checkpoint {checkpoint:?}, chunks {chunks:?}"
    );
    // Nobody holds it now, and c never did: c describes its space from that checkpoint.
    let space = node_request(
        &nats,
        "c",
        "describevolumespace",
        json!({"VolumeIds": [id]}),
    );
    assert_eq!(
        space["VolumeSpaces"][0]["AllocatedBytes"],
        (1 << 20) + (64 << 10),
        "{space}"
    );
    let deleted = node_request(&nats, "c", "deletevolume", json!({"VolumeId": id}));
    assert_eq!(deleted["Return"], true, "{deleted}");
    let gone = node_request(&nats, "b", "describevolumes", json!({"VolumeIds": [id]}));
    assert_eq!(error_code(&gone), "InvalidVolume.NotFound");

    let out = common::daemon::qemu_io_read_only(&clone_uri, &snapshot_data);
    assert!(
        !out.contains("failed"),
        "the clone after its source was deleted: {out}"
    );
    b.cli(&["unmount", &clone_id, "--node", "b"]);
    let moved = mount_via(&c, &clone_id, "c");
    assert!(moved.contains(&format!(":{}/", c.nbd_port)), "{moved}");
    let out = common::daemon::qemu_io_read_only(&moved, &snapshot_data);
    assert!(!out.contains("failed"), "the clone moved to c: {out}");
    let all = node_request(&nats, "b", "describevolumes", json!({}));
    let ids: Vec<&str> = all["Volumes"]
        .as_array()
        .map(|v| v.iter().filter_map(|v| v["VolumeId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [clone_id.as_str()], "{all}");

    // A clone left `creating` by a node that failed, stamped by a clock far behind (its
    // creation time says long ago): refused while it may still be created, whatever that time
    // says, and deleted once the node asked has seen it unchanged for --abandon-after on its
    // own clock.
    let stuck = stuck_clone(&nats, &clone_id, |r| {
        r["create_time"] = "2026-01-01T00:00:00Z".into();
        r["snapshot_id"] = "".into();
    });
    let deleted = node_request(&nats, "a", "deletevolume", json!({"VolumeId": stuck}));
    assert_eq!(error_code(&deleted), "IncorrectState", "{deleted}");
    delete_once_abandoned(&nats, &stuck);
    let gone = node_request(&nats, "b", "describevolumes", json!({"VolumeIds": [stuck]}));
    assert_eq!(error_code(&gone), "InvalidVolume.NotFound");

    // The same for a ClientToken claim whose volume never reached the catalog: the token's
    // volume is `creating` until the node asked has seen the claim unchanged for
    // --abandon-after, then the claim is released and a retry makes a new volume.
    let orphan = vblock::VolumeId::generate().to_string();
    let token = "skewed-clock";
    let token_key: String = token.bytes().map(|b| format!("{b:02x}")).collect();
    edit_catalog(
        &nats,
        &format!("volume.{clone_id}"),
        &format!("token.{token_key}"),
        |r| {
            r["volume_id"] = orphan.clone().into();
            r["state"] = "creating".into();
            r["create_time"] = "2026-01-01T00:00:00Z".into();
            r["size_bytes"] = (1u64 << 30).into();
            r["client_token"] = token.into();
        },
    );
    let first = node_request(
        &nats,
        "c",
        "createvolume",
        json!({"Size": 1, "ClientToken": token}),
    );
    assert_eq!(first["VolumeId"], orphan.as_str(), "{first}");
    assert_eq!(first["State"], "creating", "{first}");
    let mut made = serde_json::Value::Null;
    assert!(
        common::daemon::wait_until(Duration::from_secs(60), || {
            made = node_request(
                &nats,
                "c",
                "createvolume",
                json!({"Size": 1, "ClientToken": token}),
            );
            made["VolumeId"] != orphan.as_str()
        }),
        "an abandoned ClientToken claim is never released: {made}"
    );
    let made = made["VolumeId"].as_str().expect("VolumeId").to_owned();
    let deleted = node_request(&nats, "c", "deletevolume", json!({"VolumeId": made}));
    assert_eq!(deleted["Return"], true, "{deleted}");

    // The snapshot's copies in the bucket (s3s-fs keeps an object as a file; keys under the
    // default prefix `vblock/`) stay while its clone exists, and go with the clone.
    let snapshot_copy = s3
        .dir
        .path()
        .join("vblock-catalog/vblock")
        .join(&snap_id)
        .join("snapshot.json");
    assert!(snapshot_copy.exists(), "{}", snapshot_copy.display());
    // A second clone of it left `creating` by a node that failed after storing its pin pins
    // them too, until it is deleted as abandoned.
    let stuck = stuck_clone(&nats, &clone_id, |_| {});
    let pin = snapshot_copy.with_file_name("clones").join(&stuck);
    std::fs::create_dir_all(pin.parent().expect("clones/")).expect("mkdir");
    std::fs::write(&pin, b"").expect("the stuck clone's pin");
    c.cli(&["unmount", &clone_id, "--node", "c"]);
    let deleted = node_request(&nats, "b", "deletevolume", json!({"VolumeId": clone_id}));
    assert_eq!(deleted["Return"], true, "{deleted}");
    assert!(
        snapshot_copy.exists(),
        "a clone being created lost its snapshot"
    );
    delete_once_abandoned(&nats, &stuck);
    assert!(
        !snapshot_copy.exists(),
        "a deleted snapshot's copy outlived its last clone"
    );

    // A snapshot delete cut short after the catalog record went (the bucket copies stayed) is
    // finished by a retry; the next one answers not found.
    let vol = node_request(&nats, "a", "createvolume", json!({"Size": 1}));
    let vol = vol["VolumeId"].as_str().expect("VolumeId").to_owned();
    let snap = node_request(&nats, "b", "createsnapshot", json!({"VolumeId": vol}));
    let snap = snap["SnapshotId"].as_str().expect("SnapshotId").to_owned();
    let stored = common::daemon::wait_until(Duration::from_secs(30), || {
        let d = node_request(
            &nats,
            "c",
            "describesnapshots",
            json!({"SnapshotIds": [snap]}),
        );
        d["Snapshots"][0]["State"] == "completed"
    });
    assert!(stored, "the snapshot did not complete");
    edit_catalog(&nats, &format!("snapshot.{snap}"), "", |_| {});
    let copy = s3
        .dir
        .path()
        .join("vblock-catalog/vblock")
        .join(&snap)
        .join("snapshot.json");
    assert!(copy.exists(), "{}", copy.display());
    // It also has a pin its clone's node left behind (the clone and its record copy are gone):
    // it keeps the copies until the node asked has seen it so for --abandon-after.
    let pin = copy
        .with_file_name("clones")
        .join(vblock::VolumeId::generate().to_string());
    std::fs::create_dir_all(pin.parent().expect("clones/")).expect("mkdir");
    std::fs::write(&pin, b"").expect("a pin left behind");
    let first = node_request(&nats, "c", "deletesnapshot", json!({"SnapshotId": snap}));
    assert_eq!(error_code(&first), "InvalidSnapshot.NotFound", "{first}");
    assert!(copy.exists(), "a pin was judged at first sight");
    let finished = common::daemon::wait_until(Duration::from_secs(60), || {
        node_request(&nats, "c", "deletesnapshot", json!({"SnapshotId": snap}))["Return"] == true
    });
    assert!(
        finished,
        "a pin left behind keeps a deleted snapshot for good"
    );
    assert!(
        !copy.exists() && !pin.exists(),
        "the retry left the snapshot's copy"
    );
    let again = node_request(&nats, "a", "deletesnapshot", json!({"SnapshotId": snap}));
    assert_eq!(error_code(&again), "InvalidSnapshot.NotFound", "{again}");
}

/// Takeovers cut short (issue test 5): the owner is killed (-9) after a flush; the node that
/// mounts the volume next aborts inside its takeover, once after storing its epoch manifest
/// (before the fence) and once after the fence (before the rebuild); the node after it waits
/// out the dead taker's lease, takes the volume over in a later epoch and serves every flushed
/// write, and its own writes survive the next round.
#[test]
fn a_takeover_cut_short_leaves_the_volume_to_the_next_node() {
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let bucket = "vblock-takeover-crash";
    let mut nodes = [
        cluster_daemon(&nats, &s3, bucket, "a"),
        cluster_daemon(&nats, &s3, bucket, "b"),
        cluster_daemon(&nats, &s3, bucket, "c"),
    ];
    let id = nodes[0].create_volume(1);
    let uri = mount_via(&nodes[0], &id, "a");
    common::daemon::qemu_io(&uri, &["write -P 0x10 0 256k", "flush"]);
    let mut expected = vec!["read -P 0x10 0 256k".to_owned()];
    // (owner, the taker that crashes, the next taker) by index into `nodes`.
    let rounds = [
        (0, 1, 2, vblock::failpoints::TAKEOVER_NAMES[0]),
        (2, 0, 1, vblock::failpoints::TAKEOVER_NAMES[1]),
    ];
    for (round, (owner, crashing, next, point)) in rounds.into_iter().enumerate() {
        let names = ["a", "b", "c"];
        nodes[owner].kill9();
        nodes[crashing].kill9();
        let spec = format!("{point}=return");
        let mut envs = common::s3::S3Server::env().to_vec();
        envs.push(("VBLOCK_FAILPOINTS", &spec));
        nodes[crashing].set_envs(&envs);
        nodes[crashing].start_again();
        let refused = nodes[crashing].cli_refused(&[
            "mount",
            &id,
            "--node",
            names[crashing],
            "--timeout",
            "20",
        ]);
        let died = common::daemon::wait_until(Duration::from_secs(30), || {
            nodes[crashing].exited().is_some()
        });
        assert!(died, "round {round}: {point} did not fire: {refused}");
        assert!(
            nodes[crashing]
                .log()
                .contains(&format!("fail point {point}: aborting")),
            "round {round}: the taker died elsewhere:\n{}",
            nodes[crashing].log()
        );
        nodes[crashing].kill9();
        nodes[crashing].set_envs(&common::s3::S3Server::env());
        nodes[crashing].start_again();

        let uri = mount_via(&nodes[next], &id, names[next]);
        assert!(
            uri.contains(&format!(":{}/", nodes[next].nbd_port)),
            "round {round}: {uri}"
        );
        let reads: Vec<&str> = expected.iter().map(String::as_str).collect();
        let out = common::daemon::qemu_io_read_only(&uri, &reads);
        assert!(
            !out.contains("failed"),
            "round {round}, after a takeover cut short at {point}: {out}"
        );
        let offset = (round + 1) * 1024;
        let pattern = 0x20 + round;
        common::daemon::qemu_io(
            &uri,
            &[&format!("write -P {pattern:#x} {offset}k 64k"), "flush"],
        );
        expected.push(format!("read -P {pattern:#x} {offset}k 64k"));
        nodes[owner].start_again();
    }
}

/// The ids of every volume, described through `node`.
fn volume_ids(nats: &Nats, node: &str) -> Vec<String> {
    let d = node_request(nats, node, "describevolumes", serde_json::json!({}));
    d["Volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("describevolumes: {d}"))
        .iter()
        .map(|v| v["VolumeId"].as_str().expect("VolumeId").to_owned())
        .collect()
}

/// Mounts volume `id` through each of `via` (a daemon, its node name) at once; the URIs they
/// answered, in that order.
fn mount_at_once(via: &[(&common::daemon::Daemon, &str)], id: &str) -> Vec<String> {
    std::thread::scope(|s| {
        let mounts: Vec<_> = via
            .iter()
            .map(|&(d, name)| s.spawn(move || mount_via(d, id, name)))
            .collect();
        mounts
            .into_iter()
            .map(|m| m.join().expect("mount thread"))
            .collect()
    })
}

/// Racing requests (issue test 4): three nodes get one createvolume (one ClientToken) at once
/// and make one volume; they mount the unowned volume at once: exactly one becomes its owner
/// and every mount answers that node's URI, which serves the volume. Then the owner is killed
/// and the two survivors race to take the volume over: exactly one takeover succeeds and both
/// answer its URI. Deleting the volume frees its token; a token reused with another size is
/// refused through any node.
#[test]
fn racing_requests_have_one_winner() {
    use serde_json::json;
    common::daemon::require("qemu-io");
    let nats = Nats::start_jetstream();
    let s3 = common::s3::S3Server::start(common::s3::Kind::S3sFs);
    let mut nodes = [
        cluster_daemon(&nats, &s3, "vblock-race", "a"),
        cluster_daemon(&nats, &s3, "vblock-race", "b"),
        cluster_daemon(&nats, &s3, "vblock-race", "c"),
    ];
    let (mut id, mut last_uri) = (String::new(), String::new());
    for round in 0..3 {
        let token = format!("race-{round}");
        let ids: Vec<String> = std::thread::scope(|s| {
            let creates: Vec<_> = ["a", "b", "c"]
                .into_iter()
                .map(|node| {
                    let (nats, token) = (&nats, token.clone());
                    s.spawn(move || {
                        let r = node_request(
                            nats,
                            node,
                            "createvolume",
                            json!({"Size": 1, "ClientToken": token}),
                        );
                        r["VolumeId"]
                            .as_str()
                            .unwrap_or_else(|| panic!("createvolume through {node}: {r}"))
                            .to_owned()
                    })
                })
                .collect();
            creates
                .into_iter()
                .map(|c| c.join().expect("create thread"))
                .collect()
        });
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "round {round}: one ClientToken made several volumes: {ids:?}"
        );
        assert_eq!(
            volume_ids(&nats, "b").len(),
            round + 1,
            "round {round}: volumes made by racing creates"
        );
        id = ids[0].clone();
        let via: Vec<_> = nodes.iter().zip(["a", "b", "c"]).collect();
        let uris = mount_at_once(&via, &id);
        assert!(
            uris.iter().all(|u| *u == uris[0]),
            "round {round}: the mounts answered different owners: {uris:?}"
        );
        let owners: Vec<&common::daemon::Daemon> = nodes
            .iter()
            .filter(|d| uris[0].contains(&format!(":{}/", d.nbd_port)))
            .collect();
        assert_eq!(owners.len(), 1, "round {round}: {uris:?}");
        common::daemon::qemu_io(&uris[0], &["write -P 0x3c 0 64k", "flush"]);
        let out = common::daemon::qemu_io_read_only(&uris[0], &["read -P 0x3c 0 64k"]);
        assert!(!out.contains("failed"), "round {round}: {out}");
        last_uri = uris[0].clone();
    }

    // The owner dies; the survivors race to take its volume over (a stale lease).
    let owns = |d: &common::daemon::Daemon, uri: &str| uri.contains(&format!(":{}/", d.nbd_port));
    let dead = nodes
        .iter()
        .position(|d| owns(d, &last_uri))
        .expect("an owner");
    nodes[dead].kill9();
    let names = ["a", "b", "c"];
    let survivors: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    let takeovers = |nodes: &[common::daemon::Daemon]| -> f64 {
        survivors
            .iter()
            .map(|&i| {
                let m = common::metrics::scrape(nodes[i].metrics_port);
                common::metrics::value(&m, "vblock_takeovers_total", &[("result", "ok")])
            })
            .sum()
    };
    let before = takeovers(&nodes);
    let via: Vec<_> = survivors.iter().map(|&i| (&nodes[i], names[i])).collect();
    let uris = mount_at_once(&via, &id);
    assert!(
        uris.iter().all(|u| *u == uris[0]),
        "racing takeovers answered different owners: {uris:?}"
    );
    assert_eq!(
        survivors
            .iter()
            .filter(|&&i| owns(&nodes[i], &uris[0]))
            .count(),
        1,
        "{uris:?}"
    );
    assert_eq!(takeovers(&nodes) - before, 1.0, "takeovers that succeeded");
    let out = common::daemon::qemu_io_read_only(&uris[0], &["read -P 0x3c 0 64k"]);
    assert!(!out.contains("failed"), "after the racing takeovers: {out}");
    last_uri = uris[0].clone();

    let (one, other) = (names[survivors[0]], names[survivors[1]]);
    let other_size = node_request(
        &nats,
        one,
        "createvolume",
        json!({"Size": 2, "ClientToken": "race-2"}),
    );
    assert_eq!(error_code(&other_size), "IdempotentParameterMismatch");
    let owner = ["a", "b", "c"]
        .into_iter()
        .zip(&nodes)
        .find(|(_, d)| last_uri.contains(&format!(":{}/", d.nbd_port)))
        .expect("an owner");
    owner.1.cli(&["unmount", &id, "--node", owner.0]);
    let deleted = node_request(&nats, other, "deletevolume", json!({"VolumeId": id}));
    assert!(deleted.get("Error").is_none(), "deletevolume: {deleted}");
    let again = node_request(
        &nats,
        one,
        "createvolume",
        json!({"Size": 2, "ClientToken": "race-2"}),
    );
    let new_id = again["VolumeId"].as_str().unwrap_or_default();
    assert!(
        !new_id.is_empty() && new_id != id,
        "a deleted volume's ClientToken makes a new volume: {again}"
    );
}
