//! The key-layout migration run by [`super::MetaStore::open`]: layout 1 kept map keys in
//! ascending block order; layout 2 in descending order ([`super::keys::map_key`]).

use rocksdb::{WriteBatch, DB};

use super::keys::{map_key, PREFIX_MAP, PREFIX_SNAP_MAP};
use super::{synced, MetaError};

/// Map keys of layout 1 (`m VOL start_block(BE)`, `p SNAP start_block(BE)`: ascending block
/// order), written before 2026-11-30; [`MetaStore::open`] moves them to layout 2.
const LEGACY_MAP_PREFIXES: [(u8, u8); 2] = [(b'm', PREFIX_MAP), (b'p', PREFIX_SNAP_MAP)];
/// Key of the database's key layout version (u32 LE). Absent: layout 1.
const LAYOUT_KEY: &[u8] = b"F";
/// The key layout this build writes: 2 since map keys sort in descending block order.
pub const KEY_LAYOUT: u32 = 2;
/// Entries moved per synced batch by the layout migration.
pub(crate) const MIGRATION_BATCH: usize = 10_000;

/// Brings the database to [`KEY_LAYOUT`]: refuses a newer layout, moves the map keys of layout 1
/// ([`migrate_map_keys`]), then records the layout (synced).
pub(super) fn upgrade_layout(db: &DB) -> Result<(), MetaError> {
    let found = match db.get(LAYOUT_KEY)? {
        None => 1,
        Some(v) => u32::from_le_bytes(v.as_slice().try_into().map_err(|_| MetaError::Corrupt {
            key: "F".into(),
            reason: format!("layout version of {} bytes", v.len()),
        })?),
    };
    if found > KEY_LAYOUT {
        return Err(MetaError::UnsupportedLayout {
            found,
            supported: KEY_LAYOUT,
        });
    }
    if found == KEY_LAYOUT {
        return Ok(());
    }
    let moved = migrate_map_keys(db)?;
    db.put_opt(LAYOUT_KEY, KEY_LAYOUT.to_le_bytes(), &synced())?;
    tracing::info!(
        from = found,
        to = KEY_LAYOUT,
        map_extents_moved = moved,
        "metadata key layout upgraded (FORMAT.md, \"RocksDB keys\")"
    );
    Ok(())
}

/// Moves map extents stored under key layout 1 to layout 2 ([`map_key`]). Each entry moves in
/// one batch (put under the new key, delete the old one), batches are synced, so a crash leaves
/// every extent under exactly one key and the next open carries on. Returns the entries moved.
fn migrate_map_keys(db: &DB) -> Result<u64, MetaError> {
    let mut moved = 0u64;
    for (old, new) in LEGACY_MAP_PREFIXES {
        let mut from = vec![old];
        loop {
            let mut batch = WriteBatch::default();
            let mut n = 0;
            let mut it = db.raw_iterator();
            it.seek(&from);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k.first() != Some(&old) || n == MIGRATION_BATCH {
                    break;
                }
                let corrupt = || MetaError::Corrupt {
                    key: String::from_utf8_lossy(k).into_owned(),
                    reason: "map key of layout 1 without a prefix and a block number".into(),
                };
                let body = k
                    .len()
                    .checked_sub(8)
                    .filter(|&b| b > 0)
                    .ok_or_else(corrupt)?;
                let start = u64::from_be_bytes(k[body..].try_into().map_err(|_| corrupt())?);
                let mut key = k[..body].to_vec();
                key[0] = new;
                batch.put(map_key(&key, start), v);
                batch.delete(k);
                n += 1;
                it.next();
            }
            it.status()?;
            // Where the next batch starts: the first key not moved yet (seeking from the prefix
            // again would step over every tombstone this migration left).
            let next = it
                .key()
                .filter(|k| k.first() == Some(&old))
                .map(<[u8]>::to_vec);
            drop(it);
            if n > 0 {
                db.write_opt(batch, &synced())?;
                moved += n as u64;
            }
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
    }
    Ok(moved)
}
