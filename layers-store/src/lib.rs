//! The Strata store on disk, shared by the boot hook and `overlayctl`: its layout ([`layout`],
//! every folder and `/run/strata` path defined once), directory handles that never leave it
//! ([`dir`]), the plan and boot state written atomically ([`files`]), opening and locking it
//! ([`store`]), the one way layers are deleted ([`sweep`]), and the overlay mount call
//! ([`mount`]).

pub mod adopt;
pub mod dir;
pub mod files;
pub mod kernel;
pub mod layout;
pub mod mount;
pub mod release;
pub mod store;
pub mod sweep;

pub use dir::{Dir, DirError};
pub use files::Loaded;
pub use layout::Folder;
pub use store::{Leftovers, Store, StoreError, StoreLock};
pub use sweep::{Decision, Swept, decide};
