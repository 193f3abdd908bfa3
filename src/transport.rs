//! NATS: the only module that knows subjects, headers and wire encodings.
//!
//! Contract (subjects and queue group are configurable, `[subjects]`):
//! - `fraud.check`, queue group `fraudgate`: request-reply. The reply is the decision JSON,
//!   or `{"id": ..., "error": {"code": ..., "message": ...}}` for bad input.
//! - `fraud.txn`, queue group `fraudgate`: asynchronous intake. Each decision is published
//!   to `fraud.decision.<action>`; bad input goes to `fraud.invalid` (the original payload,
//!   the reason in headers), and so does a transaction the engine failed to decide (code
//!   `internal`, the transaction re-encoded).
//! - `fraud.outcome`, queue group `fraudgate`: outcomes reported after a decision
//!   ([`crate::feedback`]), on a connection of their own. A request is answered
//!   `{"id": ..., "outcome": ..., "counted": true|false}` or with the error object; a bad
//!   one published without a reply subject goes to `fraud.invalid` like a bad transaction.
//! - Published decisions carry the headers `Nats-Msg-Id` (the transaction id),
//!   `Fraudgate-Action` and `Fraudgate-Rules-Version`; a decision reply is the bare JSON, an
//!   error reply has the `Fraudgate-Error-Code` header.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, Subject, Subscriber};
use bytes::Bytes;

use crate::config::{parse_duration, JetStreamSection, NatsSection, SubjectsSection};
use crate::decision::{Action, Decision};
use crate::feedback::Feedback;
use crate::telemetry::Counters;
use crate::txn::{DecodeError, ErrorCode, Transaction};

pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
pub const HEADER_ACTION: &str = "Fraudgate-Action";
pub const HEADER_VERSION: &str = "Fraudgate-Rules-Version";
pub const HEADER_ERROR_CODE: &str = "Fraudgate-Error-Code";
pub const HEADER_ERROR: &str = "Fraudgate-Error";
/// On `fraud.invalid`: the payload was cut to fit the server's message limit; the value
/// is its full length in bytes.
pub const HEADER_TRUNCATED: &str = "Fraudgate-Truncated";

/// An outcome may be this many times `[limits] max_payload`: it carries the decision.
pub const OUTCOME_PAYLOAD_FACTOR: usize = 16;

// Built once: a header name made from a `&str` is copied into a fresh allocation on every
// message.
const NAME_MSG_ID: HeaderName = HeaderName::from_static(HEADER_MSG_ID);
const NAME_ACTION: HeaderName = HeaderName::from_static(HEADER_ACTION);
const NAME_VERSION: HeaderName = HeaderName::from_static(HEADER_VERSION);

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
    #[error("JetStream: {what}: {message}")]
    JetStream { what: String, message: String },
}

fn js_err(what: impl Into<String>) -> impl FnOnce(String) -> TransportError {
    let what = what.into();
    move |message| TransportError::JetStream { what, message }
}

fn secret(
    value: &Option<String>,
    env: &Option<String>,
    what: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, TransportError> {
    match (value, env) {
        (Some(_), Some(_)) => Err(TransportError::Config(format!(
            "set either {what} or {what}_env, not both"
        ))),
        (_, Some(var)) => lookup(var).map(Some).ok_or_else(|| {
            TransportError::Config(format!("{what}_env names `{var}`, which is not set"))
        }),
        (v, None) => Ok(v.clone()),
    }
}

/// How to authenticate, from `[nats]`. Exactly one method (or none) may be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
    CredentialsFile(String),
}

