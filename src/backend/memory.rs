//! In-memory backend: objects in a map. For tests and throw-away volumes; nothing survives exit.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, check_range, Backend, BackendError};

/// Objects kept in process memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Bytes>) -> T,
    ) -> Result<T, BackendError> {
        let mut map = self.objects.lock().map_err(|_| BackendError::Io {
            key: String::new(),
            message: "memory backend lock poisoned".into(),
            transient: false,
        })?;
        Ok(f(&mut map))
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        check_key(key)?;
        self.with(|m| m.insert(key.to_owned(), data))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, BackendError> {
        check_key(key)?;
        self.with(|m| match m.entry(key.to_owned()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(data);
                true
            }
        })
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        check_key(key)?;
        self.with(|m| m.get(key).cloned())?
            .ok_or_else(|| BackendError::NotFound(key.to_owned()))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        let obj = self.get(key).await?;
        check_range(key, &range, obj.len() as u64)?;
        Ok(obj.slice(range.start as usize..range.end as usize))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        check_key(key)?;
        self.with(|m| m.remove(key))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.with(|m| {
            m.range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect()
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn get_range_blocking(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Option<Result<Bytes, BackendError>> {
        let obj = check_key(key).and_then(|()| {
            self.with(|m| m.get(key).cloned())?
                .ok_or_else(|| BackendError::NotFound(key.to_owned()))
        });
        Some(obj.and_then(|o| {
            check_range(key, &range, o.len() as u64)?;
            Ok(o.slice(range.start as usize..range.end as usize))
        }))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn contract() {
        super::super::contract::check(&super::MemoryBackend::new()).await;
    }
}
