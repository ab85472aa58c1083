//! The filesystem core's error type, and the one place where errors become errno values.

use crate::backend::{BackendError, ErrorKind};

/// Why a filesystem operation failed. Each variant maps to exactly one errno in [`FsError::errno`].
#[derive(Debug, Clone)]
pub enum FsError {
    NotFound,
    Exists,
    NotEmpty,
    NotDir,
    IsDir,
    NameTooLong,
    FileTooBig,
    /// Bad argument (invalid JSON, expiration too soon, bad name).
    Invalid(String),
    /// Argument too large (metadata over 1024 bytes).
    TooBig(String),
    NoData,
    /// Refused: an operation kvfs does not offer (setting an xattr it does not know).
    NotSupported,
    /// An xattr namespace kvfs has nothing in (ACLs, security labels): asked routinely by
    /// `ls -l` and by the kernel before each write, so not worth a line in the log.
    NoXattrs,
    ReadOnly,
    Perm,
    CrossDevice,
    /// Local I/O in the cache dir failed.
    Io(String),
    /// The store refused or could not be reached.
    Backend(BackendError),
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        use libc::*;
        match self {
            FsError::NotFound => ENOENT,
            FsError::Exists => EEXIST,
            FsError::NotEmpty => ENOTEMPTY,
            FsError::NotDir => ENOTDIR,
            FsError::IsDir => EISDIR,
            FsError::NameTooLong => ENAMETOOLONG,
            FsError::FileTooBig => EFBIG,
            FsError::Invalid(_) => EINVAL,
            FsError::TooBig(_) => E2BIG,
            FsError::NoData => ENODATA,
            FsError::NotSupported | FsError::NoXattrs => ENOTSUP,
            FsError::ReadOnly => EROFS,
            FsError::Perm => EPERM,
            FsError::CrossDevice => EXDEV,
            FsError::Io(_) => EIO,
            FsError::Backend(e) => match e.kind {
                ErrorKind::NotFound => ENOENT,
                ErrorKind::Exists => EEXIST,
                ErrorKind::Denied => EACCES,
                ErrorKind::TooLarge => EFBIG,
                ErrorKind::NameTooLong => ENAMETOOLONG,
                ErrorKind::Invalid => EINVAL,
                // Rate limits, 5xx and transport failures outlived the client's retries.
                ErrorKind::Unavailable => EIO,
            },
        }
    }

    /// How worth a line in the log this error is: trouble (local I/O, the API) is a warning,
    /// refused input one informational line, and answers such as ENOENT are routine.
    pub fn severity(&self) -> Severity {
        match self {
            FsError::Io(_) | FsError::Backend(_) => Severity::Trouble,
            FsError::Invalid(_)
            | FsError::TooBig(_)
            | FsError::NameTooLong
            | FsError::FileTooBig
            | FsError::ReadOnly
            | FsError::Perm
            | FsError::NotSupported
            | FsError::CrossDevice => Severity::Refused,
            _ => Severity::Routine,
        }
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsError::Invalid(m) | FsError::TooBig(m) | FsError::Io(m) => f.write_str(m),
            FsError::Backend(e) => write!(f, "{e}"),
            other => write!(f, "{}", std::io::Error::from_raw_os_error(other.errno())),
        }
    }
}

impl From<BackendError> for FsError {
    fn from(e: BackendError) -> Self {
        match e.kind {
            ErrorKind::NotFound => FsError::NotFound,
            ErrorKind::Exists => FsError::Exists,
            _ => FsError::Backend(e),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError::Io(e.to_string())
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// See [`FsError::severity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Trouble,
    Refused,
    Routine,
}
