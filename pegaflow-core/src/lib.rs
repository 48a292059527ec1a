//! Engine-side library.
pub mod copy;
pub mod cuda;
pub mod layout;
pub mod transfer;
