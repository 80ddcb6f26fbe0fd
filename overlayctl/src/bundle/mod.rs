//! Signed delta bundles: one file carrying the layer from one tree to another, for devices that
//! receive updates from a build server.
//!
//! ```text
//! "STRATAB\x03" | u64 LE manifest length | manifest (zstd of JSON) | u32 LE signature count
//!              | count x (32-byte ed25519 public key, 64-byte signature) | payload
//! ```
//!
//! The manifest names the tree the bundle applies to (`base`, a digest of the whole merged
//! tree) and the tree it gives (`target`), lists the payload's parts, and lists every entry of
//! the layer in tree order with its metadata and, for files, the blake3 hash of the content and
//! where the content comes from. The payload is a row of parts, each one zstd frame: most hold
//! up to [`PART_LIMIT`] bytes of many files (three regions: the controls of binary diffs, the
//! bytes they add to the base's, and literal bytes), so similar files compress together, and
//! the device decompresses one part at a time; a file too large for a part is streamed in a part
//! of its own. A file is `whole`, a `bsdiff` against a base file (at its path, or an earlier
//! version under another name, whose hash is recorded too), or `basis` (the base's, unchanged);
//! a `gzip -9n` file may travel as its content and be compressed again ([`gzip`]). Signatures
//! cover the manifest; the manifest covers every byte that is rebuilt, because each rebuilt file
//! is checked against its hash, and the whole result against `target`, before the layer is
//! added. Bundles of another format version are refused by that version.

mod apply;
mod create;
mod diff;
mod format;
mod gzip;
mod keys;

pub use create::{Created, create, hash_by_reading, tree_digest};
pub use format::{Bundle, BundleHead, BundleManifest, DELTA_LIMIT, Data, Entry, PART_LIMIT, Part};
pub use keys::{format_public, format_secret, generate_key, parse_public, parse_secret};
