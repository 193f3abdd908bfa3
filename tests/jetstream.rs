//! JetStream intake and recovery against a real nats-server with JetStream (spawned here):
//! kill -9 in the middle of a load compared with an uninterrupted control engine, key by
//! key and window by window; exactly one reply per captured request; a nats-server
//! restart losing nothing in JetStream mode, and the loss counted in core mode.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use common::*;
use futures::StreamExt;

fn js_config(name: &str, snapshot: &Path, every: &str) -> String {
    format!(
        "{CONFIG}\n[subjects]\nqueue_group = \"{name}\"\n\
         [jetstream]\nenabled = true\nconsumer = \"{name}\"\nack_wait = \"2s\"\n\
         [snapshot]\npath = {:?}\ninterval = \"{every}\"\n",
        snapshot.display().to_string()
    )
}

/// The `card_txn_1h` value of every card key in the snapshot at `snap`, now.
fn card_txn_1h(snap: &Path) -> Vec<String> {
    windows_in(snap, fraudgate::service::now_ms())
        .into_iter()
        .filter(|(w, _, _)| w == "card_txn_1h")
        .map(|(_, _, v)| v)
        .collect()
}

/// A transaction at event time `ts` (explicit, so both engines see the same times).
fn txn_at(id: &str, card: &str, amount: &str, ts: i64) -> Bytes {
    let mut v: serde_json::Value = serde_json::from_str(&txn(id, card, amount)).unwrap();
    v["ts"] = ts.into();
    Bytes::from(v.to_string())
}

