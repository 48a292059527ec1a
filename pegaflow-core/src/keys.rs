//! Block keys derived from content: the same tokens (and the same extra
//! inputs) give the same key in every process, on every machine.
//!
//! An engine's own block hashes may not: vLLM 0.25 seeds its chain with a
//! random value per process unless `PYTHONHASHSEED` is set, and later
//! versions still do for `--prefix-caching-hash-algo xxhash`. Keys computed
//! here depend on nothing but their inputs.
//!
//! # Byte format (version 1)
//!
//! The key of block `i` is the 32-byte BLAKE3 hash (default mode, no key)
//! of this input:
//!
//! | bytes | field |
//! |---|---|
//! | 16 | [`KEY_FORMAT_TAG`]: `b"pegaflow-key/v1\0"` |
//! | 1 | `0` when the block has no parent (the first block of a chain), `1` otherwise |
//! | 0 or 32 | the parent: the key of block `i - 1` (present iff the flag is `1`) |
//! | 4 | number of tokens `n` in the block, `u32` little-endian |
//! | 4 `n` | the token ids, each a `u32` little-endian |
//! | 1 | `0` when the block has no extra input, `1` otherwise |
//! | 0 or 8 | length `m` of the extra input, `u64` little-endian (present iff the flag is `1`) |
//! | `m` | the extra input (opaque bytes: cache salt, LoRA, multimodal hashes as the caller serialized them) |
//!
//! Every variable-length field is preceded by its length and every optional
//! one by a flag, so two different inputs never serialize to the same bytes.
//! Chaining through the parent makes a key name its whole prefix.
//!
//! A future change of any of this bumps the tag (`.../v2`), so keys of two
//! formats can never collide; the unit tests pin a known answer so an
//! accidental change fails.

/// First bytes of every hashed input: the key format and its version.
pub const KEY_FORMAT_TAG: &[u8; 16] = b"pegaflow-key/v1\0";

/// A block key.
pub type Key = [u8; 32];

/// Why a chain of keys could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("block_size is 0; pass the engine's block size in tokens")]
    ZeroBlockSize,
    #[error(
        "{extras} extra inputs for {blocks} full blocks; pass one per full block (None where a \
         block has none), or none at all"
    )]
    ExtraCount { blocks: usize, extras: usize },
}

/// The key of one block, given its parent's key.
pub fn block_key(parent: Option<&Key>, tokens: &[u32], extra: Option<&[u8]>) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(KEY_FORMAT_TAG);
    match parent {
        None => {
            h.update(&[0]);
        }
        Some(p) => {
            h.update(&[1]);
            h.update(p);
        }
    }
    // A block never has 2^32 tokens; saturate rather than wrap so a
    // pathological input cannot alias a shorter one's length field.
    let n = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    h.update(&n.to_le_bytes());
    // Token ids go in as one buffer: on little-endian machines that is the
    // slice itself, without a copy.
    h.update(&tokens_le_bytes(tokens));
    match extra {
        None => {
            h.update(&[0]);
        }
        Some(e) => {
            h.update(&[1]);
            h.update(&(e.len() as u64).to_le_bytes());
            h.update(e);
        }
    }
    *h.finalize().as_bytes()
}

#[cfg(target_endian = "little")]
fn tokens_le_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    // SAFETY: `u32` has no padding and any byte pattern is a valid `u8`;
    // the byte slice covers exactly the memory of `tokens` (len * 4 bytes,
    // alignment 1 <= 4) and borrows it for the same lifetime. On a
    // little-endian target these are the little-endian encodings.
    let bytes = unsafe {
        std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens))
    };
    std::borrow::Cow::Borrowed(bytes)
}

#[cfg(not(target_endian = "little"))]
fn tokens_le_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
}

