//! Live migration and snapshots: QEMU's pre-copy engine with its
//! vocabulary (states, capabilities, parameters, `query-migrate`), over a
//! versioned, checked stream (see docs/migration.md).
//!
//! The engine is independent of KVM: the VMM gives it guest memory, dirty
//! bitmaps, pause/resume and state blobs through [`source::MigratableVm`].

pub mod destination;
mod multifd;
pub(crate) mod pagemap;
pub mod params;
mod sender;
pub mod source;
pub mod stream;
pub mod transport;
pub mod xbzrle;

pub use destination::{receive, DestinationError, Received};
pub use params::{Capabilities, MigrationInfo, MigrationStatus, Parameters, ParamsError};
pub use source::{
    migrate, DirtyBitmap, MigratableVm, MigrationControl, SavedState, SourceError, VmOpError,
};
pub use transport::{Incoming, MigrationUri, Outgoing, TransportError};

/// The page size of the stream and of every dirty bitmap.
pub const PAGE_SIZE: usize = 4096;

/// Whether a page holds only zero bytes (sent as a flag, not data): an OR
/// over each 64-byte block, which the compiler vectorises, with an early
/// exit between blocks.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}