/// Publishes through JetStream (with `Nats-Msg-Id`) and waits for the stream's ack,
/// retrying while the server is away: the switch's side of at-least-once.
async fn js_publish(js: &jetstream::Context, id: &str, body: Bytes) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        let acked = async {
            js.publish_with_headers("fraud.txn", h, body.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), acked).await {
            Ok(Ok(_)) => return,
            _ if Instant::now() > deadline => panic!("could not publish {id}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until the durable consumer has nothing pending or unacknowledged.
async fn drained(js: &jetstream::Context, consumer: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(stream) = js.get_stream("FRAUD_TXN").await {
            if let Ok(mut c) = stream
                .get_consumer::<jetstream::consumer::pull::Config>(consumer)
                .await
            {
                if let Ok(i) = c.info().await {
                    if i.num_pending == 0 && i.num_ack_pending == 0 {
                        return;
                    }
                    last = format!("pending {} unacked {}", i.num_pending, i.num_ack_pending);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("consumer {consumer} never drained: {last}");
}

struct Load {
    js: jetstream::Context,
    client: async_nats::Client,
    t0: i64,
    n: usize,
}

impl Load {
    /// `count` stream transactions over 40 cards; every 10th transaction also a request.
    async fn send(&mut self, count: usize) {
        for _ in 0..count {
            let i = self.n;
            self.n += 1;
            let card = format!("40000000000{:05}", i % 40);
            let ts = self.t0 + i as i64 * 20;
            let amount = format!("{}.{:02}", 1 + i % 90, i % 100);
            js_publish(
                &self.js,
                &format!("k{i}"),
                txn_at(&format!("k{i}"), &card, &amount, ts),
            )
            .await;
            if i.is_multiple_of(10) {
                let body = txn_at(&format!("q{i}"), &card, "3.00", ts + 1);
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.client.request("fraud.check", body),
                )
                .await;
                assert!(matches!(r, Ok(Ok(_))), "request q{i} unanswered: {r:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_equals_an_uninterrupted_run() {
    kill_9_run(|c| c, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_down_longer_than_the_dedupe_horizon_counts_nothing_twice() {
    // Down for longer than the retry horizon, with sweeps every 100 ms: the ids of
    // messages taken but not acknowledged before the kill must survive the first sweeps
    // after the restart, or their redeliveries count again.
    let short = |c: String| {
        c.replace("[service]\n", "[service]\nsweep_interval = \"100ms\"\n")
            + &daytime_engine_table()
            + "dedupe_horizon = \"4s\"\n"
    };
    kill_9_run(short, Duration::from_secs(6)).await;
}

async fn kill_9_run(tweak: impl Fn(String) -> String, downtime: Duration) {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let url = nats.url();
    let dir = Scratch::new("js-kill");
    let (control_snap, victim_snap) = (dir.0.join("control.snap"), dir.0.join("victim.snap"));
    // Same streams, own consumers and queue groups: each engine sees every transaction
    // and every request.
    let control =
        Engine::start_with(&url, &tweak(js_config("control", &control_snap, "60s"))).await;
    let victim_cfg = tweak(js_config("victim", &victim_snap, "1s"));
    let mut victim = Engine::start_with(&url, &victim_cfg).await;
    let client = client(&url).await;
    let mut load = Load {
        js: jetstream::new(client.clone()),
        client,
        t0: fraudgate::service::now_ms() - 60_000,
        n: 0,
    };
    load.send(500).await;
    // A snapshot with part of the load in it, then more, then kill -9 with transactions
    // in flight: taken and not acknowledged, decided and not snapshotted.
    let written = victim.count_log("snapshot written");
    let deadline = Instant::now() + Duration::from_secs(10);
    while victim.count_log("snapshot written") == written && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        victim.count_log("snapshot written") > written,
        "{}",
        victim.log_text()
    );
    // Stopped first: what it pulled meanwhile sits in its socket, delivered and never
    // acknowledged, when kill -9 comes.
    victim.signal("STOP");
    load.send(500).await;
    victim.child.start_kill().unwrap();
    let _ = victim.child.wait().await;
    // While it is down: the stream keeps transactions, the capture keeps requests (the
    // control engine answers them).
    load.send(300).await;
    tokio::time::sleep(downtime).await;
    let victim = Engine::start_with(&url, &victim_cfg).await;
    let log = victim.log_text();
    assert!(log.contains("state restored from snapshot"), "{log}");
    let recovery: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "JetStream recovery: state rebuilt from the streams")
        .unwrap_or_else(|| panic!("no recovery line:\n{log}"));
    eprintln!("victim recovery: {}", recovery["fields"]);
    // What came after the snapshot's cut was re-applied: transactions, and the requests
    // answered by the control engine while the victim was down.
    assert!(
        recovery["fields"]["transactions"].as_u64().unwrap() > 0,
        "{recovery}"
    );
    assert!(
        recovery["fields"]["requests"].as_u64().unwrap() >= 30,
        "{recovery}"
    );
    load.send(500).await;
    drained(&load.js, "control").await;
    drained(&load.js, "victim").await;
    let victim = stop(victim).await;
    stop(control).await;
    let at = load.t0 + load.n as i64 * 20 + 1_000;
    let want = windows_in(&control_snap, at);
    let got = windows_in(&victim_snap, at);
    assert!(
        want.len() > 40 * 5,
        "control has {} window values",
        want.len()
    );
    let diff: Vec<_> = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(
        want.len() == got.len() && diff.is_empty(),
        "{} vs {} values; first differences: {diff:?}\nvictim log:\n{}",
        want.len(),
        got.len(),
        victim.log_text()
    );
    // The card totals include every transaction and request exactly once.
    let sums: i64 = want
        .iter()
        .filter(|(w, _, _)| w == "card_txn_1h")
        .map(|(_, _, v)| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(sums as usize, load.n + load.n.div_ceil(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_request_gets_exactly_one_reply() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-one");
    let engine = Engine::start_with(
        &nats.url(),
        &js_config("fraudgate", &dir.0.join("s.snap"), "60s"),
    )
    .await;
    let c = client(&nats.url()).await;
    let inbox = c.new_inbox();
    let mut replies = c.subscribe(inbox.clone()).await.unwrap();
    c.publish_with_reply(
        "fraud.check",
        inbox,
        Bytes::from(txn("one-1", "4111111111119001", "10")),
    )
    .await
    .unwrap();
    c.flush().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("a reply")
        .unwrap();
    let d: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(d["id"], "one-1", "{d}");
    assert_eq!(d["action"], "approve");
    // No PubAck from the capture stream, before or after ours.
    let more = tokio::time::timeout(Duration::from_secs(1), replies.next()).await;
    assert!(more.is_err(), "a second reply: {more:?}");
    // And the request was captured.
    let js = jetstream::new(c.clone());
    let mut capture = js.get_stream("FRAUD_CHECK").await.unwrap();
    assert_eq!(capture.info().await.unwrap().state.messages, 1);
    assert!(capture.cached_info().config.no_ack);
    drop(engine);
}

/// A request captured while the engine was down, and the switch's retry of it only once
/// the engine is back, longer than the retry horizon after the capture: the restart's
/// replay re-applies the request, and the retry finds its id and is not counted again
/// (the replayed id used to carry its capture time, and was already past the horizon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_captured_while_down_and_retried_later_counts_once() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-retry-late");
    let snap = dir.0.join("s.snap");
    let config = js_config("fraudgate", &snap, "60s")
        .replace("[service]\n", "[service]\nsweep_interval = \"100ms\"\n")
        + &daytime_engine_table()
        + "dedupe_horizon = \"3s\"\n";
    let engine = Engine::start_with(&nats.url(), &config).await;
    let engine = stop(engine).await;
    drop(engine);
    let c = client(&nats.url()).await;
    let card = "4111111111119021";
    let ts = fraudgate::service::now_ms() - 1_000;
    let body = String::from_utf8(txn_at("late-1", card, "10", ts).to_vec()).unwrap();
    // Nobody answers: the request is only captured.
    c.publish_with_reply("fraud.check", c.new_inbox(), Bytes::from(body.clone()))
        .await
        .unwrap();
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let engine = Engine::start_with(&nats.url(), &config).await;
    // Sweeps every 100 ms meanwhile: the id must survive them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = check(&c, &body).await;
    assert_eq!(d["id"], "late-1", "{d}");
    let engine = stop(engine).await;
    let log = engine.log_text();
    let counted: i64 = card_txn_1h(&snap)
        .iter()
        .map(|v| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(counted, 1, "the request was counted {counted} times\n{log}");
}

/// A request that comes while the engine replays its capture at start is not queued
/// behind the replay, to be answered once the switch has given up: the engine subscribes
/// to requests only after the replay. The request is captured, applied once by the
/// catch-up, and the switch's retry gets its decision; the card is counted once for it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_during_the_start_replay_is_not_queued_behind_it() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-catch-up");
    let snap = dir.0.join("s.snap");
    let config = js_config("fraudgate", &snap, "60s");
    let card = "4111111111119031";
    let engine = Engine::start_with(&nats.url(), &config).await;
    let c = client(&nats.url()).await;
    let d = check(&c, &txn("cu-1", card, "10")).await;
    assert_eq!(d["action"], "approve", "{d}");
    drop(stop(engine).await);
    // Restarted with a long replay (a pause after it, before the subscription).
    let engine = Engine::spawn_env(
        &nats.url(),
        &config,
        &[("FAILPOINTS", "recovered=sleep(3000)")],
    );
    engine
        .wait_log("JetStream recovery", Duration::from_secs(20))
        .await;
    let inbox = c.new_inbox();
    let mut replies = c.subscribe(inbox.clone()).await.unwrap();
    let body = txn("cu-2", card, "11");
    c.publish_with_reply("fraud.check", inbox, Bytes::from(body.clone()))
        .await
        .unwrap();
    c.flush().await.unwrap();
    engine
        .wait_log("taking transactions", Duration::from_secs(20))
        .await;
    assert_eq!(
        engine.count_log("requests captured during the start re-applied"),
        1,
        "{}",
        engine.log_text()
    );
    // Not answered late (a status without a body, such as no responders, is no answer).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, replies.next()).await {
        assert!(
            m.payload.is_empty(),
            "answered after the replay: {:?}",
            String::from_utf8_lossy(&m.payload)
        );
    }
    // The retry gets the decision the catch-up made; a new request is answered at once.
    let d = check(&c, &body).await;
    assert_eq!(
        (d["id"].as_str(), d["action"].as_str()),
        (Some("cu-2"), Some("approve"))
    );
    let d = check(&c, &txn("cu-3", card, "12")).await;
    assert_eq!(d["id"], "cu-3", "{d}");
    let engine = stop(engine).await;
    let counted: i64 = card_txn_1h(&snap)
        .iter()
        .map(|v| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(counted, 3, "{}", engine.log_text());
}

/// Without a request capture nothing could catch a request up after the start, so the
/// engine subscribes before its replay, and a request that comes during it is answered
/// after it, not lost.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_capture_a_request_during_the_start_replay_waits_for_it() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-no-capture");
    let config = js_config("fraudgate", &dir.0.join("s.snap"), "60s").replace(
        "[jetstream]\nenabled = true\n",
        "[jetstream]\nenabled = true\ncapture_stream = \"\"\n",
    );
    assert!(config.contains("capture_stream"), "{config}");
    let engine = Engine::spawn_env(
        &nats.url(),
        &config,
        &[("FAILPOINTS", "recovered=sleep(2000)")],
    );
    engine
        .wait_log("JetStream recovery", Duration::from_secs(20))
        .await;
    let c = client(&nats.url()).await;
    let d = check(&c, &txn("nc-1", "4111111111119049", "10")).await;
    assert_eq!(d["id"], "nc-1", "{d}");
    assert_eq!(engine.count_log("taking transactions"), 1);
    drop(stop(engine).await);
}

/// Stream transactions published while nats-server is killed and restarted (on the same
/// port and store). Returns (sent, ids decided, the engine's final counts).
async fn load_across_a_nats_restart(
    jetstream_mode: bool,
) -> (usize, std::collections::HashSet<String>, serde_json::Value) {
    let store = Scratch::new("js-store");
    let port = fraudgate::demo::free_port().unwrap();
    let nats = fraudgate::demo::NatsServer::start_on_store(port, &store.0)
        .await
        .unwrap();
    let url = nats.url();
    let dir = Scratch::new("js-restart");
    let config = if jetstream_mode {
        js_config("fraudgate", &dir.0.join("s.snap"), "60s")
    } else {
        CONFIG.to_string()
    };
    let engine = Engine::start_with(&url, &config).await;
    let c = client(&url).await;
    let js = jetstream::new(c.clone());
    // Decisions are kept in a stream of their own, so none is missed while this client
    // reconnects.
    js.create_stream(jetstream::stream::Config {
        name: "DECISIONS".into(),
        subjects: vec!["fraud.decision.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let sent = 1_000;
    let send = |range: std::ops::Range<usize>| {
        let (c, js) = (c.clone(), js.clone());
        async move {
            for i in range {
                let id = format!("r{i}");
                let body = Bytes::from(txn(&id, &format!("45000000000{:05}", i % 50), "2"));
                if jetstream_mode {
                    js_publish(&js, &id, body).await;
                } else {
                    // Core NATS: fire and forget, as a core publisher does.
                    let _ = c.publish("fraud.txn", body).await;
                }
            }
        }
    };
    send(0..400).await;
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    nats.stop().await;
    engine
        .wait_log("NATS disconnected", Duration::from_secs(10))
        .await;
    let store_dir = store.0.clone();
    let restarted = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        fraudgate::demo::NatsServer::start_on_store(port, &store_dir)
            .await
            .unwrap()
    });
    send(400..700).await; // partly while the server is down
    let _nats = restarted.await.unwrap();
    // The request and stream connections are back (each connected at start and after the
    // restart; the outcome connection is not waited for).
    let deadline = Instant::now() + Duration::from_secs(20);
    let back = |role: &str| {
        let role = format!("\"connection\":\"{role}\"");
        engine.count_log_lines(&["NATS connected", &role]) >= 2
    };
    while !(back("check") && back("stream")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(700..sent).await;
    // Wait until decisions stop arriving.
    let mut seen = std::collections::HashSet::new();
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(5) {
        let Ok(stream) = js.get_stream("DECISIONS").await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        let mut msgs = consumer.messages().await.unwrap();
        let before = seen.len();
        for _ in 0..pending {
            match tokio::time::timeout(Duration::from_secs(2), msgs.next()).await {
                Ok(Some(Ok(m))) => {
                    let d: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    seen.insert(d["id"].as_str().unwrap().to_string());
                }
                _ => break,
            }
        }
        if seen.len() > before {
            quiet_since = Instant::now();
        }
        if seen.len() == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let engine = stop(engine).await;
    (sent, seen, engine.stopped_line()["fields"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_loses_nothing_in_jetstream_mode() {
    let (sent, decided, counts) = load_across_a_nats_restart(true).await;
    assert_eq!(
        decided.len(),
        sent,
        "transactions without a decision; engine: {counts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_loss_is_counted_in_core_mode() {
    let (sent, decided, counts) = load_across_a_nats_restart(false).await;
    // Core NATS keeps nothing for an absent subscriber and nothing in flight when the
    // server dies: the loss is what the engine's count of received transactions and the
    // decisions seen fall short of what was sent.
    let received = counts["received_stream"].as_u64().unwrap() as usize;
    let lost = sent - decided.len();
    eprintln!(
        "core mode across a nats-server restart: sent {sent}, received by the engine \
         {received}, decisions seen {}, lost {lost}",
        decided.len()
    );
    assert!(decided.len() <= received && received <= sent, "{counts}");
    // The engine reconnected: transactions sent after the restart were decided.
    assert!(
        (700..sent).all(|i| decided.contains(&format!("r{i}"))),
        "decisions missing after the restart: {counts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_rebuilt_from_the_streams_when_configured() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let url = nats.url();
    let dir = Scratch::new("js-rebuild");
    let snap = dir.0.join("s.snap");
    let config = js_config("fraudgate", &snap, "60s");
    let engine = Engine::start_with(&url, &config).await;
    let c = client(&url).await;
    let js = jetstream::new(c.clone());
    let mut invalid = c.subscribe("fraud.invalid").await.unwrap();
    c.flush().await.unwrap();
    let card = "4111111111117001";
    let ts = fraudgate::service::now_ms() - 10_000;
    for i in 0..5 {
        js_publish(
            &js,
            &format!("rb{i}"),
            txn_at(&format!("rb{i}"), card, "4000", ts + i),
        )
        .await;
    }
    // Bad input on the JetStream path: refused, forwarded, acknowledged; nothing stalls.
    js_publish(&js, "rb-bad", Bytes::from_static(b"{not json")).await;
    let bad = tokio::time::timeout(Duration::from_secs(5), invalid.next())
        .await
        .expect("invalid forwarded")
        .unwrap();
    assert_eq!(
        bad.headers
            .unwrap()
            .get("Fraudgate-Error-Code")
            .unwrap()
            .as_str(),
        "invalid_json"
    );
    drained(&js, "fraudgate").await;
    let engine = stop(engine).await;
    drop(engine);
    std::fs::write(&snap, b"FGSNAP\0\0garbage").unwrap();
    // The default refuses to start on it ...
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_fraudgate"))
        .args(["run", "--nats-url", &url, "--rules"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"))
        .arg("--config")
        .arg({
            let p = dir.0.join("fail.toml");
            std::fs::write(&p, format!("{config}{}", daytime_engine_table())).unwrap();
            p
        })
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("rebuild"));
    // ... on_bad = "rebuild" moves it aside and replays the stream's retention: the card's
    // 24-hour total (5 x 4000) is back, so one more crosses the 20000 daily limit.
    let config = config.replace(
        "interval = \"60s\"",
        "interval = \"60s\"\non_bad = \"rebuild\"",
    );
    let engine = Engine::start_with(&url, &config).await;
    let log = engine.log_text();
    assert!(log.contains("unusable snapshot"), "{log}");
    let over = check(
        &c,
        std::str::from_utf8(&txn_at("rb5", card, "1", ts + 6)).unwrap(),
    )
    .await;
    assert_eq!(
        over["decided_by"], "reject:daily_card_limit",
        "{over}\n{log}"
    );
    assert_eq!(over["rules"][0]["values"]["card_amount_24h"], "20001");
}

/// The transaction stream as the engine makes it, made first by an operator.
async fn txn_stream(js: &jetstream::Context) -> jetstream::stream::Stream {
    js.create_stream(jetstream::stream::Config {
        name: "FRAUD_TXN".into(),
        subjects: vec!["fraud.txn".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The id of the next decision published, waiting at most 20 s (then failing with the
/// engine's log).
async fn decision_id(d: &mut async_nats::Subscriber, engine: &Engine) -> String {
    let m = match tokio::time::timeout(Duration::from_secs(20), d.next()).await {
        Ok(m) => m.unwrap(),
        Err(_) => panic!("no decision in 20 s:\n{}", engine.log_text()),
    };
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Publishes three transactions of `card` (ids `prefix-0..2`) and waits for each one's
/// decision, in turn.
async fn publish_decided(
    js: &jetstream::Context,
    decisions: &mut async_nats::Subscriber,
    engine: &Engine,
    prefix: &str,
    card: &str,
    ts: i64,
) {
    for i in 0..3 {
        let id = format!("{prefix}-{i}");
        js_publish(js, &id, txn_at(&id, card, "10", ts + i)).await;
        assert_eq!(decision_id(decisions, engine).await, id);
    }
}

/// The durable consumer deleted while the engine runs (by hand, or a tool re-applying the
/// stream's configuration): the engine makes it again where it stands and goes on
/// deciding, and what it had already decided is not delivered and decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_made_again_where_the_engine_stands() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-deleted");
    let engine = Engine::start_with(
        &nats.url(),
        &js_config("fraudgate", &dir.0.join("s.snap"), "60s"),
    )
    .await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    publish_decided(&js, &mut decisions, &engine, "del", "4111111111119003", ts).await;
    drained(&js, "fraudgate").await;
    let stream = js.get_stream("FRAUD_TXN").await.unwrap();
    // The server can fail a delete while it writes the consumer's state (a 500,
    // "directory not empty"): again until the consumer is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if stream.delete_consumer("fraudgate").await.is_ok() {
            break;
        }
        if let Err(e) = stream.consumer_info("fraudgate").await {
            if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the consumer could not be deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    js_publish(
        &js,
        "del-3",
        txn_at("del-3", "4111111111119003", "10", ts + 3),
    )
    .await;
    assert_eq!(decision_id(&mut decisions, &engine).await, "del-3");
    engine
        .wait_log(
            "the JetStream consumer was gone; made it again",
            Duration::from_secs(5),
        )
        .await;
    // Nothing decided before the deletion comes again.
    let again = tokio::time::timeout(Duration::from_secs(1), decisions.next()).await;
    assert!(again.is_err(), "a decision again: {again:?}");
    drained(&js, "fraudgate").await;
    drop(engine);
}

/// The transaction stream deleted and made again while the engine was down (to change its
/// storage, say; its consumer goes with it): the snapshot's position (past message 3 of the
/// old stream) is past the new stream's end. The messages the new stream holds were never
/// decided: they are, instead of being skipped by a consumer made at the old position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_while_down_is_taken_from_its_first_message() {
    stream_made_again_while_down(2).await;
}

/// The same with a new stream that already holds more messages than the snapshot's
/// position: only the stream's creation time (in the snapshot's cursor) tells it from the
/// old one. A consumer made at the old position skipped new-0 to new-2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_and_grown_past_the_position_is_taken_from_its_first() {
    stream_made_again_while_down(6).await;
}

async fn stream_made_again_while_down(new_messages: i64) {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-remade");
    let config = js_config("fraudgate", &dir.0.join("s.snap"), "60s");
    let engine = Engine::start_with(&nats.url(), &config).await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    publish_decided(&js, &mut decisions, &engine, "old", "4111111111119011", ts).await;
    drained(&js, "fraudgate").await;
    let engine = stop(engine).await;
    drop(engine);
    js.delete_stream("FRAUD_TXN").await.unwrap();
    txn_stream(&js).await;
    let mut want = Vec::new();
    for i in 0..new_messages {
        let id = format!("new-{i}");
        js_publish(&js, &id, txn_at(&id, "4111111111119012", "10", ts + 10 + i)).await;
        want.push(id);
    }
    let engine = Engine::start_with(&nats.url(), &config).await;
    let mut got = Vec::new();
    for _ in 0..new_messages {
        got.push(decision_id(&mut decisions, &engine).await);
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(engine
        .log_text()
        .contains("the transaction stream was made again since the snapshot"));
    drained(&js, "fraudgate").await;
    drop(engine);
}

/// The transaction stream deleted and made again while the engine runs, the new stream
/// already holding more messages than the engine had taken of the old one: they are all
/// decided (a consumer made again at the engine's old position skipped new-0 to new-2),
/// and the snapshot written at the stop names the new stream, so the next start replays
/// nothing and does not take the new stream for another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_while_running_is_taken_from_its_first_message() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-remade-live");
    // Snapshots every second: one comes between the stream's deletion and the intake
    // finding its consumer gone, and must not make the intake take the new stream for the
    // one it knew.
    let config = js_config("fraudgate", &dir.0.join("s.snap"), "1s");
    let engine = Engine::start_with(&nats.url(), &config).await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    publish_decided(&js, &mut decisions, &engine, "live", "4111111111119013", ts).await;
    drained(&js, "fraudgate").await;
    js.delete_stream("FRAUD_TXN").await.unwrap();
    txn_stream(&js).await;
    let mut want = Vec::new();
    for i in 0..6 {
        let id = format!("fresh-{i}");
        js_publish(&js, &id, txn_at(&id, "4111111111119014", "10", ts + 10 + i)).await;
        want.push(id);
    }
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(decision_id(&mut decisions, &engine).await);
    }
    got.sort();
    assert_eq!(got, want, "{}", engine.log_text());
    assert!(engine
        .log_text()
        .contains("the transaction stream was made again while the engine ran"));
    drained(&js, "fraudgate").await;
    let engine = stop(engine).await;
    drop(engine);
    let engine = Engine::start_with(&nats.url(), &config).await;
    let again = tokio::time::timeout(Duration::from_secs(1), decisions.next()).await;
    assert!(again.is_err(), "a decision again: {again:?}");
    assert!(
        !engine.log_text().contains("made again since the snapshot"),
        "{}",
        engine.log_text()
    );
    drop(engine);
}

/// The transaction stream and its consumer both made again while the engine runs (a tool
/// re-applying their configuration): the engine pulls on from the new consumer, and its
/// snapshots stop naming a position (none it tracked is one in the new stream), so the
/// next start replays nothing. Before, the cursor named the new stream with the old
/// engine's position: the start replayed the new stream from its first message, and ids
/// older than the retry horizon were counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_and_consumer_made_again_while_running_leave_no_position() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-remade-both");
    let config = js_config("fraudgate", &dir.0.join("s.snap"), "1s");
    let engine = Engine::start_with(&nats.url(), &config).await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    publish_decided(&js, &mut decisions, &engine, "both", "4111111111119015", ts).await;
    drained(&js, "fraudgate").await;
    js.delete_stream("FRAUD_TXN").await.unwrap();
    let stream = txn_stream(&js).await;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("fraudgate".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(2),
            filter_subject: "fraud.txn".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut want = Vec::new();
    for i in 0..5 {
        let id = format!("both-new-{i}");
        js_publish(&js, &id, txn_at(&id, "4111111111119016", "10", ts + 10 + i)).await;
        want.push(id);
    }
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(decision_id(&mut decisions, &engine).await);
    }
    got.sort();
    assert_eq!(got, want);
    drained(&js, "fraudgate").await;
    engine
        .wait_log(
            "snapshots go without a stream position",
            Duration::from_secs(10),
        )
        .await;
    let engine = stop(engine).await;
    drop(engine);
    let engine = Engine::start_with(&nats.url(), &config).await;
    let log = engine.log_text();
    let recovery = log
        .lines()
        .find(|l| l.contains("JetStream recovery"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        recovery.contains(r#""transactions":0"#) && recovery.contains(r#""already_in_snapshot":0"#),
        "{recovery}"
    );
    assert!(!log.contains("made again since the snapshot"), "{log}");
    drop(engine);
}

/// A durable consumer the operator set up with smaller pull limits than the engine's
/// defaults (`max_batch` 10, `max_expires` 2 s): the server refuses a pull request over
/// them, so the engine must ask within them, or it never gets a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_small_pull_limits_is_pulled_within_them() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let stream = txn_stream(&js).await;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("fraudgate".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            filter_subject: "fraud.txn".into(),
            max_batch: 10,
            max_expires: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = Scratch::new("js-limits");
    let engine = Engine::start_with(
        &nats.url(),
        &js_config("fraudgate", &dir.0.join("s.snap"), "60s"),
    )
    .await;
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    for i in 0..30 {
        let id = format!("lim-{i}");
        js_publish(&js, &id, txn_at(&id, "4111111111119004", "10", ts + i)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 30 {
        seen.insert(decision_id(&mut decisions, &engine).await);
    }
    drained(&js, "fraudgate").await;
    assert_eq!(
        engine.count_log("JetStream pull ended"),
        0,
        "{}",
        engine.log_text()
    );
}

/// The next message the engine forwards to fraud.invalid: its error code and
/// `Nats-Msg-Id`.
async fn refusal(invalid: &mut async_nats::Subscriber) -> (String, String) {
    let m = tokio::time::timeout(Duration::from_secs(10), invalid.next())
        .await
        .expect("forwarded in time")
        .unwrap();
    let h = m.headers.unwrap();
    let field = |name: &str| h.get(name).unwrap().as_str().to_string();
    (field("Fraudgate-Error-Code"), field("Nats-Msg-Id"))
}

/// Once the consumer is drained, nothing more comes to fraud.invalid past its ack_wait
/// (2 s): the forwarded message was settled (acknowledged or terminated), not delivered,
/// refused and forwarded again.
async fn not_delivered_again(js: &jetstream::Context, invalid: &mut async_nats::Subscriber) {
    drained(js, "fraudgate").await;
    let again = tokio::time::timeout(Duration::from_secs(4), invalid.next()).await;
    assert!(again.is_err(), "forwarded again: {again:?}");
}

/// A JetStream transaction the engine fails to decide (a fail point that panics for ids
/// starting with `failpoint-`): forwarded to fraud.invalid once and terminated, not
/// delivered again forever, and the transactions after it are decided.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_decision_is_forwarded_once_and_not_delivered_again() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-failpoint");
    let engine = Engine::start_env(
        &nats.url(),
        &js_config("fraudgate", &dir.0.join("s.snap"), "60s"),
        &[("FAILPOINTS", "decide=panic")],
    )
    .await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    let mut invalid = c.subscribe("fraud.invalid").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    let card = "4111111111119005";
    js_publish(&js, "failpoint-js", txn_at("failpoint-js", card, "10", ts)).await;
    js_publish(&js, "fp-js-ok", txn_at("fp-js-ok", card, "10", ts + 1)).await;
    assert_eq!(
        refusal(&mut invalid).await,
        ("internal".into(), "failpoint-js".into())
    );
    assert_eq!(decision_id(&mut decisions, &engine).await, "fp-js-ok");
    not_delivered_again(&js, &mut invalid).await;
    let engine = stop(engine).await;
    let stopped = engine.stopped_line();
    assert_eq!(stopped["fields"]["decision_failures"].as_u64(), Some(1));
}

/// A decision handed to a stream connection that is replaced before the server confirms
/// it read it (a fail point for ids starting with `failpoint-`: the acker sees the
/// connection changed): its acknowledgement is withheld, the message comes again after
/// `ack_wait` and is answered from the retry table with the same decision, counted once.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_whose_decision_went_to_a_replaced_connection_is_withheld() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-withheld");
    let snap = dir.0.join("s.snap");
    let engine = Engine::start_env(
        &nats.url(),
        &js_config("fraudgate", &snap, "60s"),
        &[("FAILPOINTS", "ack_reconnect=1*return")],
    )
    .await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    let body = txn_at("failpoint-withheld", "4111111111119006", "10", ts);
    js_publish(&js, "failpoint-withheld", body).await;
    // For 8 s: the redelivery comes 2 s after the first, and no other after it.
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, decisions.next()).await {
        seen.push(m.payload);
    }
    assert_eq!(
        seen.len(),
        2,
        "decided, then answered again after ack_wait (2 s)"
    );
    assert_eq!(seen[0], seen[1], "the redelivery got another decision");
    drained(&js, "fraudgate").await;
    let engine = stop(engine).await;
    let stopped = engine.stopped_line();
    assert_eq!(
        stopped["fields"]["acks_withheld"].as_u64(),
        Some(1),
        "{stopped}"
    );
    let counts = card_txn_1h(&snap);
    assert_eq!(counts, ["1"], "the card counted once");
}

/// A JetStream transaction under an id the engine decided within the retry horizon, with
/// other content (the stream deduplicates on `Nats-Msg-Id`, which the publisher set
/// otherwise): forwarded to fraud.invalid as `id_reused`, acknowledged, not delivered
/// again, and the original's decision stands alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_id_is_forwarded_as_refused_and_acknowledged() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-reused");
    let engine = Engine::start_with(
        &nats.url(),
        &js_config("fraudgate", &dir.0.join("s.snap"), "60s"),
    )
    .await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    let mut invalid = c.subscribe("fraud.invalid").await.unwrap();
    c.flush().await.unwrap();
    let ts = fraudgate::service::now_ms();
    let card = "4111111111119006";
    js_publish(&js, "reused-js", txn_at("reused-js", card, "10", ts)).await;
    assert_eq!(decision_id(&mut decisions, &engine).await, "reused-js");
    js_publish(
        &js,
        "reused-js#2",
        txn_at("reused-js", card, "7000", ts + 1),
    )
    .await;
    js_publish(
        &js,
        "reused-js-ok",
        txn_at("reused-js-ok", card, "10", ts + 2),
    )
    .await;
    assert_eq!(
        refusal(&mut invalid).await,
        ("id_reused".into(), "reused-js".into())
    );
    assert_eq!(decision_id(&mut decisions, &engine).await, "reused-js-ok");
    not_delivered_again(&js, &mut invalid).await;
    let engine = stop(engine).await;
    let stopped = engine.stopped_line();
    assert_eq!(stopped["fields"]["invalid"].as_u64(), Some(1), "{stopped}");
    assert_eq!(stopped["fields"]["decided"].as_u64(), Some(2), "{stopped}");
}

/// A backlog stored over 10 s is worked through in a moment, and the acknowledgement of
/// its first message is lost (a fail point). The message comes again after `ack_wait`
/// (2 s); by then the backlog's store times are 10 s on, past the retry horizon (3 s)
/// from the first message's. Its id must still be in the retry table: the redelivery is
/// answered as a retry, and the card is counted once in the windows, not twice.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_in_a_backlog_is_answered_as_a_retry() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let dir = Scratch::new("js-lost-ack");
    let snap = dir.0.join("s.snap");
    let config = format!(
        "{}{}dedupe_horizon = \"3s\"\n",
        js_config("fraudgate", &snap, "60s")
            .replace("[service]\n", "[service]\nsweep_interval = \"1s\"\n"),
        daytime_engine_table()
    );
    // The stream and the consumer, then a backlog while no engine runs.
    let _ = stop(Engine::start_with(&nats.url(), &config).await).await;
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    const N: i64 = 40;
    let ts = fraudgate::service::now_ms();
    js_publish(
        &js,
        "failpoint-ack",
        txn_at("failpoint-ack", "4111111111119100", "10", ts),
    )
    .await;
    for i in 1..=N {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let id = format!("backlog-{i}");
        let card = format!("4111111111{:06}", 119100 + i);
        js_publish(&js, &id, txn_at(&id, &card, "10", ts + i)).await;
    }
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    let engine = Engine::start_env(&nats.url(), &config, &[("FAILPOINTS", "ack=1*return")]).await;
    let mut first = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), decisions.next()).await
        {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["id"] == "failpoint-ack" {
                first += 1;
            }
        }
    }
    assert_eq!(first, 2, "decided, then answered again after the lost ack");
    drained(&js, "fraudgate").await;
    let engine = stop(engine).await;
    let counts = card_txn_1h(&snap);
    assert_eq!(counts.len(), N as usize + 1, "{}", engine.log_text());
    assert!(
        counts.iter().all(|v| v == "1"),
        "a card counted twice: {counts:?}"
    );
}

/// A durable consumer made beforehand keeps its own `ack_wait`: one at least as long as
/// the retry horizon is refused (its redeliveries would be counted again), and a longer
/// one than configured makes the engine keep ids for its redeliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_consumers_ack_wait_is_checked_against_the_retry_horizon() {
    let nats = fraudgate::demo::NatsServer::start(true).await.unwrap();
    let c = client(&nats.url()).await;
    let js = jetstream::new(c.clone());
    let stream = txn_stream(&js).await;
    let consumer = |ack_wait: u64| jetstream::consumer::pull::Config {
        durable_name: Some("fraudgate".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        filter_subject: "fraud.txn".into(),
        ack_wait: Duration::from_secs(ack_wait),
        ..Default::default()
    };
    stream.create_consumer(consumer(150)).await.unwrap();
    let dir = Scratch::new("js-ack-wait");
    let config = js_config("fraudgate", &dir.0.join("s.snap"), "60s");
    let cfg_path = dir.0.join("fraudgate.toml");
    std::fs::write(&cfg_path, format!("{config}{}", daytime_engine_table())).unwrap();
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_fraudgate"))
        .args(["run", "--nats-url", &nats.url(), "--rules"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"))
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("consumer fraudgate redelivers after 150s"),
        "{stderr}"
    );
    stream.delete_consumer("fraudgate").await.unwrap();
    stream.create_consumer(consumer(30)).await.unwrap();
    let engine = Engine::start_with(&nats.url(), &config).await;
    let log = engine.log_text();
    assert!(
        log.contains("the existing consumer redelivers later than [jetstream] ack_wait"),
        "{log}"
    );
    let ts = fraudgate::service::now_ms();
    let mut decisions = c.subscribe("fraud.decision.>").await.unwrap();
    c.flush().await.unwrap();
    js_publish(&js, "aw-1", txn_at("aw-1", "4111111111119200", "10", ts)).await;
    assert_eq!(decision_id(&mut decisions, &engine).await, "aw-1");
}

/// The acker's proof that the server read the decisions before their acks go out: a
/// request round trip on the stream connection with its connect count unchanged. Against
/// a real server restart: what was handed to the connection before the restart is never
/// confirmed (a publish queued there may have been dropped with it), nor while the server
/// is down; what goes out on the new connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_confirms_reading_only_on_the_connection_it_was_sent_on() {
    use fraudgate::transport::{self, Wire};
    let store = Scratch::new("js-confirm");
    let port = fraudgate::demo::free_port().unwrap();
    let nats = fraudgate::demo::NatsServer::start_on_store(port, &store.0)
        .await
        .unwrap();
    let url = nats.url();
    let counters = std::sync::Arc::new(fraudgate::telemetry::Counters::new());
    let section = fraudgate::config::NatsSection::default();
    let conn = |role| transport::connect(&section, &url, role, counters.clone());
    let wire = Wire::new(
        conn("check").await.unwrap(),
        conn("stream").await.unwrap(),
        Default::default(),
        1 << 20,
    );
    let wait = Duration::from_secs(2);
    // No such consumer here: the server's "not found" is an answer too.
    let probe = transport::confirm_subject("FRAUD_TXN", "fraudgate");
    let first = wire.stream_epoch();
    assert!(
        wire.stream_read_on(first, &probe, wait).await,
        "a healthy connection"
    );

    nats.stop().await;
    assert!(
        !wire
            .stream_read_on(first, &probe, Duration::from_millis(500))
            .await,
        "confirmed with the server down"
    );
    // A round trip asked while the server is down goes out on the next connection and
    // is answered there: that answer proves nothing about the connection before.
    let asked = {
        let (wire, probe) = (wire.clone(), probe.clone());
        tokio::spawn(async move {
            wire.stream_read_on(first, &probe, Duration::from_secs(30))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _nats = fraudgate::demo::NatsServer::start_on_store(port, &store.0)
        .await
        .unwrap();
    assert!(!asked.await.unwrap(), "confirmed across the reconnect");
    let deadline = Instant::now() + Duration::from_secs(20);
    while wire.stream_epoch() == first && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = wire.stream_epoch();
    assert_ne!(second, first, "the client did not reconnect");
    assert!(
        !wire.stream_read_on(first, &probe, wait).await,
        "confirmed for the connection that was replaced"
    );
    assert!(
        wire.stream_read_on(second, &probe, wait).await,
        "the new connection"
    );
}
