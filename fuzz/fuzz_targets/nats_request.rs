//! The NATS control plane (../shared/nats-api.md): any subject and body reach the real request
//! handlers of a real engine (memory backend). Every request gets a JSON reply (the EC2 error
//! shape for bad input), never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vblock::control::handlers::Control;

const OPS: &[&str] = &[
    "createvolume",
    "describevolumes",
    "attachvolume",
    "detachvolume",
    "deletevolume",
    "modifyvolume",
    "createsnapshot",
    "describesnapshots",
    "deletesnapshot",
    "describevolumespace",
    "mount",
    "unmount",
];

#[path = "engine_env.rs"]
mod engine_env;

fn env() -> &'static engine_env::Env<Control> {
    static ENV: OnceLock<engine_env::Env<Control>> = OnceLock::new();
    ENV.get_or_init(|| {
        engine_env::engine_env(|engine| async move {
            Control::new(Arc::new(engine), "nbd://127.0.0.1:10809".into())
        })
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the operation; the rest is the JSON body.
    let Some((&op, body)) = data.split_first() else {
        return;
    };
    let env = env();
    let subject = format!("ebs.{}", OPS[op as usize % OPS.len()]);
    let handled = env.rt.block_on(env.value.handle(&subject, body));
    assert!(
        serde_json::from_slice::<serde_json::Value>(&handled.reply).is_ok(),
        "non-JSON reply to {subject}"
    );
});
