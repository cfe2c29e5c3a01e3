//! Cancel-key mapping.
//!
//! Each session hands its client a proxy-made BackendKeyData and records which
//! upstream backend key it stands for. A CancelRequest arriving on a fresh connection
//! is looked up here and replayed to upstream with the real key. The registry never
//! exposes upstream keys to clients, and entries vanish when their session ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::{Rng, RngCore};

use crate::net::messages::BackendKey;

/// Live sessions' proxy keys mapped to their upstream keys.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<u32, (Bytes, BackendKey)>>,
}

/// Removes a session's key from the registry when dropped.
#[derive(Debug)]
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pid: u32,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Bytes, BackendKey)>> {
        // A poisoned map is still a valid map: entries are inserted and removed whole.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an upstream key and returns the key to give the client, whose secret
    /// has the same length as the upstream one (4 bytes in protocol 3.0).
    pub fn register(self: &Arc<Self>, upstream: BackendKey) -> (BackendKey, CancelGuard) {
        let mut rng = rand::thread_rng();
        let mut secret = vec![0u8; upstream.secret.len().max(4)];
        rng.fill_bytes(&mut secret);
        let secret = Bytes::from(secret);
        let mut map = self.lock();
        let pid = loop {
            // Stay positive: some clients treat the pid as a signed int.
            let pid = rng.gen_range(1..=i32::MAX as u32);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        map.insert(pid, (secret.clone(), upstream));
        drop(map);
        (
            BackendKey { pid, secret },
            CancelGuard {
                registry: self.clone(),
                pid,
            },
        )
    }

    /// The upstream key for a client's cancel key, if the key is live and the secret
    /// matches (compared in constant time).
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<BackendKey> {
        let map = self.lock();
        let (want, upstream) = map.get(&pid)?;
        let same = want.len() == secret.len()
            && want
                .iter()
                .zip(secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then(|| upstream.clone())
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lookup_and_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let up = BackendKey {
            pid: 99,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let (mine, guard) = reg.register(up.clone());
        assert_eq!(mine.secret.len(), 4);
        assert_eq!(reg.lookup(mine.pid, &mine.secret), Some(up));
        assert_eq!(reg.lookup(mine.pid, &[0, 0, 0, 0]), None);
        assert_eq!(reg.lookup(mine.pid, &mine.secret[..3]), None);
        drop(guard);
        assert!(reg.is_empty());
        assert_eq!(reg.lookup(mine.pid, &mine.secret), None);
    }
}
