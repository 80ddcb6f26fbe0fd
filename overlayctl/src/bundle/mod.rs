//! Signed delta bundles: one file carrying the layer from one tree to another, for devices that
//! receive updates from a build server.
//!
//! ```text
//! "STRATAB\x02" | u64 LE manifest length | manifest (TOML) | u32 LE signature count
//!              | count x (32-byte ed25519 public key, 64-byte signature) | payload
//! ```
//!
//! The manifest names the tree the bundle applies to (`base`, a digest of the whole merged
//! tree) and the tree it gives (`target`), and lists every entry of the layer in tree order with
//! its metadata and, for files, the blake3 hash of the content and where the content is in the
//! payload: zstd-compressed whole, or a zstd-compressed fast_rsync delta against the file the
//! base tree has at that path (whose hash is recorded too). Signatures cover the manifest; the
//! manifest covers every byte that is rebuilt, because each rebuilt file is checked against its
//! hash before the layer is added.

mod apply;
mod create;
mod format;
mod keys;

pub use create::{Created, create, hash_by_reading, tree_digest};
pub use format::{Bundle, BundleHead, BundleManifest, DELTA_LIMIT, Data, Entry};
pub use keys::{format_public, format_secret, generate_key, parse_public, parse_secret};
