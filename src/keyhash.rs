//! Keyed hashing of entity keys and list entries.
//!
//! Window state and lists never hold raw card numbers (or any other raw entity value):
//! they hold a 128-bit SipHash-1-3 of the value under a secret key. The key must be stable
//! across restarts for snapshots to stay valid, so it comes from configuration.

use std::hash::{BuildHasher, Hasher};

use siphasher::sip128::{Hasher128, SipHasher13};

/// A 128-bit keyed hash of an entity key (or list entry).
pub type KeyHash = u128;

/// The secret key for entity hashing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    pub const fn new(k0: u64, k1: u64) -> Self {
        HashKey { k0, k1 }
    }

    /// Derives a key from a secret string (e.g. from the config file or environment).
    pub fn from_secret(secret: &str) -> Self {
        let h = SipHasher13::new_with_keys(0x6672_6175_6467_6174, 0x652d_6b65_792d_7631)
            .hash(secret.as_bytes());
        let v = h.as_u128();
        HashKey {
            k0: v as u64,
            k1: (v >> 64) as u64,
        }
    }

    /// Starts a hash over several parts (composite keys).
    pub fn hasher(&self) -> KeyHasher {
        KeyHasher(SipHasher13::new_with_keys(self.k0, self.k1))
    }

    /// Hash of one string value.
    pub fn hash_str(&self, s: &str) -> KeyHash {
        let mut h = self.hasher();
        h.part(s.as_bytes());
        h.finish()
    }
}

impl Default for HashKey {
    /// A fixed development key. Production configs set their own secret.
    fn default() -> Self {
        HashKey::from_secret("fraudgate-default-key")
    }
}

/// Incremental keyed hasher; each part is length-prefixed so `("ab","c")` differs from
/// `("a","bc")`.
pub struct KeyHasher(SipHasher13);

impl KeyHasher {
    pub fn part(&mut self, bytes: &[u8]) {
        self.0.write_u64(bytes.len() as u64);
        self.0.write(bytes);
    }

    pub fn finish(self) -> KeyHash {
        self.0.finish128().as_u128()
    }
}

/// A [`KeyHash`] stored as two `u64`s: 8-byte alignment instead of `u128`'s 16 keeps
/// map entries (key + state) free of padding.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct StateKey(pub [u64; 2]);

impl From<KeyHash> for StateKey {
    fn from(h: KeyHash) -> StateKey {
        StateKey([h as u64, (h >> 64) as u64])
    }
}

impl From<StateKey> for KeyHash {
    fn from(k: StateKey) -> KeyHash {
        (k.0[0] as u128) | ((k.0[1] as u128) << 64)
    }
}

impl std::hash::Hash for StateKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: one word is enough for the table.
        state.write_u64(self.0[0] ^ self.0[1].rotate_left(32));
    }
}

/// `BuildHasher` for maps keyed by an already keyed, uniformly distributed [`KeyHash`]:
/// re-hashing would only cost time.
#[derive(Clone, Copy, Default, Debug)]
pub struct PreHashed;

impl BuildHasher for PreHashed {
    type Hasher = PreHashedHasher;
    fn build_hasher(&self) -> PreHashedHasher {
        PreHashedHasher(0)
    }
}

#[derive(Default)]
pub struct PreHashedHasher(u64);

impl Hasher for PreHashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only used for u128/u64 keys; fold whatever arrives.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_length_prefixed() {
        let a = HashKey::from_secret("a");
        let b = HashKey::from_secret("b");
        assert_ne!(a.hash_str("4111"), b.hash_str("4111"));
        assert_eq!(a.hash_str("4111"), a.hash_str("4111"));
        let mut h1 = a.hasher();
        h1.part(b"ab");
        h1.part(b"c");
        let mut h2 = a.hasher();
        h2.part(b"a");
        h2.part(b"bc");
        assert_ne!(h1.finish(), h2.finish());
        assert!(!format!("{a:?}").contains(&format!("{}", a.k0)));
    }
}
