//! The Strata plan: its model and TOML format, validation with located errors, the legacy XO
//! `.overlayplan` import, kernel command-line overrides, boot state, and the pure function that
//! turns all of them into the stack of layers to mount.
//!
//! Parsers take text and resolution is pure: reading and writing the files, and mounting, live
//! in the `layers-store` crate.

pub mod age;
pub mod booted;
pub mod cmdline;
pub mod error;
pub mod fault;
pub mod legacy;
pub mod lock;
pub mod name;
pub mod plan;
pub mod resolve;
pub mod size;
pub mod state;

pub use age::Age;
pub use booted::Booted;
pub use cmdline::{BootOverrides, CmdlineProblem};
pub use error::{Location, NameProblem, PlanError};
pub use name::{check_name, printable};
pub use plan::{
    BootSettings, Layer, LayerState, MenuMode, OnRollback, Plan, Policy, UpperMode, UpperSettings,
};
pub use resolve::{LeftOut, Note, Reason, Resolution, resolve};
pub use size::ByteSize;
pub use state::{ArchivedUpper, BootState, Checkpoint, LastBoot, OneShot, StoreRecord};
pub use toml::value::Datetime;
