//! NATS: the only module that knows subjects, headers and wire encodings.
//!
//! Contract (subjects and queue group are configurable, `[subjects]`):
//! - `fraud.check`, queue group `fraudgate`: request-reply. The reply is the decision JSON,
//!   or `{"id": ..., "error": {"code": ..., "message": ...}}` for bad input.
//! - `fraud.txn`, queue group `fraudgate`: asynchronous intake. Each decision is published
//!   to `fraud.decision.<action>`; bad input goes to `fraud.invalid` (the original payload,
//!   the reason in headers).
//! - Decisions carry the headers `Nats-Msg-Id` (the transaction id), `Fraudgate-Action` and
//!   `Fraudgate-Rules-Version`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Subject, Subscriber};
use bytes::Bytes;

use crate::config::{parse_duration, NatsSection, SubjectsSection};
use crate::decision::Decision;
use crate::telemetry::Counters;
use crate::txn::{DecodeError, ErrorCode, Transaction};

pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
pub const HEADER_ACTION: &str = "Fraudgate-Action";
pub const HEADER_VERSION: &str = "Fraudgate-Rules-Version";
pub const HEADER_ERROR_CODE: &str = "Fraudgate-Error-Code";
pub const HEADER_ERROR: &str = "Fraudgate-Error";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("NATS configuration: {0}")]
    Config(String),
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
}

fn secret(
    value: &Option<String>,
    env: &Option<String>,
    what: &str,
) -> Result<Option<String>, TransportError> {
    match env {
        Some(var) => std::env::var(var).map(Some).map_err(|_| {
            TransportError::Config(format!("{what}_env names `{var}`, which is not set"))
        }),
        None => Ok(value.clone()),
    }
}

/// Connects with the configured auth and TLS. The client reconnects by itself, forever;
/// disconnects, reconnects and slow-consumer drops are logged and counted.
pub async fn connect(
    nats: &NatsSection,
    url: &str,
    counters: Arc<Counters>,
) -> Result<Client, TransportError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(&nats.name)
        .subscription_capacity(nats.subscription_capacity.max(1))
        .max_reconnects(None)
        .connection_timeout(
            parse_duration(&nats.connect_timeout)
                .map_err(|e| TransportError::Config(format!("connect_timeout: {e}")))?,
        );
    if let Some(path) = &nats.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| TransportError::Credentials {
                path: path.clone(),
                source,
            })?;
    }
    let password = secret(&nats.password, &nats.password_env, "password")?;
    if let (Some(user), Some(pass)) = (&nats.user, password) {
        opts = opts.user_and_password(user.clone(), pass);
    } else if nats.user.is_some() {
        return Err(TransportError::Config(
            "user is set but neither password nor password_env".into(),
        ));
    }
    if let Some(token) = secret(&nats.token, &nats.token_env, "token")? {
        opts = opts.token(token);
    }
    if let Some(ca) = &nats.tls_ca {
        opts = opts.add_root_certificates(ca.into());
    }
    match (&nats.tls_cert, &nats.tls_key) {
        (Some(c), Some(k)) => opts = opts.add_client_certificate(c.into(), k.into()),
        (None, None) => {}
        _ => {
            return Err(TransportError::Config(
                "tls_cert and tls_key must be set together".into(),
            ))
        }
    }
    if nats.tls_required {
        opts = opts.require_tls(true);
    }
    let c = counters.clone();
    opts = opts.event_callback(move |event| {
        let c = c.clone();
        async move {
            use async_nats::Event;
            match event {
                Event::Connected => {
                    c.connected();
                    tracing::info!("NATS connected");
                }
                Event::Disconnected => {
                    c.disconnected();
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                Event::SlowConsumer(sid) => {
                    c.slow_consumer();
                    tracing::warn!(sid, "NATS slow consumer: messages dropped");
                }
                Event::LameDuckMode => tracing::warn!("NATS server entering lame duck mode"),
                Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                Event::ClientError(e) => tracing::error!(error = %e, "NATS client error"),
                Event::Draining | Event::Closed => tracing::info!(%event, "NATS"),
            }
        }
    });
    let urls: Vec<String> = url
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let client = opts
        .connect(urls)
        .await
        .map_err(|source| TransportError::Connect {
            url: url.to_string(),
            source,
        })?;
    Ok(client)
}

/// Where a decided transaction's answer goes.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Request-reply: the requester's inbox (none when the sender did not ask for one).
    Check(Option<Subject>),
    /// Asynchronous: the decision subject of its action.
    Stream,
}

