//! The layer engine: overlay semantics on disk. Layers are read into trees ([`tree`]), stacks
//! merged as the kernel would merge them ([`merge`]), and layers described by a canonical
//! manifest and digest ([`manifest`]); the layer between a stack and a target tree is
//! [`delta`], and the layer that replaces a run of layers is [`compact`]ed.

pub mod compact;
pub mod copy;
pub mod delta;
pub(crate) mod longpath;
pub mod manifest;
pub mod merge;
pub mod tree;

pub use manifest::Manifest;
pub use merge::{MergedNode, MergedView};
pub use tree::{Kind, Layer, LayerError, Meta, Node, XattrNs};
