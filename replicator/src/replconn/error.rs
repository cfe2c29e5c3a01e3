//! The single error type of the replication connection client.
//!
//! It owns the classification of every way a replication session can fail and
//! where that fault came from: the caller (bad parameters or arguments), the
//! network (IO, closed socket), or the upstream PostgreSQL (ErrorResponse, a
//! message we did not expect, bytes that are not a valid message, an
//! authentication method we cannot speak, a replication payload pgoutput cannot
//! decode). It must never carry a password or row data: errors end up in logs.

use std::fmt;
use std::io;

use crate::pgoutput::PgOutputError;

/// Everything that can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Caller: the connection parameters (or URL) are unusable.
    #[error("invalid connection parameters: {0}")]
    Config(String),
    /// Caller: an argument cannot be sent on the wire (NUL byte, empty slot
    /// name, a stream that was already stopped).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Network: reading or writing the socket failed.
    #[error("I/O error on the replication connection: {0}")]
    Io(#[from] io::Error),
    /// Network, upstream or caller: TLS could not be set up as `sslmode` demands
    /// (the server refused it, its certificate failed verification).
    #[error("{0}")]
    Tls(#[from] crate::pgtls::PgTlsError),
    /// Network or upstream: the server closed the socket. `mid_frame` is true when
    /// it did so in the middle of a message.
    #[error("PostgreSQL closed the connection{}", if *.mid_frame { " in the middle of a message" } else { "" })]
    Closed { mid_frame: bool },
    /// Upstream: PostgreSQL sent an ErrorResponse.
    #[error("PostgreSQL {severity} {code}: {message}{}", Detail(.detail))]
    Server {
        /// SQLSTATE, e.g. `28P01` for a wrong password.
        code: String,
        /// The primary human-readable message (`M` field).
        message: String,
        /// `ERROR`, `FATAL` or `PANIC` (the non-localized `V` field when sent).
        severity: String,
        /// The optional `D` field.
        detail: Option<String>,
    },
    /// Upstream: a well-formed message that makes no sense at this point of the
    /// protocol (e.g. a CopyInResponse to START_REPLICATION).
    #[error("unexpected {} message while {during}", Tag(*.tag))]
    UnexpectedMessage { tag: u8, during: &'static str },
    /// Upstream: bytes that can never be a valid message of this type.
    #[error("malformed {} message: {reason}", Tag(*.tag))]
    Malformed { tag: u8, reason: &'static str },
    /// Upstream: the server asked for an authentication method we do not speak
    /// (Kerberos, GSSAPI, SSPI, SCRAM with channel binding only, ...).
    #[error("server requested {method} authentication, which is not supported")]
    UnsupportedAuth { method: String },
    /// Caller: the server asked for a password and none is configured.
    #[error("server requested password authentication but no password is configured")]
    PasswordMissing,
    /// Upstream: the SCRAM-SHA-256 exchange failed (bad server nonce, bad server
    /// signature, ...).
    #[error("SCRAM-SHA-256 authentication failed: {0}")]
    Scram(#[source] io::Error),
    /// Upstream: a CopyData payload is not a valid replication message.
    #[error("cannot decode replication message: {0}")]
    Decode(#[from] PgOutputError),
}

impl ReplError {
    /// The SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True when the session is gone because the other side went away (socket
    /// reset or closed, server shutting down or terminating the backend). These
    /// are expected during failovers and restarts: reconnect, and keep them out of
    /// the error log.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            // Class 57P: operator intervention (admin_shutdown, crash_shutdown,
            // cannot_connect_now, idle_session_timeout, database_dropped).
            Self::Server { code, .. } => code.starts_with("57P"),
            _ => false,
        }
    }
}

/// Shows a protocol tag byte as `'E'` when printable and `0x00` otherwise.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Appends ` (DETAIL)` when the server sent a detail field.
struct Detail<'a>(&'a Option<String>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, " ({d})"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_displays_code_and_detail() {
        let e = ReplError::Server {
            code: "42704".into(),
            message: "replication slot \"x\" does not exist".into(),
            severity: "ERROR".into(),
            detail: None,
        };
        assert_eq!(
            e.to_string(),
            "PostgreSQL ERROR 42704: replication slot \"x\" does not exist"
        );
        assert_eq!(e.sqlstate(), Some("42704"));
        assert!(!e.is_disconnect());
    }

    #[test]
    fn classifies_disconnects() {
        assert!(ReplError::Closed { mid_frame: false }.is_disconnect());
        assert!(ReplError::Io(io::ErrorKind::ConnectionReset.into()).is_disconnect());
        let shutdown = ReplError::Server {
            code: "57P01".into(),
            message: "terminating connection due to administrator command".into(),
            severity: "FATAL".into(),
            detail: None,
        };
        assert!(shutdown.is_disconnect());
        assert!(!ReplError::PasswordMissing.is_disconnect());
    }

    #[test]
    fn tags_display_printable_or_hex() {
        let e = ReplError::UnexpectedMessage {
            tag: b'G',
            during: "starting replication",
        };
        assert_eq!(
            e.to_string(),
            "unexpected 'G' message while starting replication"
        );
        let e = ReplError::Malformed {
            tag: 0,
            reason: "x",
        };
        assert_eq!(e.to_string(), "malformed 0x00 message: x");
    }
}
