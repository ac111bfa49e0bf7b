//! Snapshots inside the container: the on-disk layout, taking one with rsync, and copying
//! one back out. One file per concern:
//! - [`layout`]: the directories of a container, listing, new ids, pruning;
//! - [`rsync`]: the argv of a snapshot's rsync (exclusions) and what its output says;
//! - [`resume`]: continuing a snapshot an interrupted run left under `.partial/`;
//! - [`guard`]: what a snapshot must pass before it commits (mounted, not emptied, not
//!   shrunk);
//! - [`take`]: taking a snapshot, with its helper threads (metadata read-ahead,
//!   write-behind, hash-behind);
//! - [`copy_out`]: restore's copy, paced read-ahead and bulk read of the container;
//! - [`links`]: the names `--link-dest` linked unlike the source, copied again;
//! - [`filters`]: the profile's bandwidth limit and pattern files, and its exclude-if-present walk;
//! - [`walk`]: the parallel walker the read-aheads share.
//!
//! Layout (docs/layout.md; plain directories so a person can restore with `cp -a`):
//! ```text
//!   FORMAT                          "e2ebackup container format 1"
//!   snapshots/<id>/<absolute path>  complete snapshots, <id> = UTC time 20261122T123005Z
//!   manifests/<id>                  a hash of every file of snapshot <id> (`verify`, `restore`)
//!   STATE                           authenticated generation counter (see generation.rs)
//!   .partial/<id>/...               a snapshot being written (or interrupted: resumed)
//!   .partial/<id>.resume            what the next run needs to resume it
//! ```
//! A snapshot is written under `.partial/` and renamed into `snapshots/` only after rsync
//! succeeded and the filesystem was synced, so a run that is interrupted, killed or fails
//! never leaves anything that looks complete; rename within one filesystem is atomic.
//! Unchanged files are hard links to the newest complete snapshot (`--link-dest`), so every
//! snapshot is a full tree while only changed files take space.

pub mod copy_out;
pub mod filters;
pub mod guard;
pub mod layout;
pub mod links;
pub mod resume;
pub mod rsync;
pub mod take;
pub mod walk;

pub use copy_out::{copy_out, warm_snapshot, Pace, Warm, Warmed};
pub use guard::Guard;
pub use layout::{
    check_layout, create_layout, list, new_id, path_of, prune, remove_partials, remove_tree,
    FORMAT_LINE, PARTIAL, SNAPSHOTS,
};
pub use resume::{settle as settle_partials, Resumable};
pub use rsync::{always_excluded, dry_run_command, rsync_command, PSEUDO_DIRS};
pub use take::{take, take_guarded, ContainerFull, Resumed, Taken};
pub use walk::prefetch_metadata;
