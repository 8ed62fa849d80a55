//! Cluster building blocks against a real `nats-server -js` (docs/design/cluster.md): volume
//! leases in JetStream KV. The fencing primitive they rely on for safety
//! (`Backend::put_if_absent`) is tested in tests/s3.rs and the backend contract.

mod common;

use std::time::{Duration, Instant};

use common::daemon::Nats;
use vblock::cluster::lease::{Claim, LeaseError, Leases, Owner};
use vblock::VolumeId;

/// The lease time of these tests.
const TTL: Duration = Duration::from_secs(2);

fn owner(node: &str) -> Owner {
    Owner {
        node: node.into(),
        epoch: 1,
        nbd_advertise: format!("{node}:10809"),
    }
}

/// A node's view of the leases: its own NATS connection, as a separate daemon would have.
async fn leases(nats: &Nats) -> Leases {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    Leases::open(client, "vblock-leases", TTL)
        .await
        .expect("KV bucket")
}

fn run(f: impl std::future::Future<Output = ()>) {
    common::run(Duration::from_secs(60), f);
}

/// A free lease is won at once; while its holder renews, another node's claim returns the
/// holder (without waiting out the TTL); a release frees it at once.
#[test]
fn a_renewed_lease_is_held_and_a_released_one_is_free() {
    let nats = Nats::start_jetstream();
    run(async {
        let (a, b) = (leases(&nats).await, leases(&nats).await);
        let id = VolumeId::generate();
        let Claim::Won { revision } = a.claim(&id, &owner("a")).await.expect("claim") else {
            panic!("a free lease was not won");
        };
        // `a` renews every TTL/4 while `b` claims.
        let a = std::sync::Arc::new(a);
        let renewer = {
            let (a, id, me) = (a.clone(), id.clone(), owner("a"));
            tokio::spawn(async move {
                let mut revision = revision;
                loop {
                    tokio::time::sleep(TTL / 4).await;
                    revision = a.renew(&id, &me, revision).await.expect("renew");
                }
            })
        };
        let started = Instant::now();
        assert_eq!(
            b.claim(&id, &owner("b")).await.expect("claim"),
            Claim::Held(owner("a"))
        );
        assert!(
            started.elapsed() < TTL,
            "a renewed lease was watched for the whole TTL"
        );
        renewer.abort();
        let _ = renewer.await;
        let (held, revision) = a.holder(&id).await.expect("holder").expect("held");
        assert_eq!(held, owner("a"));
        a.release(&id, revision).await.expect("release");
        let started = Instant::now();
        assert!(matches!(
            b.claim(&id, &owner("b")).await.expect("claim"),
            Claim::Won { .. }
        ));
        assert!(started.elapsed() < TTL, "a released lease was watched");
    });
}

/// A holder that stops renewing loses the lease to a claimer once the TTL has passed on the
/// claimer's clock; its next renewal is refused (`Lost`), and so is its release.
#[test]
fn a_lease_not_renewed_for_the_ttl_is_taken_over() {
    let nats = Nats::start_jetstream();
    run(async {
        let (a, b) = (leases(&nats).await, leases(&nats).await);
        let id = VolumeId::generate();
        let Claim::Won { revision: old } = a.claim(&id, &owner("a")).await.expect("claim") else {
            panic!("a free lease was not won");
        };
        let started = Instant::now();
        let Claim::Won { revision } = b.claim(&id, &owner("b")).await.expect("claim") else {
            panic!("a lease nobody renewed was not taken over");
        };
        assert!(started.elapsed() >= TTL, "taken over before the TTL passed");
        assert!(matches!(
            a.renew(&id, &owner("a"), old).await,
            Err(LeaseError::Lost(_))
        ));
        assert!(matches!(
            a.release(&id, old).await,
            Err(LeaseError::Lost(_))
        ));
        assert_eq!(
            b.holder(&id).await.expect("holder"),
            Some((owner("b"), revision))
        );
        // A restarted holder takes its own lease back at once.
        let started = Instant::now();
        assert!(matches!(
            b.claim(&id, &owner("b")).await.expect("claim"),
            Claim::Won { .. }
        ));
        assert!(started.elapsed() < TTL);
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
        assert!(matches!(
            a.claim(&id, &owner("a")).await.expect("claim"),
            Claim::Won { .. }
        ));
        let mut claims = Vec::new();
        for node in ["b", "c", "d"] {
            let l = leases(&nats).await;
            let id = id.clone();
            claims.push(tokio::spawn(async move {
                (node, l.claim(&id, &owner(node)).await.expect("claim"))
            }));
        }
        let mut winners = Vec::new();
        let mut told = Vec::new();
        for c in claims {
            match c.await.expect("claim task") {
                (node, Claim::Won { .. }) => winners.push(node),
                (_, Claim::Held(o)) => told.push(o.node),
            }
        }
        assert_eq!(winners.len(), 1, "winners {winners:?}");
        assert!(
            told.iter().all(|n| n == winners[0]),
            "losers were told {told:?}, the winner is {winners:?}"
        );
        assert_eq!(
            a.holder(&id).await.expect("holder").map(|(o, _)| o.node),
            Some(winners[0].to_owned())
        );
    });
}

/// A kept lease stays held across several TTLs; it is reported lost as soon as another node
/// overwrites it, and (another lease) when NATS goes away for longer than its renewals allow.
#[test]
fn a_kept_lease_stays_held_and_reports_its_loss() {
    let mut nats = Nats::start_jetstream();
    run(async {
        let a = std::sync::Arc::new(leases(&nats).await);
        let b = leases(&nats).await;
        let id = VolumeId::generate();
        let Claim::Won { revision } = a.claim(&id, &owner("a")).await.expect("claim") else {
            panic!("a free lease was not won");
        };
        let kept = a.keep(&id, &owner("a"), revision);
        let started = Instant::now();
        while started.elapsed() < 2 * TTL {
            assert_eq!(
                b.claim(&id, &owner("b")).await.expect("claim"),
                Claim::Held(owner("a"))
            );
        }
        assert!(!kept.is_lost());
        // Another node writes the key (as a takeover after a KV fault would): lost.
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
        let kv = js.get_key_value("vblock-leases").await.expect("bucket");
        kv.put(
            format!("owner.{id}"),
            serde_json::to_vec(&owner("z")).expect("json").into(),
        )
        .await
        .expect("put");
        tokio::time::timeout(TTL, kept.lost())
            .await
            .expect("the overwritten lease was not reported lost");

        let other = VolumeId::generate();
        let Claim::Won { revision } = a.claim(&other, &owner("a")).await.expect("claim") else {
            panic!("a free lease was not won");
        };
        let kept = a.keep(&other, &owner("a"), revision);
        nats.stop();
        tokio::time::timeout(2 * TTL, kept.lost())
            .await
            .expect("a lease that cannot be renewed was not reported lost");
    });
}
