//! Hive's subjects (`ebs.mount`, `ebs.unmount`, `ebs.delete`; `../shared/nats-api.md`): replies
//! carry an `Error` text instead of an EC2 error object.

use crate::ids::VolumeId;

use super::api::*;
use super::handlers::{parse, Control};

impl Control {
    fn uri(&self, id: &VolumeId) -> String {
        format!("{}/{id}", self.nbd_uri_base)
    }

    pub(super) async fn mount(&self, payload: &[u8]) -> EbsMountResponse {
        let fail = |error: String, retryable: bool| EbsMountResponse {
            uri: String::new(),
            mounted: false,
            error,
            retryable,
        };
        let req: EbsRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => return fail(e.message, false),
        };
        let Ok(id) = VolumeId::parse(&req.name) else {
            return fail(format!("invalid volume id {:?}", req.name), false);
        };
        let _g = self.lock.lock().await;
        let mut rec = match self.engine.get_record(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => return fail(format!("volume {id} not found"), false),
            Err(e) => return fail(e.to_string(), true),
        };
        // Open it now so WAL replay happens before the VM connects.
        if let Err(e) = self.engine.volume(&id).await {
            return fail(format!("cannot open {id}: {e}"), true);
        }
        if !rec.mounted {
            rec.mounted = true;
            if let Err(e) = self.engine.put_record(rec).await {
                return fail(e.to_string(), true);
            }
            tracing::info!(volume = %id, device = %req.device_name, "volume mounted");
        }
        EbsMountResponse {
            uri: self.uri(&id),
            mounted: true,
            error: String::new(),
            retryable: false,
        }
    }

    pub(super) async fn unmount(&self, payload: &[u8]) -> EbsUnmountResponse {
        let resp =
            |volume: String, mounted: bool, error: String, not_found: bool| EbsUnmountResponse {
                volume,
                mounted,
                error,
                not_found,
            };
        let req: EbsRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => return resp(String::new(), false, e.message, false),
        };
        let Ok(id) = VolumeId::parse(&req.name) else {
            return resp(
                req.name.clone(),
                false,
                format!("invalid volume id {:?}", req.name),
                true,
            );
        };
        let _g = self.lock.lock().await;
        let mut rec = match self.engine.get_record(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return resp(
                    id.to_string(),
                    false,
                    format!("volume {id} not found"),
                    true,
                )
            }
            Err(e) => return resp(id.to_string(), true, e.to_string(), false),
        };
        if let Err(e) = self.engine.close_volume(&id).await {
            return resp(
                id.to_string(),
                true,
                format!("cannot close {id}: {e}"),
                false,
            );
        }
        if rec.mounted {
            rec.mounted = false;
            if let Err(e) = self.engine.put_record(rec).await {
                return resp(id.to_string(), true, e.to_string(), false);
            }
            tracing::info!(volume = %id, "volume unmounted");
        }
        resp(id.to_string(), false, String::new(), false)
    }

    pub(super) async fn hive_delete(&self, payload: &[u8]) -> EbsDeleteResponse {
        let req: EbsDeleteRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => {
                return EbsDeleteResponse {
                    volume: String::new(),
                    success: false,
                    error: e.message,
                }
            }
        };
        let fail = |error: String| EbsDeleteResponse {
            volume: req.volume.clone(),
            success: false,
            error,
        };
        let Ok(id) = VolumeId::parse(&req.volume) else {
            return fail(format!("invalid volume id {:?}", req.volume));
        };
        let _g = self.lock.lock().await;
        match self.engine.get_record(&id).await {
            Ok(Some(r)) if r.mounted || !r.attachments.is_empty() => {
                return fail(format!("volume {id} is mounted or attached"))
            }
            Ok(Some(_)) => {}
            Ok(None) => return fail(format!("volume {id} not found")),
            Err(e) => return fail(e.to_string()),
        }
        match self.engine.delete_volume(&id).await {
            Ok(()) => {
                tracing::info!(volume = %id, "volume deleted");
                EbsDeleteResponse {
                    volume: id.to_string(),
                    success: true,
                    error: String::new(),
                }
            }
            Err(e) => fail(e.to_string()),
        }
    }
}
