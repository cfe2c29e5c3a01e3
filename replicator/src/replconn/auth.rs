//! Session startup: the startup packet, authentication, and waiting for the
//! server to become ready.
//!
//! This file owns the client side of PostgreSQL's authentication exchange for
//! trust, cleartext password, MD5 and SCRAM-SHA-256 (the hashing and the SCRAM
//! state machine come from `postgres-protocol`), and collects the ParameterStatus
//! and BackendKeyData messages that follow. It must never log or put the password
//! into an error, and never accept a SCRAM exchange whose server signature does
//! not verify: that would let an impostor server pretend to know the password.

use std::collections::HashMap;

use bytes::Bytes;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tracing::{debug, info, warn};

use super::backend::{Authentication, BackendMessage, ErrorFields};
use super::frontend::FrontendMessage;
use super::transport::Transport;
use super::{ConnParams, ReplError};

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The identity of a server backend, for CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub process_id: i32,
    pub secret_key: i32,
}

/// What the server told us during startup.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// ParameterStatus values (`server_version`, `client_encoding`, ...), kept up
    /// to date by later ParameterStatus messages.
    pub parameters: HashMap<String, String>,
    pub backend_key: Option<BackendKey>,
}

/// The startup packet of a logical replication session.
pub fn startup_message(params: &ConnParams) -> FrontendMessage {
    let pairs = [
        ("user", params.user.as_str()),
        ("database", params.dbname.as_str()),
        // Logical walsender that also accepts SQL.
        ("replication", "database"),
        ("application_name", params.application_name.as_str()),
        // Our decoders treat server text as UTF-8.
        ("client_encoding", "UTF8"),
        // Value text must not depend on the server's output settings: the same
        // settings PostgreSQL's own logical replication workers use, plus UTC so a
        // timestamptz key prints the same in every region.
        ("DateStyle", "ISO"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "3"),
        ("TimeZone", "UTC"),
    ];
    FrontendMessage::Startup {
        params: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// Sends the startup packet, authenticates, and reads until ReadyForQuery.
pub async fn startup(t: &mut Transport, params: &ConnParams) -> Result<Session, ReplError> {
    t.send(&startup_message(params)).await?;
    authenticate(t, params).await?;
    let mut session = Session::default();
    loop {
        match t.recv().await? {
            BackendMessage::ParameterStatus { name, value } => {
                session.parameters.insert(name, value);
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => {
                session.backend_key = Some(BackendKey {
                    process_id,
                    secret_key,
                });
            }
            BackendMessage::ReadyForQuery { .. } => return Ok(session),
            BackendMessage::ErrorResponse(e) => return Err(e.into_error()),
            BackendMessage::NoticeResponse(n) => log_notice(&n),
            other => {
                return Err(ReplError::UnexpectedMessage {
                    tag: other.tag(),
                    during: "session startup",
                })
            }
        }
    }
}

/// Answers authentication requests until AuthenticationOk.
async fn authenticate(t: &mut Transport, params: &ConnParams) -> Result<(), ReplError> {
    let password = || params.password.as_deref().ok_or(ReplError::PasswordMissing);
    let mut scram: Option<ScramSha256> = None;
    loop {
        let auth = match t.recv().await? {
            BackendMessage::Authentication(a) => a,
            BackendMessage::ErrorResponse(e) => return Err(e.into_error()),
            BackendMessage::NoticeResponse(n) => {
                log_notice(&n);
                continue;
            }
            BackendMessage::NegotiateProtocolVersion { newest_minor, .. } => {
                // We ask for 3.0 and no _pq_ options, so this is informational.
                debug!(newest_minor, "server negotiated protocol version");
                continue;
            }
            other => {
                return Err(ReplError::UnexpectedMessage {
                    tag: other.tag(),
                    during: "authentication",
                })
            }
        };
        let reply = match auth {
            Authentication::Ok => {
                if scram.is_some() {
                    // The server must prove it knows the password before we
                    // accept the session.
                    return Err(ReplError::UnexpectedMessage {
                        tag: b'R',
                        during: "SCRAM authentication (AuthenticationOk before SASLFinal)",
                    });
                }
                return Ok(());
            }
            Authentication::CleartextPassword => {
                FrontendMessage::Password(Bytes::copy_from_slice(password()?.as_bytes()))
            }
            Authentication::Md5Password { salt } => {
                let hash = md5_hash(params.user.as_bytes(), password()?.as_bytes(), salt);
                FrontendMessage::Password(Bytes::from(hash.into_bytes()))
            }
            Authentication::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    // SCRAM-SHA-256-PLUS needs TLS channel binding.
                    return Err(ReplError::UnsupportedAuth {
                        method: format!("SASL ({})", mechanisms.join(", ")),
                    });
                }
                // No TLS, so no channel binding: the client-first message says
                // "n" (client does not support it), which the server accepts.
                let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                let msg = FrontendMessage::SaslInitialResponse {
                    mechanism: SCRAM_SHA_256.to_owned(),
                    data: Bytes::copy_from_slice(s.message()),
                };
                scram = Some(s);
                msg
            }
            Authentication::SaslContinue(data) => {
                let s = scram.as_mut().ok_or(ReplError::UnexpectedMessage {
                    tag: b'R',
                    during: "authentication (SASLContinue without SASL)",
                })?;
                s.update(&data).map_err(ReplError::Scram)?;
                FrontendMessage::SaslResponse(Bytes::copy_from_slice(s.message()))
            }
            Authentication::SaslFinal(data) => {
                let mut s = scram.take().ok_or(ReplError::UnexpectedMessage {
                    tag: b'R',
                    during: "authentication (SASLFinal without SASL)",
                })?;
                s.finish(&data).map_err(ReplError::Scram)?;
                continue;
            }
            Authentication::Unsupported { code, .. } => {
                return Err(ReplError::UnsupportedAuth {
                    method: Authentication::method_name(code),
                })
            }
        };
        t.send(&reply).await?;
    }
}

/// Notices are the server talking to a human; log them as fields, loud only
/// when PostgreSQL itself calls it a warning.
pub fn log_notice(n: &ErrorFields) {
    if n.severity() == "WARNING" {
        warn!(
            code = n.code(),
            message = n.message(),
            "PostgreSQL warning on replication connection"
        );
    } else {
        info!(
            severity = n.severity(),
            code = n.code(),
            message = n.message(),
            "PostgreSQL notice on replication connection"
        );
    }
}