/// The keys of the full blocks of `token_ids`, chained from `parent`.
///
/// `token_ids` starts at the first block to key; a trailing partial block
/// is ignored (only full blocks are keyed). `parent` is the key of the
/// block before the first one (`None` at the start of a sequence), so
/// extending a chain block by block gives the same keys as computing it at
/// once. `extra` is empty (no block has extra input) or has one entry per
/// full block.
pub fn chain_keys(
    parent: Option<&Key>,
    token_ids: &[u32],
    block_size: usize,
    extra: &[Option<&[u8]>],
) -> Result<Vec<Key>, KeyError> {
    if block_size == 0 {
        return Err(KeyError::ZeroBlockSize);
    }
    let blocks = token_ids.len() / block_size;
    if !extra.is_empty() && extra.len() != blocks {
        return Err(KeyError::ExtraCount {
            blocks,
            extras: extra.len(),
        });
    }
    let mut keys: Vec<Key> = Vec::with_capacity(blocks);
    for (i, tokens) in token_ids.chunks_exact(block_size).enumerate() {
        let prev = keys.last().or(parent);
        let e = extra.get(i).copied().flatten();
        let k = block_key(prev, tokens, e);
        keys.push(k);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(k: &Key) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn toks(n: u32) -> Vec<u32> {
        (0..n).map(|i| 1000 + i * 7).collect()
    }

    #[test]
    fn known_answer() {
        // Pins format v1 (values computed independently with the Python
        // `blake3` package from the format above): if this changes, the
        // format changed and the tag must be bumped, or keys saved by older
        // builds would silently never hit.
        let keys = chain_keys(None, &[1, 2, 3, 4, 5, 6, 7, 8], 4, &[]).unwrap();
        assert_eq!(
            hex(&keys[0]),
            "d88fdde6aac4c345a9aa86eb405f825dc547288c4efdfec946ac1fc15208718a"
        );
        assert_eq!(
            hex(&keys[1]),
            "04acd77084ac6e1cc955843e85cbd503ffda8acc4259cd2ae4f57dc47918da98"
        );
        let salted = chain_keys(None, &[1, 2, 3, 4], 4, &[Some(b"salt")]).unwrap();
        assert_eq!(
            hex(&salted[0]),
            "feb288395d8027c657b8f362dafda57dd55bfc7cb6e3735eb4a9a880f1cc67df"
        );
    }

    #[test]
    fn matches_the_documented_byte_format() {
        let parent = [9u8; 32];
        let mut input = Vec::new();
        input.extend_from_slice(b"pegaflow-key/v1\0");
        input.push(1);
        input.extend_from_slice(&parent);
        input.extend_from_slice(&3u32.to_le_bytes());
        for t in [5u32, 70_000, 0] {
            input.extend_from_slice(&t.to_le_bytes());
        }
        input.push(1);
        input.extend_from_slice(&4u64.to_le_bytes());
        input.extend_from_slice(b"salt");
        let want = *blake3::hash(&input).as_bytes();
        assert_eq!(
            block_key(Some(&parent), &[5, 70_000, 0], Some(b"salt")),
            want
        );
    }

    #[test]
    fn prefix_chained() {
        let t = toks(64);
        let all = chain_keys(None, &t, 16, &[]).unwrap();
        assert_eq!(all.len(), 4);
        // Extending from a parent gives the same keys as hashing at once.
        let head = chain_keys(None, &t[..32], 16, &[]).unwrap();
        let tail = chain_keys(Some(&head[1]), &t[32..], 16, &[]).unwrap();
        assert_eq!([head, tail].concat(), all);
        // The same block after a different prefix has a different key.
        let mut u = t.clone();
        u[0] += 1;
        let other = chain_keys(None, &u, 16, &[]).unwrap();
        for (a, b) in all.iter().zip(&other) {
            assert_ne!(a, b);
        }
        // A block's key depends on the block's own tokens too.
        let mut w = t.clone();
        w[63] += 1;
        let last = chain_keys(None, &w, 16, &[]).unwrap();
        assert_eq!(last[..3], all[..3]);
        assert_ne!(last[3], all[3]);
    }

    #[test]
    fn partial_block_ignored() {
        let t = toks(40);
        assert_eq!(
            chain_keys(None, &t, 16, &[]).unwrap(),
            chain_keys(None, &t[..32], 16, &[]).unwrap()
        );
        assert!(chain_keys(None, &t[..15], 16, &[]).unwrap().is_empty());
    }

    #[test]
    fn extra_changes_the_key_and_everything_after() {
        let t = toks(48);
        let plain = chain_keys(None, &t, 16, &[]).unwrap();
        let none = chain_keys(None, &t, 16, &[None, None, None]).unwrap();
        assert_eq!(plain, none, "no extra and explicit None are the same");
        let salted = chain_keys(None, &t, 16, &[Some(b"salt-a"), None, None]).unwrap();
        let salted_b = chain_keys(None, &t, 16, &[Some(b"salt-b"), None, None]).unwrap();
        for i in 0..3 {
            assert_ne!(salted[i], plain[i]);
            assert_ne!(salted[i], salted_b[i]);
        }
        // An empty extra is not the same as no extra.
        let empty = chain_keys(None, &t, 16, &[None, Some(b""), None]).unwrap();
        assert_eq!(empty[0], plain[0]);
        assert_ne!(empty[1], plain[1]);
    }

    #[test]
    fn fields_do_not_alias() {
        // Moving bytes between the tokens and the extra must change the key.
        let a = block_key(None, &[1, 2], Some(&[3, 0, 0, 0]));
        let b = block_key(None, &[1, 2, 3], None);
        assert_ne!(a, b);
        // The first block and a block whose parent is all zeroes differ.
        assert_ne!(
            block_key(None, &[1], None),
            block_key(Some(&[0; 32]), &[1], None)
        );
    }

    #[test]
    fn bad_arguments() {
        assert_eq!(chain_keys(None, &[1], 0, &[]), Err(KeyError::ZeroBlockSize));
        assert_eq!(
            chain_keys(None, &toks(32), 16, &[None]),
            Err(KeyError::ExtraCount {
                blocks: 2,
                extras: 1
            })
        );
    }
}
