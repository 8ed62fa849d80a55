//! The ebs.* control plane over a real nats-server, driven by an independent client (async-nats),
//! with the EC2-shaped and Hive payloads of `shared/nats-api.md` (issue: the daemon end to end,
//! step 6), plus the CLI and NATS outages.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{qemu_io, qemu_io_output, run, vblock_bin, wait_until, Daemon, Nats};
use futures::StreamExt;
use serde_json::{json, Value};

async fn request(c: &async_nats::Client, subject: &str, body: &[u8]) -> Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(20),
        c.request(subject.to_owned(), body.to_vec().into()),
    )
    .await
    .unwrap_or_else(|_| panic!("{subject}: no reply in 20 s"))
    .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&msg.payload)
        .unwrap_or_else(|e| panic!("{subject}: reply is not JSON: {e}"))
}

async fn call(c: &async_nats::Client, subject: &str, body: Value) -> Value {
    request(c, subject, body.to_string().as_bytes()).await
}

fn error_code(v: &Value) -> &str {
    v["Error"]["Code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error reply, got {v}"))
}

async fn connect(url: &str) -> async_nats::Client {
    let c = async_nats::connect(url).await.expect("connect to nats");
    // Wait until the daemon has subscribed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(2),
            c.request("ebs.describevolumes", "{}".into()),
        )
        .await
        {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "daemon never answered on NATS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn volume_lifecycle_ec2_and_hive() {
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--node", "node1"]);
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(240), async {
            let c = connect(&nats.url()).await;
            // CreateVolume, idempotent with ClientToken.
            let create = json!({"Size": 1, "VolumeType": "gp3", "AvailabilityZone": "az-1", "Iops": 3000, "ClientToken": "tok-1",
                "TagSpecifications": [{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": "web-1"}, {"Key": "team", "Value": "db"}]}]});
            let v = call(&c, "ebs.createvolume", create.clone()).await;
            let id = v["VolumeId"].as_str().expect("VolumeId").to_owned();
            assert!(vblock::VolumeId::parse(&id).is_ok(), "{id}");
            assert_eq!((v["Size"].as_u64(), v["State"].as_str(), v["AvailabilityZone"].as_str()), (Some(1), Some("available"), Some("az-1")));
            assert!(v["CreateTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
            let again = call(&c, "ebs.createvolume", create).await;
            assert_eq!(again["VolumeId"], v["VolumeId"], "ClientToken must make createvolume idempotent");
            // DescribeVolumes with ids and filters.
            let all = call(&c, "ebs.describevolumes", json!({})).await;
            assert_eq!(all["Volumes"].as_array().map(Vec::len), Some(1));
            let by_tag = call(&c, "ebs.describevolumes", json!({"Filters": [{"Name": "tag:team", "Values": ["db"]}]})).await;
            assert_eq!(by_tag["Volumes"][0]["VolumeId"], v["VolumeId"]);
            let none = call(&c, "ebs.describevolumes", json!({"Filters": [{"Name": "status", "Values": ["in-use"]}]})).await;
            assert_eq!(none["Volumes"].as_array().map(Vec::len), Some(0));
            // AttachVolume.
            let a = call(&c, "ebs.attachvolume", json!({"VolumeId": id, "InstanceId": "i-0abc", "Device": "/dev/sdf"})).await;
            assert_eq!((a["State"].as_str(), a["InstanceId"].as_str(), a["Device"].as_str()), (Some("attached"), Some("i-0abc"), Some("/dev/sdf")));
            assert_eq!(error_code(&call(&c, "ebs.attachvolume", json!({"VolumeId": id, "InstanceId": "i-other", "Device": "/dev/sdg"})).await), "VolumeInUse");
            let desc = call(&c, "ebs.describevolumes", json!({"VolumeIds": [id]})).await;
            assert_eq!(desc["Volumes"][0]["State"], "in-use");
            assert_eq!(desc["Volumes"][0]["Attachments"][0]["InstanceId"], "i-0abc");
            let by_instance = call(&c, "ebs.describevolumes", json!({"Filters": [{"Name": "attachment.instance-id", "Values": ["i-0abc"]}]})).await;
            assert_eq!(by_instance["Volumes"].as_array().map(Vec::len), Some(1));
            assert_eq!(desc["Volumes"][0]["MultiAttachEnabled"], false);
            // EBS Multi-Attach: io1/io2 only; then several instances, each once, at most 16.
            let bad = call(&c, "ebs.createvolume", json!({"Size": 1, "MultiAttachEnabled": true})).await;
            assert_eq!(error_code(&bad), "InvalidParameterValue", "{bad}");
            let multi = call(&c, "ebs.createvolume", json!({"Size": 1, "VolumeType": "io2", "MultiAttachEnabled": true})).await;
            assert_eq!(multi["MultiAttachEnabled"], true, "{multi}");
            let multi = multi["VolumeId"].as_str().expect("VolumeId").to_owned();
            for i in 0..16 {
                let a = call(&c, "ebs.attachvolume", json!({"VolumeId": multi, "InstanceId": format!("i-{i}"), "Device": "/dev/sdf"})).await;
                assert_eq!(a["State"], "attached", "{a}");
            }
            assert_eq!(error_code(&call(&c, "ebs.attachvolume", json!({"VolumeId": multi, "InstanceId": "i-3", "Device": "/dev/sdg"})).await), "VolumeInUse");
            assert_eq!(error_code(&call(&c, "ebs.attachvolume", json!({"VolumeId": multi, "InstanceId": "i-16", "Device": "/dev/sdf"})).await), "VolumeInUse");
            let desc = call(&c, "ebs.describevolumes", json!({"VolumeIds": [multi]})).await;
            assert_eq!(desc["Volumes"][0]["Attachments"].as_array().map(Vec::len), Some(16));
            // Hive mount, verbatim payload, with the ebs.mount.response broadcast.
            let mut responses = c.subscribe("ebs.mount.response").await.expect("subscribe");
            let hive = format!(r#"{{"Name":"{id}","VolType":"gp3","Boot":false,"EFI":false,"DeleteOnTermination":true,"NBDURI":"","DeviceName":"/dev/vdb","HotplugPort":3}}"#);
            let m = request(&c, "ebs.mount", hive.as_bytes()).await;
            let uri = m["URI"].as_str().expect("URI").to_owned();
            // The export is the VolumeId and the mount's 128-bit secret.
            let secret = uri.strip_prefix(&format!("nbd://127.0.0.1:{}/{id}-", d.nbd_port)).expect("export named by the volume id and a secret");
            assert!(secret.len() == 32 && secret.bytes().all(|b| b.is_ascii_hexdigit()), "{uri}");
            assert_eq!(m, json!({"URI": uri, "Mounted": true, "Error": "", "Retryable": false}));
            let broadcast = tokio::time::timeout(Duration::from_secs(10), responses.next()).await.expect("broadcast in time").expect("message");
            assert_eq!(serde_json::from_slice::<Value>(&broadcast.payload).expect("json"), m);
            let m2 = request(&c, "ebs.node1.mount", hive.as_bytes()).await;
            assert_eq!(m2["URI"], m["URI"], "mount is idempotent, also on the node subject");
            // The mount is reported as an attachment with its DeleteOnTermination.
            let desc = call(&c, "ebs.describevolumes", json!({"VolumeIds": [id]})).await;
            let mount = &desc["Volumes"][0]["Attachments"][1];
            assert_eq!((mount["InstanceId"].as_str(), mount["Device"].as_str(), mount["State"].as_str(), mount["DeleteOnTermination"].as_bool()),
                (Some(""), Some("/dev/vdb"), Some("attached"), Some(true)), "{desc}");
            // The URI works for a real client.
            let out = qemu_io(&uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
            assert!(!out.contains("failed"), "{out}");
            assert_eq!(error_code(&call(&c, "ebs.deletevolume", json!({"VolumeId": id})).await), "VolumeInUse");
            // Unmount with broadcast.
            let mut unmounts = c.subscribe("ebs.unmount.response").await.expect("subscribe");
            let u = request(&c, "ebs.unmount", hive.as_bytes()).await;
            assert_eq!(u, json!({"Volume": id, "Mounted": false, "Error": "", "NotFound": false}));
            let b = tokio::time::timeout(Duration::from_secs(10), unmounts.next()).await.expect("broadcast in time").expect("message");
            assert_eq!(serde_json::from_slice::<Value>(&b.payload).expect("json"), u);
            // DetachVolume.
            let det = call(&c, "ebs.detachvolume", json!({"VolumeId": id, "InstanceId": "i-0abc"})).await;
            assert_eq!(det["State"], "detached");
            assert_eq!(error_code(&call(&c, "ebs.detachvolume", json!({"VolumeId": id})).await), "IncorrectState");
            // ModifyVolume: grow only.
            let m = call(&c, "ebs.modifyvolume", json!({"VolumeId": id, "Size": 2})).await;
            assert_eq!((m["VolumeModification"]["TargetSize"].as_u64(), m["VolumeModification"]["OriginalSize"].as_u64()), (Some(2), Some(1)));
            assert_eq!(error_code(&call(&c, "ebs.modifyvolume", json!({"VolumeId": id, "Size": 1})).await), "InvalidParameterValue");
            // Everything persists across a restart; data too.
            d.restart();
            let c = connect(&nats.url()).await;
            let desc = call(&c, "ebs.describevolumes", json!({"VolumeIds": [id]})).await;
            let vol = &desc["Volumes"][0];
            assert_eq!((vol["Size"].as_u64(), vol["State"].as_str()), (Some(2), Some("available")));
            assert_eq!(vol["Tags"], json!([{"Key": "Name", "Value": "web-1"}, {"Key": "team", "Value": "db"}]));
            // The unmount ended the old URI; a new mount has a new secret.
            let refused = qemu_io_output(&uri, &["read 0 4k"]);
            assert!(!refused.status.success(), "the URI of an ended mount must not open");
            let again = request(&c, "ebs.mount", hive.as_bytes()).await;
            let uri2 = again["URI"].as_str().expect("URI").to_owned();
            assert_ne!(uri2, uri);
            let out = qemu_io(&uri2, &["read -P 0x5a 0 64k", "read -P 0 1G 4k"]);
            assert!(!out.contains("failed"), "{out}");
            let u = request(&c, "ebs.unmount", hive.as_bytes()).await;
            assert_eq!(u["Error"], "", "{u}");
            // DeleteVolume.
            assert_eq!(call(&c, "ebs.deletevolume", json!({"VolumeId": id})).await, json!({"Return": true}));
            assert_eq!(error_code(&call(&c, "ebs.describevolumes", json!({"VolumeIds": [id]})).await), "InvalidVolume.NotFound");
            // Hive delete.
            let other = call(&c, "ebs.createvolume", json!({"Size": 1})).await["VolumeId"].as_str().expect("id").to_owned();
            let del = request(&c, "ebs.delete", format!(r#"{{"Volume":"{other}"}}"#).as_bytes()).await;
            assert_eq!(del, json!({"Volume": other, "Success": true, "Error": ""}));
            let del = request(&c, "ebs.delete", format!(r#"{{"Volume":"{other}"}}"#).as_bytes()).await;
            assert_eq!(del["Success"], false);
            assert!(del["Error"].as_str().is_some_and(|e| e.contains("not found")), "{del}");
        })
        .await
        .expect("test time limit");
    });
}

#[test]
fn error_replies_for_bad_requests() {
    let nats = Nats::start();
    let _d = Daemon::start(&nats.url());
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            let c = connect(&nats.url()).await;
            let cases: Vec<(&str, &[u8], &str)> = vec![
                ("ebs.createvolume", b"{not json", "InvalidParameterValue"),
                ("ebs.createvolume", b"{}", "MissingParameter"),
                ("ebs.createvolume", br#"{"Size": "big"}"#, "InvalidParameterValue"),
                ("ebs.createvolume", br#"{"Size": 0}"#, "InvalidParameterValue"),
                ("ebs.createvolume", br#"{"Size": 16385}"#, "InvalidParameterValue"),
                ("ebs.createvolume", br#"{"Size": 1, "SnapshotId": "snap-0123456789abcdef0"}"#, "InvalidSnapshot.NotFound"),
                ("ebs.describevolumes", br#"{"VolumeIds": ["vol-00000000000000000"]}"#, "InvalidVolume.NotFound"),
                ("ebs.describevolumes", br#"{"VolumeIds": ["../../etc"]}"#, "InvalidVolume.NotFound"),
                ("ebs.describevolumes", br#"{"VolumeIds": "vol-00000000000000000"}"#, "InvalidParameterValue"),
                ("ebs.describevolumes", br#"{"Filters": [{"Name": "nonsense", "Values": ["x"]}]}"#, "InvalidParameterValue"),
                ("ebs.attachvolume", br#"{"VolumeId": "vol-00000000000000000", "InstanceId": "i-1", "Device": "/dev/sdf"}"#, "InvalidVolume.NotFound"),
                ("ebs.attachvolume", br#"{"VolumeId": "vol-00000000000000000"}"#, "MissingParameter"),
                ("ebs.detachvolume", br#"{"VolumeId": 7}"#, "InvalidParameterValue"),
                ("ebs.deletevolume", br#"{"VolumeId": "vol-00000000000000000"}"#, "InvalidVolume.NotFound"),
                ("ebs.modifyvolume", br#"{"VolumeId": "vol-00000000000000000", "Size": 2}"#, "InvalidVolume.NotFound"),
                ("ebs.createsnapshot", br#"{"VolumeId": "vol-00000000000000000"}"#, "InvalidVolume.NotFound"),
                ("ebs.createsnapshot", b"{}", "MissingParameter"),
                ("ebs.describesnapshots", br#"{"SnapshotIds": ["snap-0123456789abcdef0"]}"#, "InvalidSnapshot.NotFound"),
                ("ebs.describesnapshots", br#"{"SnapshotIds": ["../x"]}"#, "InvalidSnapshot.NotFound"),
                ("ebs.describesnapshots", br#"{"Filters": [{"Name": "nonsense", "Values": ["x"]}]}"#, "InvalidParameterValue"),
                ("ebs.deletesnapshot", br#"{"SnapshotId": "snap-0123456789abcdef0"}"#, "InvalidSnapshot.NotFound"),
                ("ebs.deletesnapshot", br#"{"SnapshotId": 3}"#, "InvalidParameterValue"),
                ("ebs.describevolumespace", br#"{"VolumeIds": ["vol-00000000000000000"]}"#, "InvalidVolume.NotFound"),
            ];
            for (subject, body, code) in cases {
                let v = request(&c, subject, body).await;
                assert_eq!(error_code(&v), code, "{subject} {}: {v}", String::from_utf8_lossy(body));
                assert!(v["Error"]["Message"].as_str().is_some_and(|m| !m.is_empty()));
            }
            // Unknown fields are ignored.
            let v = call(&c, "ebs.createvolume", json!({"Size": 1, "Unknown": {"x": 1}})).await;
            assert!(v["VolumeId"].is_string(), "{v}");
            // Hive shapes carry their errors in their own fields.
            let m = request(&c, "ebs.mount", br#"{"Name":"vol-00000000000000000","VolType":"gp3","Boot":false,"EFI":false,"DeleteOnTermination":false,"NBDURI":"","DeviceName":"/dev/vdb"}"#).await;
            assert_eq!((m["Mounted"].as_bool(), m["URI"].as_str()), (Some(false), Some("")));
            assert!(m["Error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
            let m = request(&c, "ebs.mount", b"garbage").await;
            assert_eq!(m["Mounted"], false);
            let u = request(&c, "ebs.unmount", br#"{"Name":"vol-00000000000000000"}"#).await;
            assert_eq!((u["NotFound"].as_bool(), u["Mounted"].as_bool()), (Some(true), Some(false)));
            let del = request(&c, "ebs.delete", br#"{"Volume": 5}"#).await;
            assert_eq!(del["Success"], false);
            // The daemon is still healthy.
            let all = call(&c, "ebs.describevolumes", json!({})).await;
            assert!(all["Volumes"].is_array());
        })
        .await
        .expect("test time limit");
    });
}

#[test]
fn cli_manages_volumes_and_reports_unreachable_daemons() {
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    let list = d.cli(&["volume", "list"]);
    assert!(list.contains(&id) && list.contains("available"), "{list}");
    let desc: Value =
        serde_json::from_str(&d.cli(&["volume", "describe", &id, "--output", "json"]))
            .expect("json");
    assert_eq!(desc["Size"], 1);
    d.cli(&[
        "volume",
        "attach",
        &id,
        "--instance",
        "i-9",
        "--device",
        "/dev/sdh",
    ]);
    let uri = d.cli(&["mount", &id]);
    assert_eq!(uri.trim(), d.uri(&id));
    let out = qemu_io(uri.trim(), &["write -P 0x42 0 4k", "read -P 0x42 0 4k"]);
    assert!(!out.contains("failed"));
    d.cli(&["unmount", &id]);
    d.cli(&["volume", "detach", &id]);
    let resized = d.cli(&["volume", "resize", &id, "--size", "3GiB"]);
    assert!(resized.contains("1GiB -> 3GiB"), "{resized}");
    // A bad size is a usage error (exit 2).
    let bad = run(
        Command::new(vblock_bin()).args([
            "volume",
            "create",
            "--size",
            "1.5GiB",
            "--nats-url",
            &d.nats_url,
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // A missing volume is an API error (exit 1) naming the EC2 code.
    let missing = run(
        Command::new(vblock_bin()).args([
            "volume",
            "delete",
            "vol-00000000000000000",
            "--nats-url",
            &d.nats_url,
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("InvalidVolume.NotFound"));
    d.cli(&["volume", "delete", &id]);
    // No NATS at all: exit 3 with a clear message.
    let port = common::daemon::free_port();
    let out = run(
        Command::new(vblock_bin()).args([
            "volume",
            "list",
            "--timeout",
            "2",
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach NATS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NATS but no daemon: exit 3, says so.
    let lonely = Nats::start();
    let out = run(
        Command::new(vblock_bin()).args([
            "volume",
            "list",
            "--timeout",
            "2",
            "--nats-url",
            &lonely.url(),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no vblock daemon answered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nbd_keeps_serving_through_a_nats_outage_and_control_reconnects() {
    let mut nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    let uri = d.uri(&id);
    nats.stop();
    let out = qemu_io(&uri, &["write -P 0x77 0 1M", "read -P 0x77 0 1M"]);
    assert!(!out.contains("failed"), "{out}");
    d.wait_for_log("NATS disconnected", Duration::from_secs(20));
    nats.restart();
    let ok = wait_until(Duration::from_secs(60), || {
        run(
            Command::new(vblock_bin()).args([
                "volume",
                "describe",
                &id,
                "--timeout",
                "2",
                "--nats-url",
                &d.nats_url,
            ]),
            Duration::from_secs(30),
        )
        .status
        .success()
    });
    assert!(
        ok,
        "control plane did not come back after NATS restarted; log:\n{}",
        d.log()
    );
    assert!(
        d.log().matches("NATS connected").count() >= 2,
        "{}",
        d.log()
    );
}