/// Subject and encoding knowledge, shared by the intake and the workers.
#[derive(Clone)]
pub struct Wire {
    pub client: Client,
    pub subjects: SubjectsSection,
    pub max_payload: usize,
}

impl Wire {
    pub async fn subscribe_check(&self) -> Result<Subscriber, TransportError> {
        self.queue_subscribe(&self.subjects.check).await
    }

    pub async fn subscribe_txn(&self) -> Result<Subscriber, TransportError> {
        self.queue_subscribe(&self.subjects.txn).await
    }

    async fn queue_subscribe(&self, subject: &str) -> Result<Subscriber, TransportError> {
        self.client
            .queue_subscribe(subject.to_string(), self.subjects.queue_group.clone())
            .await
            .map_err(|source| TransportError::Subscribe {
                subject: subject.to_string(),
                source,
            })
    }

    /// Decodes a payload, enforcing the size limit first.
    pub fn decode(&self, payload: &[u8]) -> Result<Transaction, DecodeError> {
        if payload.len() > self.max_payload {
            return Err(DecodeError {
                code: ErrorCode::Oversized,
                message: format!(
                    "payload of {} bytes is over the limit of {} bytes",
                    payload.len(),
                    self.max_payload
                ),
                id: None,
            });
        }
        Transaction::from_json(payload)
    }

    fn decision_headers(d: &Decision) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_MSG_ID, d.id.as_str());
        h.insert(HEADER_ACTION, d.action.as_str());
        h.insert(HEADER_VERSION, &*d.rules_version);
        h
    }

    /// Sends a decision where it belongs. Errors are returned for counting; the client
    /// buffers publishes while disconnected.
    pub async fn deliver(
        &self,
        reply: &Reply,
        d: &Decision,
    ) -> Result<(), async_nats::PublishError> {
        let body = Bytes::from(d.to_json());
        match reply {
            Reply::Check(Some(inbox)) => {
                self.client
                    .publish_with_headers(inbox.clone(), Self::decision_headers(d), body)
                    .await
            }
            Reply::Check(None) => Ok(()),
            Reply::Stream => {
                let subject = format!("{}.{}", self.subjects.decision_prefix, d.action.as_str());
                self.client
                    .publish_with_headers(subject, Self::decision_headers(d), body)
                    .await
            }
        }
    }

    /// Answers a request with an error object.
    pub async fn reply_error(
        &self,
        inbox: Subject,
        e: &DecodeError,
    ) -> Result<(), async_nats::PublishError> {
        let body = error_json(e);
        let mut h = HeaderMap::new();
        h.insert(HEADER_ERROR_CODE, e.code.as_str());
        self.client
            .publish_with_headers(inbox, h, Bytes::from(body))
            .await
    }

    /// Forwards an invalid asynchronous payload, unchanged, with the reason in headers.
    pub async fn publish_invalid(
        &self,
        payload: Bytes,
        e: &DecodeError,
    ) -> Result<(), async_nats::PublishError> {
        let mut h = HeaderMap::new();
        h.insert(HEADER_ERROR_CODE, e.code.as_str());
        h.insert(HEADER_ERROR, header_safe(&e.message).as_str());
        if let Some(id) = &e.id {
            h.insert(HEADER_MSG_ID, header_safe(id).as_str());
        }
        self.client
            .publish_with_headers(self.subjects.invalid.clone(), h, payload)
            .await
    }

    /// Pushes buffered publishes to the server.
    pub async fn flush(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.client.flush()).await,
            Ok(Ok(()))
        )
    }
}

/// `{"id": ..., "error": {"code": ..., "message": ...}}`
pub fn error_json(e: &DecodeError) -> String {
    serde_json::json!({
        "id": e.id,
        "error": {"code": e.code.as_str(), "message": e.message},
    })
    .to_string()
}

/// Header values cannot hold line breaks.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_shape() {
        let e = Transaction::from_json(br#"{"id":"x1","card":"c","amount":-1}"#).unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&error_json(&e)).unwrap();
        assert_eq!(v["id"], "x1");
        assert_eq!(v["error"]["code"], "negative_amount");
        assert!(v["error"]["message"].as_str().unwrap().contains(">= 0"));
        let e = Transaction::from_json(b"{").unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&error_json(&e)).unwrap();
        assert!(v["id"].is_null());
        assert_eq!(header_safe("a\nb\rc"), "a b c");
    }
}
