//! The client listener on a Unix-domain socket (DESIGN.md section 13): `DIR/.s.PGSQL.PORT`,
//! libpq's naming, so `psql -h DIR -p PORT` reaches it. In a pod the application and tidepool
//! share the directory (an `emptyDir`), and half of every transaction's socket calls skip the
//! TCP stack.
//!
//! A socket file left by a crashed run is replaced only if nothing listens on it (a connect
//! is refused); if a live process answers, binding fails and tidepool exits 70. The file is
//! removed when the listener is dropped (the drain closes it together with the TCP listener).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// A bound Unix-socket listener that removes its file when dropped.
///
/// # Drop behaviour
///
/// Removes the socket file (a synchronous `unlink`, no I/O on the socket), so the next start
/// finds no stale file.
pub struct UnixSocket {
    pub listener: UnixListener,
    path: PathBuf,
}

/// Why the Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("another process is listening on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Io(PathBuf, io::Error),
}

impl UnixSocket {
    /// Bind `path` with permissions `mode`, replacing a stale socket file.
    pub fn bind(path: &Path, mode: u32) -> Result<UnixSocket, UnixSocketError> {
        let io_err = |e| UnixSocketError::Io(path.to_path_buf(), e);
        if path.exists() {
            // Live if something accepts a connection on it (a plain std connect: this runs
            // once, at start).
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(UnixSocketError::InUse(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "removing a stale Unix socket file");
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        Ok(UnixSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
