//! Files and folders clx-pool creates (the database, its pid file, worker
//! logs, the workspace): with modes that do not depend on the umask (never
//! world-writable), and never written through a symlink someone put in
//! their place.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the files clx-pool creates (the database, its pid file, logs),
/// set explicitly so it does not depend on the umask.
pub const FILE_MODE: u32 = 0o644;
/// Mode of the folders it creates.
pub const DIR_MODE: u32 = 0o755;

/// Refuses, at once and without opening it, a path that exists and is not
/// a regular file: opening a FIFO waits for a writer, a device may block or
/// never end, so reading either would stop the reader for ever.
pub fn regular_or_missing(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file"),
    ))
}

/// Reads a whole regular file (see [`regular_or_missing`]).
pub fn read_regular(path: &Path) -> std::io::Result<String> {
    regular_or_missing(path)?;
    std::fs::read_to_string(path)
}

/// Creates `dir` and its missing parents with [`DIR_MODE`] (never
/// world-writable, whatever the umask).
pub fn create_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    for d in missing {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Creates (or opens for appending) a file clx-pool writes, without
/// following a symlink at `path`, with [`FILE_MODE`] whatever the umask.
pub fn open_own_file(path: &Path, append: bool) -> std::io::Result<File> {
    let existed = path.exists();
    let f = OpenOptions::new()
        .read(!append)
        .write(!append)
        .append(append)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a symbolic link; clx-pool does not write through one",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
    if !existed {
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(f)
}
