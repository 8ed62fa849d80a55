//! An NBD client session (NBD proto.md): the input is everything a client sends — option
//! haggling, then transmission requests with payloads — fed to the real handshake and
//! transmission code serving a real volume (memory backend). The server must answer or
//! disconnect, never panic or hang.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_server::{
    handshake, transmission, Device, Export, ExportError, ExportInfo, ExportProvider, Limits,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every export name opens the one 1 MiB volume (volume ids are random, so a corpus could not
/// name it), except names starting with `x`, which are unknown.
struct AnyName(vblock::Volume);

#[async_trait::async_trait]
impl ExportProvider for AnyName {
    async fn list(&self) -> Vec<String> {
        vec![self.0.id().to_string()]
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        self.open(name).await.map(|e| e.info)
    }

    async fn open(&self, name: &str) -> Result<Export, ExportError> {
        if name.starts_with('x') {
            return Err(ExportError::Unknown(format!("no export {name:?}")));
        }
        Ok(Export {
            info: ExportInfo {
                name: name.to_owned(),
                size: self.0.size(),
                read_only: false,
                description: String::new(),
            },
            volume: Device::Volume(self.0.clone()),
        })
    }
}

#[path = "engine_env.rs"]
mod engine_env;

fn env() -> &'static engine_env::Env<Arc<AnyName>> {
    static ENV: OnceLock<engine_env::Env<Arc<AnyName>>> = OnceLock::new();
    ENV.get_or_init(|| {
        engine_env::engine_env(|engine| async move {
            let id = engine
                .create_volume(1 << 20, "fuzz")
                .await
                .expect("volume")
                .volume_id;
            Arc::new(AnyName(engine.volume(&id).await.expect("open volume")))
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let provider = env.value.clone();
        let serve = tokio::spawn(async move {
            let limits = Limits {
                max_requests: 16,
                max_in_flight_bytes: 4 << 20,
                ..Limits::default()
            };
            if let Ok(Some((neg, stream))) = handshake::negotiate(server, &*provider, None).await {
                let _ = transmission::transmit(stream, neg, limits).await;
            }
        });
        // Send the session, then drain replies until the server closes.
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        tokio::join!(send, drain);
        serve.await.expect("server task panicked");
    });
});