/// Checks the auth settings and resolves secrets (`lookup` reads environment variables).
pub fn auth_plan(
    nats: &NatsSection,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Auth, TransportError> {
    let password = secret(&nats.password, &nats.password_env, "password", lookup)?;
    let token = secret(&nats.token, &nats.token_env, "token", lookup)?;
    let mut methods = Vec::new();
    match (&nats.user, password) {
        (Some(u), Some(p)) => methods.push(Auth::UserPassword(u.clone(), p)),
        (Some(_), None) => {
            return Err(TransportError::Config(
                "user is set but neither password nor password_env".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(TransportError::Config(
                "password is set but user is not".into(),
            ))
        }
        (None, None) => {}
    }
    if let Some(t) = token {
        methods.push(Auth::Token(t));
    }
    if let Some(f) = &nats.credentials_file {
        methods.push(Auth::CredentialsFile(f.clone()));
    }
    match methods.len() {
        0 => Ok(Auth::None),
        1 => Ok(methods.remove(0)),
        _ => Err(TransportError::Config(
            "configure one of user/password, token or credentials_file".into(),
        )),
    }
}

/// A URL for messages and logs, with any `user:password@` removed.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***@{}", &u[..scheme + 3], &u[at + 1..])
            }
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects with the configured auth and TLS. The client reconnects by itself, forever;
/// disconnects, reconnects and slow-consumer drops are logged and counted. `role` names
/// the connection (`check` or `stream`) in the server's monitoring and in logs.
pub async fn connect(
    nats: &NatsSection,
    url: &str,
    role: &str,
    counters: Arc<Counters>,
) -> Result<Client, TransportError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("{}-{role}", nats.name))
        .subscription_capacity(nats.subscription_capacity.max(1))
        .max_reconnects(None)
        .connection_timeout(
            parse_duration(&nats.connect_timeout)
                .map_err(|e| TransportError::Config(format!("connect_timeout: {e}")))?,
        )
        .ping_interval(
            parse_duration(&nats.ping_interval)
                .map_err(|e| TransportError::Config(format!("ping_interval: {e}")))?,
        );
    match auth_plan(nats, &|k| std::env::var(k).ok())? {
        Auth::None => {}
        Auth::UserPassword(u, p) => opts = opts.user_and_password(u, p),
        Auth::Token(t) => opts = opts.token(t),
        Auth::CredentialsFile(path) => {
            opts = opts.credentials_file(&path).await.map_err(|source| {
                TransportError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?;
        }
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
    let role_name = role.to_string();
    let last_slow_log = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    opts = opts.event_callback(move |event| {
        let (c, role, last_slow_log) = (c.clone(), role_name.clone(), last_slow_log.clone());
        async move {
            use async_nats::Event;
            match event {
                Event::Connected => {
                    c.connected(&role);
                    tracing::info!(connection = %role, "NATS connected");
                }
                Event::Disconnected => {
                    c.disconnected(&role);
                    tracing::warn!(connection = %role, "NATS disconnected; reconnecting");
                }
                Event::SlowConsumer(sid) => {
                    c.slow_consumer(&role);
                    // One event per dropped message: log at most once a second.
                    let mut last = last_slow_log.lock().unwrap_or_else(|e| e.into_inner());
                    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        *last = Some(std::time::Instant::now());
                        tracing::warn!(sid, connection = %role, "NATS slow consumer: messages dropped");
                    }
                }
                Event::LameDuckMode => tracing::warn!("NATS server entering lame duck mode"),
                Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                Event::ClientError(e) => tracing::error!(error = %e, "NATS client error"),
                Event::Draining | Event::Closed => tracing::info!(%event, connection = %role, "NATS"),
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
            url: redact_url(url),
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
///
/// The request-reply path and the stream path use separate connections, so a stream
/// backlog (in the socket, the client's buffers or the server's pending queue) never sits
/// in front of a request or its reply.
#[derive(Clone)]
pub struct Wire {
    /// The fraud.check subscription and its replies.
    pub client: Client,
    /// The fraud.txn subscription, decisions and invalid messages.
    pub stream: Client,
    /// The fraud.outcome subscription and its answers, when outcomes are taken in: a
    /// connection of its own, so a bulk upload of outcomes sits in front of neither a
    /// request nor a stream transaction, and its drops are told apart.
    outcome: Option<Client>,
    pub subjects: SubjectsSection,
    pub max_payload: usize,
    /// `<decision_prefix>.<action>` per [`Action`], made once: publishing with one is
    /// then neither an allocation nor a reference count every worker writes.
    decision_subjects: [Subject; 3],
}

impl Wire {
    pub fn new(
        client: Client,
        stream: Client,
        subjects: SubjectsSection,
        max_payload: usize,
    ) -> Self {
        let decision_subjects = Action::ALL.map(|a| {
            // Leaked once per service start (three short strings), so that the subjects
            // are static bytes: cloning one costs nothing.
            let s: &'static str =
                Box::leak(format!("{}.{}", subjects.decision_prefix, a.as_str()).into_boxed_str());
            Subject::from_static(s)
        });
        Wire {
            client,
            stream,
            outcome: None,
            subjects,
            max_payload,
            decision_subjects,
        }
    }

    /// Takes outcomes in on `conn` (see [`Wire::subscribe_outcome`]).
    pub fn with_outcome_connection(mut self, conn: Client) -> Self {
        self.outcome = Some(conn);
        self
    }

    pub async fn subscribe_check(&self) -> Result<Subscriber, TransportError> {
        queue_subscribe(
            &self.client,
            &self.subjects.check,
            &self.subjects.queue_group,
        )
        .await
    }

    pub async fn subscribe_txn(&self) -> Result<Subscriber, TransportError> {
        queue_subscribe(&self.stream, &self.subjects.txn, &self.subjects.queue_group).await
    }

    /// The outcome subscription, on the outcome connection; `None` when `[subjects]
    /// outcome` is empty (then there is no such connection).
    pub async fn subscribe_outcome(&self) -> Result<Option<Subscriber>, TransportError> {
        match &self.outcome {
            Some(conn) if !self.subjects.outcome.is_empty() => {
                queue_subscribe(conn, &self.subjects.outcome, &self.subjects.queue_group)
                    .await
                    .map(Some)
            }
            _ => Ok(None),
        }
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

    /// Decodes an outcome. Its size limit is [`OUTCOME_PAYLOAD_FACTOR`] times a
    /// transaction's: an outcome carries the whole decision (each fired rule with its
    /// values), which is larger than the transaction.
    pub fn decode_outcome(&self, payload: &[u8]) -> Result<Feedback, DecodeError> {
        let max = self.max_payload.saturating_mul(OUTCOME_PAYLOAD_FACTOR);
        if payload.len() > max {
            return Err(DecodeError {
                code: ErrorCode::Oversized,
                message: format!(
                    "outcome of {} bytes is over the limit of {max} bytes",
                    payload.len()
                ),
                id: None,
            });
        }
        Feedback::from_json(payload)
    }

    /// Answers an outcome request: counted, or already counted within the horizon.
    pub async fn reply_outcome(
        &self,
        inbox: Subject,
        f: &Feedback,
        counted: bool,
    ) -> Result<(), async_nats::PublishError> {
        let body = serde_json::json!({"id": f.id, "outcome": f.kind.as_str(), "counted": counted});
        match &self.outcome {
            Some(conn) => conn.publish(inbox, Bytes::from(body.to_string())).await,
            None => Ok(()),
        }
    }

    /// Answers an outcome request with an error object (as [`Wire::reply_error`]).
    pub async fn reply_outcome_error(
        &self,
        inbox: Subject,
        e: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        match &self.outcome {
            Some(conn) => reply_error_on(conn, inbox, e).await,
            None => Ok(()),
        }
    }

    /// Forwards a bad outcome published without a reply subject to the invalid subject,
    /// its message starting `outcome: ` (told apart from a bad transaction) and without
    /// `Nats-Msg-Id` (its transaction's id: a stream downstream would take it for that
    /// transaction's entry).
    pub async fn forward_bad_outcome(
        &self,
        payload: Bytes,
        e: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        let Some(conn) = &self.outcome else {
            return Ok(());
        };
        let message = format!("outcome: {}", e.message);
        let why = Refusal {
            message: &message,
            id: None,
            ..*e
        };
        self.publish_invalid_via(conn, payload, &why).await
    }

    fn decision_headers(d: &Decision) -> HeaderMap {
        let mut h = HeaderMap::new();
        // Header values cannot hold CR/LF (async-nats panics on them). The decoder refuses
        // such ids; this is the second line of defence.
        h.insert(NAME_MSG_ID, HeaderValue::from(header_safe(&d.id)));
        h.insert(NAME_ACTION, d.action.as_str());
        h.insert(NAME_VERSION, header_safe(&d.rules_version));
        h
    }

    /// Sends a decision (`json`: its JSON, from [`crate::Outcome`]) where it belongs.
    /// Errors are returned for counting. Publishes made while disconnected wait in the
    /// client and go out after the reconnect; those already written into the broken
    /// connection's buffer are gone with it (async-nats drops it), though they returned
    /// `Ok`. A JetStream message is acknowledged only once the server has confirmed it
    /// read the decision ([`Wire::stream_read_on`]), so it comes again (answered from the
    /// retry table); a core `fraud.txn` decision is lost.
    ///
    /// A reply is the bare JSON: it goes to one requester, whose body already holds the
    /// id, action and rules version. Headers cost 5-10 % of request-reply throughput (a
    /// `HeaderMap` of seven allocations here, its parse in the requester's client;
    /// docs/PERFORMANCE.md) and did nothing a reply needs. Published decisions keep them:
    /// `Nats-Msg-Id` is what a JetStream stream downstream deduplicates on.
    pub async fn deliver(
        &self,
        reply: &Reply,
        d: &Decision,
        json: Vec<u8>,
    ) -> Result<(), async_nats::PublishError> {
        let body = Bytes::from(json);
        match reply {
            Reply::Check(Some(inbox)) => self.client.publish(inbox.clone(), body).await,
            Reply::Check(None) => Ok(()),
            Reply::Stream => self.publish_decision(d, body).await,
        }
    }

    /// Publishes a stream decision if the stream connection takes it at once: `None` when
    /// its client's queue is full (the connection down, reconnecting, or a server that
    /// stopped reading), with nothing sent; [`Wire::publish_decision`] then waits for it.
    /// A worker must not wait on the stream connection: requests wait behind it.
    pub fn try_publish_decision(
        &self,
        d: &Decision,
        body: Bytes,
    ) -> Option<Result<(), async_nats::PublishError>> {
        use futures::FutureExt;
        // Unconstrained: the runtime's cooperative budget running out is not a full queue.
        tokio::task::unconstrained(self.publish_decision(d, body)).now_or_never()
    }

    /// Publishes a stream decision, waiting until the stream connection takes it.
    pub async fn publish_decision(
        &self,
        d: &Decision,
        body: Bytes,
    ) -> Result<(), async_nats::PublishError> {
        let subject = self.decision_subjects[d.action as usize].clone();
        self.stream
            .publish_with_headers(subject, Self::decision_headers(d), body)
            .await
    }

    /// Answers a request with an error object.
    pub async fn reply_error(
        &self,
        inbox: Subject,
        e: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        reply_error_on(&self.client, inbox, e).await
    }

    /// Forwards an asynchronous payload that was not decided (invalid input, unchanged, or
    /// a transaction the engine failed on), with the reason in headers.
    /// A payload that no longer fits the server's message limit once the headers are
    /// added (an oversized one just under that limit) goes cut to fit, with
    /// `Fraudgate-Truncated` giving its full length: refused by the server, it would be
    /// lost on the core path and, with JetStream, never acknowledged and delivered again
    /// forever.
    pub async fn publish_invalid(
        &self,
        payload: Bytes,
        e: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        self.publish_invalid_via(&self.stream, payload, e).await
    }

    async fn publish_invalid_via(
        &self,
        conn: &Client,
        payload: Bytes,
        e: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        let mut h = HeaderMap::new();
        let message = header_safe(e.message);
        let id = e.id.map(header_safe);
        h.insert(HEADER_ERROR_CODE, e.code);
        h.insert(HEADER_ERROR, message.as_str());
        if let Some(id) = &id {
            h.insert(HEADER_MSG_ID, id.as_str());
        }
        let fields = [
            (HEADER_ERROR_CODE, e.code),
            (HEADER_ERROR, message.as_str()),
            (HEADER_MSG_ID, id.as_deref().unwrap_or("")),
            // Room for the truncation header itself.
            (HEADER_TRUNCATED, "18446744073709551615"),
        ];
        // "NATS/1.0\r\n", each "name: value\r\n", the closing "\r\n".
        let head = 12
            + fields
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>();
        let max = conn.server_info().max_payload;
        let payload = if max > 0 && payload.len() + head > max {
            h.insert(HEADER_TRUNCATED, payload.len().to_string().as_str());
            payload.slice(..max.saturating_sub(head))
        } else {
            payload
        };
        conn.publish_with_headers(self.subjects.invalid.clone(), h, payload)
            .await
    }

    /// Forwards an asynchronous transaction the engine did not decide (it failed on it, or
    /// refused it after decoding) to fraud.invalid: re-encoded from what was decoded (the
    /// original bytes are not kept past decoding), with `why`'s code.
    pub async fn publish_refused(
        &self,
        txn: &Transaction,
        why: &Refusal<'_>,
    ) -> Result<(), async_nats::PublishError> {
        let payload = Bytes::from(txn.to_json());
        self.publish_invalid(payload, why).await
    }

    fn connections(&self) -> impl Iterator<Item = &Client> {
        [&self.client, &self.stream]
            .into_iter()
            .chain(self.outcome.as_ref())
    }

    /// Pushes buffered publishes of every connection to the server.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let all = futures::future::join_all(self.connections().map(|c| c.flush()));
        tokio::time::timeout(timeout, all)
            .await
            .is_ok_and(|r| r.iter().all(Result::is_ok))
    }

    /// Closes every connection after what it buffered went out, or after `timeout`.
    pub async fn close(&self, timeout: Duration) {
        let all = futures::future::join_all(self.connections().map(|c| c.drain()));
        let _ = tokio::time::timeout(timeout, all).await;
    }

    /// Both connections that decide are up (the outcome connection is not one).
    pub fn connected(&self) -> bool {
        use async_nats::connection::State;
        self.client.connection_state() == State::Connected
            && self.stream.connection_state() == State::Connected
    }

    /// Messages received from the server on the connection of `path` (requests: the
    /// request connection; the stream: the stream connection).
    pub fn in_messages(&self, path: crate::telemetry::Path) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let conn = match path {
            crate::telemetry::Path::Check => &self.client,
            crate::telemetry::Path::Stream => &self.stream,
        };
        conn.statistics().in_messages.load(Relaxed)
    }

    /// Which connection the stream client is on: its count of connects, which a
    /// reconnect raises before anything goes out on the new connection.
    pub fn stream_epoch(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.stream.statistics().connects.load(Relaxed)
    }

    /// Whether the server has read everything handed to the stream connection before this
    /// call, on connection `epoch` (from [`Wire::stream_epoch`], read before those
    /// publishes). A publish returns once the client has queued it, and a reconnect drops
    /// what the broken connection had not yet delivered while what is still queued goes
    /// out on the next one: an ack sent after its decision may reach the server even
    /// though the decision did not. A request is answered only after the server has read
    /// what came before it on the same connection, so an answer with the connect count
    /// unchanged proves that everything before it arrived. The request is `probe`, the
    /// info of the engine's own consumer ([`confirm_subject`]): the engine must be
    /// allowed it anyway (it reads the consumer at start and before each snapshot),
    /// where a subject of its own, or the account's info, might be refused by the
    /// account's permissions; and in a cluster the consumer's leader answers it, the
    /// server that takes the acks too. `false` on no answer within `timeout`, an error,
    /// or a reconnect.
    pub async fn stream_read_on(&self, epoch: u64, probe: &Subject, timeout: Duration) -> bool {
        if self.stream_epoch() != epoch {
            return false;
        }
        use async_nats::RequestErrorKind as K;
        // Any answer will do, whatever it says (its body is not read: no version of the
        // server's reply can fail to parse), and so does the server's own "no
        // responders".
        let request = self.stream.request(probe.clone(), Bytes::new());
        let answered = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == K::NoResponders,
            Err(_) => false,
        };
        answered && self.stream_epoch() == epoch
    }
}

/// The streams and the durable consumer of JetStream intake, as found or created at start.
pub struct JetStreamIntake {
    pub txn_stream: async_nats::jetstream::stream::Stream,
    pub capture: Option<async_nats::jetstream::stream::Stream>,
    /// The durable consumer, when it already existed (its delivered position tells what
    /// to replay); `None`: created by [`Wire::durable_consumer`] after the replay.
    pub consumer: Option<async_nats::jetstream::consumer::PullConsumer>,
    /// Last stream sequence the existing consumer delivered (0 when new).
    pub delivered: u64,
    /// Every message up to this sequence is acknowledged (0 when new or none).
    pub ack_floor: u64,
    /// The existing consumer's own redelivery delay: its `ack_wait`, or its longest
    /// `backoff` step when longer. It may differ from `[jetstream] ack_wait`, which only
    /// a consumer the engine creates gets.
    pub redelivery_after: Option<Duration>,
    pub txn_first: u64,
    /// Last sequence of the transaction stream now (0: it never held a message).
    pub txn_last: u64,
    /// When the transaction stream was created (epoch ns): which stream its sequence
    /// numbers belong to. It survives server restarts; a stream deleted and made again
    /// under the same name has another.
    pub txn_created_ns: i64,
    /// Last sequence of the capture stream now: the request replay ends there.
    pub capture_last: u64,
}

/// One message read back from a stream during recovery.
pub struct Replayed {
    pub payload: Bytes,
    /// When the server stored it (epoch ms): the transaction's receive time, live and
    /// in replay alike, so a rebuild sees the same times as the first pass.
    pub stored_ms: i64,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum ReplayFrom {
    Seq(u64),
    TimeMs(i64),
    First,
}

/// A JetStream message taken for a decision: acknowledged once the decision is published.
pub struct Ack(async_nats::jetstream::message::Acker);

impl Ack {
    /// Fire-and-forget `+ACK` on the stream connection, once the server has confirmed it
    /// read the decision (the service's acker). A lost ack means a redelivery, which the
    /// dedupe table answers with the same decision.
    pub async fn ack(self) -> Result<(), String> {
        self.0.ack().await.map_err(|e| e.to_string())
    }

    /// Tells the server never to deliver the message again.
    pub async fn term(self) -> Result<(), String> {
        self.0
            .ack_with(async_nats::jetstream::AckKind::Term)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Messages asked for by one pull request, and how long a request waits (async-nats's
/// default), unless the consumer allows less.
const PULL_BATCH: usize = 256;
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Idle heartbeat asked of the server for a pull (async-nats asks for none by default):
/// a pull that silently stopped (its consumer deleted between two pull requests, say) is
/// noticed after two missed heartbeats instead of never.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// A message from the durable consumer: payload, stream sequence, store time, its ack.
pub struct Delivered {
    pub payload: Bytes,
    pub seq: u64,
    pub stored_ms: i64,
    pub ack: Ack,
}

/// The request [`Wire::stream_read_on`] makes: the info of consumer `consumer` of stream
/// `stream`.
pub fn confirm_subject(stream: &str, consumer: &str) -> Subject {
    Subject::from(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"))
}

/// A server time stamp as epoch milliseconds.
fn epoch_ms(t: async_nats::datetime::DateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl Wire {
    fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.stream.clone())
    }

    /// Finds (or, with `create`, makes) the transaction stream, the request-capture stream
    /// and the durable consumer's position. Settings of streams the engine creates:
    /// - transaction stream: subjects `[subjects] txn`, limits retention (`max_age`),
    ///   file storage, duplicate window `duplicate_window` over `Nats-Msg-Id`;
    /// - capture stream: subjects `[subjects] check`, `no_ack` (the server must not answer
    ///   a request with a PubAck: the requester would take it for the reply), limits
    ///   retention (`max_age`), file storage.
    pub async fn jetstream_setup(
        &self,
        cfg: &JetStreamSection,
    ) -> Result<JetStreamIntake, TransportError> {
        use async_nats::jetstream::stream;
        let js = self.js();
        let dur = |field: &str, v: &str| {
            parse_duration(v)
                .map_err(|e| TransportError::Config(format!("[jetstream] {field}: {e}")))
        };
        let max_age = dur("max_age", &cfg.max_age)?;
        let get_or_create = |config: stream::Config| {
            let js = js.clone();
            async move {
                match js.get_stream(&config.name).await {
                    Ok(s) => Ok(s),
                    Err(e) if !cfg.create => Err(js_err(format!(
                        "stream {} (create = false: it must exist)",
                        config.name
                    ))(e.to_string())),
                    Err(_) => js.create_stream(config.clone()).await.map_err(|e| {
                        js_err(format!("cannot create stream {}", config.name))(e.to_string())
                    }),
                }
            }
        };
        let mut txn_stream = get_or_create(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![self.subjects.txn.clone()],
            max_age,
            duplicate_window: dur("duplicate_window", &cfg.duplicate_window)?,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        })
        .await?;
        let mut capture = None;
        let mut capture_last = 0;
        if !cfg.capture_stream.is_empty() {
            let mut c = get_or_create(stream::Config {
                name: cfg.capture_stream.clone(),
                subjects: vec![self.subjects.check.clone()],
                no_ack: true,
                max_age,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await?;
            let info = c
                .info()
                .await
                .map_err(|e| js_err(format!("stream {}", cfg.capture_stream))(e.to_string()))?;
            if !info.config.no_ack {
                return Err(js_err(format!("stream {}", cfg.capture_stream))(
                    "no_ack is not set: it would answer every request with a PubAck before the decision".into(),
                ));
            }
            capture_last = info.state.last_sequence;
            capture = Some(c);
        }
        let txn_info = txn_stream
            .info()
            .await
            .map_err(|e| js_err(format!("stream {}", cfg.stream))(e.to_string()))?;
        let txn_created_ns = txn_info.created.unix_timestamp_nanos() as i64;
        let txn_state = txn_info.state.clone();
        let (txn_first, txn_last) = (txn_state.first_sequence, txn_state.last_sequence);
        let (consumer, delivered, ack_floor, redelivery_after) = match txn_stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&cfg.consumer)
            .await
        {
            Ok(mut c) => {
                let i = c
                    .info()
                    .await
                    .map_err(|e| js_err(format!("consumer {}", cfg.consumer))(e.to_string()))?;
                let (d, f) = (i.delivered.stream_sequence, i.ack_floor.stream_sequence);
                let backoff = i.config.backoff.iter().max().copied();
                let after = backoff.map_or(i.config.ack_wait, |b| b.max(i.config.ack_wait));
                (Some(c), d, f, Some(after))
            }
            // Absent only when the server says so: any other failure (a timeout, JetStream
            // unavailable during a leader election, a permission) taken for "absent" made
            // the start create it at the stream's first message, skipping the replay and
            // re-deciding and re-publishing the retention.
            Err(e) if cfg.create => {
                if !Self::consumer_gone(&txn_stream, &cfg.consumer).await {
                    return Err(js_err(format!("consumer {}", cfg.consumer))(format!(
                        "cannot read it (and the server does not say it is absent): {e}"
                    )));
                }
                (None, 0, 0, None)
            }
            Err(e) => {
                return Err(js_err(format!(
                    "consumer {} (create = false: it must exist)",
                    cfg.consumer
                ))(e.to_string()))
            }
        };
        Ok(JetStreamIntake {
            txn_stream,
            capture,
            consumer,
            delivered,
            ack_floor,
            redelivery_after,
            txn_first,
            txn_last,
            txn_created_ns,
            capture_last,
        })
    }

    /// Creates the durable consumer, delivering from `start` (a sequence; `None`: the
    /// oldest message the stream holds). Explicit acks, `ack_wait`, `max_ack_pending`.
    pub async fn durable_consumer(
        &self,
        txn_stream: &async_nats::jetstream::stream::Stream,
        cfg: &JetStreamSection,
        start: Option<u64>,
    ) -> Result<async_nats::jetstream::consumer::PullConsumer, TransportError> {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let ack_wait = parse_duration(&cfg.ack_wait)
            .map_err(|e| TransportError::Config(format!("[jetstream] ack_wait: {e}")))?;
        txn_stream
            .create_consumer(pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: cfg.max_ack_pending,
                filter_subject: self.subjects.txn.clone(),
                deliver_policy: match start {
                    Some(s) => DeliverPolicy::ByStartSequence { start_sequence: s },
                    None => DeliverPolicy::All,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(format!("cannot create consumer {}", cfg.consumer))(e.to_string()))
    }

    /// Whether the durable consumer `name` is gone from `stream`: true only when the server
    /// answers that it does not know it (deleted by hand, say), not when it cannot be
    /// asked now (a restart, a timeout).
    pub async fn consumer_gone(stream: &async_nats::jetstream::stream::Stream, name: &str) -> bool {
        use async_nats::jetstream::context::ConsumerInfoErrorKind;
        matches!(
            stream.consumer_info(name).await,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound
        )
    }

    /// When the server stored message `seq` of `stream` (epoch ms), if it still has it.
    pub async fn stored_ms_of(
        stream: &async_nats::jetstream::stream::Stream,
        seq: u64,
    ) -> Option<i64> {
        let m = stream.get_raw_message(seq).await.ok()?;
        Some(epoch_ms(m.time))
    }

    /// The sequence of the last message `stream` holds now (0 when it never held one).
    pub async fn last_seq(
        stream: &async_nats::jetstream::stream::Stream,
    ) -> Result<u64, TransportError> {
        let mut s = stream.clone();
        let name = s.cached_info().config.name.clone();
        let info = s
            .info()
            .await
            .map_err(|e| js_err(format!("stream {name}"))(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Which stream `stream` names now, and where it starts: its creation time (epoch ns)
    /// and its first sequence (at least 1). `None` when it cannot be read.
    pub async fn stream_identity(
        stream: &async_nats::jetstream::stream::Stream,
    ) -> Option<(i64, u64)> {
        let mut s = stream.clone();
        let i = s.info().await.ok()?;
        Some((
            i.created.unix_timestamp_nanos() as i64,
            i.state.first_sequence.max(1),
        ))
    }

    /// The consumer's ack floor now: every message up to it is acknowledged.
    pub async fn ack_floor(
        consumer: &mut async_nats::jetstream::consumer::PullConsumer,
    ) -> Option<u64> {
        consumer
            .info()
            .await
            .ok()
            .map(|i| i.ack_floor.stream_sequence)
    }

    /// Messages of the durable consumer, as they come (pulled in batches).
    pub async fn consume(
        consumer: &async_nats::jetstream::consumer::PullConsumer,
    ) -> Result<impl futures::Stream<Item = Result<Delivered, String>>, TransportError> {
        use futures::StreamExt;
        // Pull requests within what the consumer allows (an operator may have set up the
        // consumer with a smaller `max_batch` or `max_expires`): the server refuses a
        // request over them with a 409, and the pull would end on every request.
        let limits = &consumer.cached_info().config;
        let batch = match usize::try_from(limits.max_batch) {
            Ok(max) if max > 0 => max.min(PULL_BATCH),
            _ => PULL_BATCH,
        };
        let expires = match limits.max_expires {
            m if !m.is_zero() && m < PULL_EXPIRES => m,
            _ => PULL_EXPIRES,
        };
        let pull = consumer
            .stream()
            .max_messages_per_batch(batch)
            .expires(expires)
            // Half the expiry at most (the server's limit), for the most slack before
            // async-nats calls a heartbeat missed (after two heartbeats' time).
            .heartbeat(PULL_HEARTBEAT.min(expires / 2));
        let messages = pull
            .messages()
            .await
            .map_err(|e| js_err("cannot pull from the consumer")(e.to_string()))?;
        Ok(messages.map(|m| {
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let (seq, stored) = (info.stream_sequence, epoch_ms(info.published));
            let (msg, acker) = m.split();
            Ok(Delivered {
                payload: msg.payload,
                seq,
                stored_ms: stored,
                ack: Ack(acker),
            })
        }))
    }

    /// Reads `stream` (only `subject`) from `from` through sequence `to`, in order, with an
    /// ephemeral ordered consumer, calling `f` for each message. Stops early (and says so)
    /// when nothing arrives for `idle`: messages may have aged out meanwhile.
    pub async fn replay(
        stream: &async_nats::jetstream::stream::Stream,
        subject: &str,
        from: ReplayFrom,
        to: u64,
        idle: Duration,
        mut f: impl FnMut(Replayed),
    ) -> Result<u64, TransportError> {
        use async_nats::jetstream::consumer::{pull, DeliverPolicy};
        use futures::StreamExt;
        if to == 0 || matches!(from, ReplayFrom::Seq(s) if s > to) {
            return Ok(0);
        }
        let deliver_policy = match from {
            ReplayFrom::Seq(s) => DeliverPolicy::ByStartSequence { start_sequence: s },
            ReplayFrom::TimeMs(ms) => DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(ms as i128 * 1_000_000)
                    .map_err(|e| js_err("replay start time")(e.to_string()))?,
            },
            ReplayFrom::First => DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("cannot create the replay consumer")(e.to_string()))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(0); // nothing stored from `from` on
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| js_err("cannot read for replay")(e.to_string()))?;
        let mut n = 0;
        loop {
            let m = match tokio::time::timeout(idle, messages.next()).await {
                Err(_) => {
                    return Err(js_err("replay")(format!(
                        "no message for {idle:?} before sequence {to} (aged out?); {n} replayed"
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(js_err("replay")(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            let info = m.info().map_err(|e| js_err("replay")(e.to_string()))?;
            let (seq, stored) = (info.stream_sequence, epoch_ms(info.published));
            if seq > to {
                break;
            }
            n += 1;
            f(Replayed {
                payload: m.payload.clone(),
                stored_ms: stored,
            });
            if seq == to {
                break;
            }
        }
        Ok(n)
    }
}

async fn queue_subscribe(
    client: &Client,
    subject: &str,
    group: &str,
) -> Result<Subscriber, TransportError> {
    client
        .queue_subscribe(subject.to_string(), group.to_string())
        .await
        .map_err(|source| TransportError::Subscribe {
            subject: subject.to_string(),
            source,
        })
}

/// Why a message got no decision: its input was refused, or the engine failed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal<'a> {
    /// A stable code: one of [`ErrorCode`]'s, or [`INTERNAL`].
    pub code: &'a str,
    pub message: &'a str,
    /// The transaction id, when it could be read.
    pub id: Option<&'a str>,
}

/// The code of a transaction the engine failed to decide (a bug, not the input's fault as
/// far as the input's checks go). Retrying it fails the same way.
pub const INTERNAL: &str = "internal";

impl<'a> Refusal<'a> {
    /// The engine's own failure on transaction `id`.
    pub fn internal(id: &'a str) -> Self {
        Refusal {
            code: INTERNAL,
            message: "the engine failed while deciding this transaction; it was not decided",
            id: Some(id),
        }
    }

    /// Transaction `id` came for another payment than the transaction decided under that
    /// id within the dedupe horizon: it was not decided (the original's decision is not
    /// its answer).
    pub fn id_reused(id: &'a str) -> Self {
        Refusal {
            code: ErrorCode::IdReused.as_str(),
            message: "`id` was used within the dedupe horizon for another payment (card, \
                      amount, currency, merchant, device, region or mcc); this one was not \
                      decided: send it under an id of its own",
            id: Some(id),
        }
    }
}

impl<'a> From<&'a DecodeError> for Refusal<'a> {
    fn from(e: &'a DecodeError) -> Self {
        Refusal {
            code: e.code.as_str(),
            message: &e.message,
            id: e.id.as_deref(),
        }
    }
}

/// Answers a request on `conn` with an error object, told apart from an answer by its
/// `Fraudgate-Error-Code` header.
async fn reply_error_on(
    conn: &Client,
    inbox: Subject,
    e: &Refusal<'_>,
) -> Result<(), async_nats::PublishError> {
    let mut h = HeaderMap::new();
    h.insert(HEADER_ERROR_CODE, e.code);
    conn.publish_with_headers(inbox, h, Bytes::from(error_json(e)))
        .await
}

/// `{"id": ..., "error": {"code": ..., "message": ...}}`
pub fn error_json(e: &Refusal<'_>) -> String {
    serde_json::json!({
        "id": e.id,
        "error": {"code": e.code, "message": e.message},
    })
    .to_string()
}

/// Header values cannot hold line breaks.
fn header_safe(s: &str) -> String {
    if s.contains(['\r', '\n']) {
        s.replace(['\r', '\n'], " ")
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_is_one_method_with_resolved_secrets() {
        let env = |k: &str| (k == "PW").then(|| "s3cret".to_string());
        let mut n = NatsSection::default();
        assert_eq!(auth_plan(&n, &env).unwrap(), Auth::None);
        n.user = Some("fg".into());
        assert!(auth_plan(&n, &env).is_err(), "user without password");
        n.password_env = Some("PW".into());
        assert_eq!(
            auth_plan(&n, &env).unwrap(),
            Auth::UserPassword("fg".into(), "s3cret".into())
        );
        n.password = Some("inline".into());
        assert!(auth_plan(&n, &env).is_err(), "password and password_env");
        n.password = None;
        n.token = Some("t".into());
        assert!(auth_plan(&n, &env).is_err(), "two methods");
        let mut t = NatsSection {
            password: Some("p".into()),
            ..Default::default()
        };
        assert!(auth_plan(&t, &env).is_err(), "password without user");
        t.password = None;
        t.token_env = Some("MISSING".into());
        let e = auth_plan(&t, &env).unwrap_err().to_string();
        assert!(e.contains("MISSING") && e.contains("not set"), "{e}");
        t.token_env = None;
        t.credentials_file = Some("/etc/x.creds".into());
        assert_eq!(
            auth_plan(&t, &env).unwrap(),
            Auth::CredentialsFile("/etc/x.creds".into())
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://fg:s3cretPW@10.0.0.5:4222,nats://10.0.0.6:4222"),
            "nats://***@10.0.0.5:4222,nats://10.0.0.6:4222"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn error_object_shape() {
        let e = Transaction::from_json(br#"{"id":"x1","card":"c","amount":-1}"#).unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&error_json(&(&e).into())).unwrap();
        assert_eq!(v["id"], "x1");
        assert_eq!(v["error"]["code"], "negative_amount");
        assert!(v["error"]["message"].as_str().unwrap().contains(">= 0"));
        let e = Transaction::from_json(b"{").unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&error_json(&(&e).into())).unwrap();
        assert!(v["id"].is_null());
        let v: serde_json::Value =
            serde_json::from_str(&error_json(&Refusal::internal("x2"))).unwrap();
        assert_eq!(v["id"], "x2");
        assert_eq!(v["error"]["code"], INTERNAL);
        assert_eq!(header_safe("a\nb\rc"), "a b c");
    }
}
