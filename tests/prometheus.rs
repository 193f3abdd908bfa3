//! The shipped dashboards and alerts against a real Prometheus scraping a real engine:
//! every PromQL expression of every dashboard panel must parse and return data, and every
//! alert rule must load. A panel that names a metric the engine does not export fails.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.0 GET (Prometheus answers HTTP/1.0 without chunking).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn query(port: u16, expr: &str) -> serde_json::Value {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", urlencode(expr)))
        .await
        .unwrap_or_else(|| panic!("no answer from Prometheus for {expr}"));
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{expr}: HTTP {status}, not JSON ({e}): {body}"));
    v
}

/// The selectors of fraudgate's series in a PromQL expression: each metric name with its
/// label matchers, if any (`fraudgate_x{a="b"}`).
fn fraudgate_selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("fraudgate_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut sel = tail[..name_len].to_string();
        let after = &tail[name_len..];
        let mut used = name_len;
        if after.starts_with('{') {
            let close = after.find('}').expect("a selector's matchers end") + 1;
            sel.push_str(&after[..close]);
            used += close;
        }
        out.push(sel);
        rest = &tail[used..];
    }
    out
}

/// Grafana variables replaced by what Grafana would send.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let prometheus = fraudgate::demo::find_on_path("prometheus")
        .expect("prometheus must be installed (scripts/test installs it)");
    let nats = nats().await;
    let metrics_port = fraudgate::demo::free_port().unwrap();
    let snap_dir = Scratch::new("prom-snap");
    let config = format!(
        "{CONFIG}\n[metrics]\naddr = \"127.0.0.1:{metrics_port}\"\n[snapshot]\npath = {:?}\ninterval = \"1s\"\n",
        snap_dir.0.join("state.snap").display().to_string()
    );
    let engine = Engine::start_with(&nats.url(), &config).await;

    // Prometheus scraping the engine every second, with the shipped alert rules.
    let dir = Scratch::new("prometheus");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prom_port = fraudgate::demo::free_port().unwrap();
    let cfg = dir.0.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fraudgate\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
            root.join("grafana/alerts.yml").display()
        ),
    )
    .unwrap();
    let mut prom = spawned(
        tokio::process::Command::new(prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap()),
    );

    // Prometheus is up and scraping the engine before anything happens, so every counter
    // has a sample before its first increase.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = http_get(
            prom_port,
            &format!("/api/v1/query?query={}", urlencode("up{job=\"fraudgate\"}")),
        )
        .await;
        let v: serde_json::Value = up
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default();
        if v["data"]["result"][0]["value"][1] == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the engine: {v}\n{}",
            std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Traffic on both paths, with bad input, retries, a reload and a failed reload.
    let c = client(&nats.url()).await;
    let started = Instant::now();
    let mut i = 0u64;
    let mut reloaded = false;
    let mut broke = false;
    while started.elapsed() < Duration::from_secs(12) {
        for _ in 0..20 {
            i += 1;
            let amount = if i.is_multiple_of(17) {
                "12000"
            } else {
                "20.00"
            };
            let body = txn(&format!("pm-{i}"), &format!("48{:014}", i % 300), amount);
            let decision = check(&c, &body).await;
            // Outcomes reported for some: verdicts on the rejected ones (fired rules),
            // chargebacks on approved ones, refunds without the decision, a repeat and a
            // bad one.
            let kind = match decision["action"].as_str() {
                Some("reject") if i.is_multiple_of(2) => Some("fraud"),
                Some("reject") => Some("genuine"),
                Some("approve") if i.is_multiple_of(10) => Some("chargeback"),
                _ => None,
            };
            let mut outcomes = Vec::new();
            if let Some(kind) = kind {
                outcomes.push(format!(
                    r#"{{"id":"pm-{i}","outcome":"{kind}","decision":{decision}}}"#
                ));
            }
            if i.is_multiple_of(13) {
                outcomes.push(format!(r#"{{"id":"pm-{i}","outcome":"refund"}}"#));
            }
            if i.is_multiple_of(50) {
                outcomes.extend(outcomes.clone());
                outcomes.push("{broken".into());
            }
            for o in outcomes {
                c.publish("fraud.outcome", Bytes::from(o)).await.unwrap();
            }
            if i.is_multiple_of(5) {
                let _ = check(&c, &body).await; // a retry
            }
            c.publish(
                "fraud.txn",
                Bytes::from(txn(&format!("ps-{i}"), &format!("49{:014}", i % 300), "15")),
            )
            .await
            .unwrap();
            if i.is_multiple_of(50) {
                let _ = check(&c, "{broken").await;
                c.publish("fraud.txn", Bytes::from_static(b"{broken"))
                    .await
                    .unwrap();
            }
        }
        if !reloaded && started.elapsed() > Duration::from_secs(3) {
            let head = std::fs::read_to_string(engine.rules.join("00-ruleset.toml"))
                .unwrap()
                .replace("version = \"2026-11-26.1\"", "version = \"2026-11-26.9\"");
            engine.write_rule_file("00-ruleset.toml", &head);
            reloaded = true;
        }
        if !broke && started.elapsed() > Duration::from_secs(5) {
            engine.write_rule_file("zz-broken.toml", "[[rule]]\nid = \"x\"\n");
            broke = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine
        .wait_log("rules reloaded", Duration::from_secs(5))
        .await;
    engine
        .wait_log("rule reload failed", Duration::from_secs(5))
        .await;

    // A few more scrapes after the last change.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every expression of every panel.
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(root.join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let board: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            board["templating"]["list"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["type"] == "datasource"),
            "{}: datasource variable",
            path.display()
        );
        for panel in board["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(panel["description"].as_str().is_some_and(|d| !d.is_empty()));
            assert!(panel["fieldConfig"]["defaults"]["unit"].is_string());
            for target in panel["targets"].as_array().unwrap() {
                let expr = grafana_to_promql(target["expr"].as_str().unwrap());
                let v = query(prom_port, &expr).await;
                checked += 1;
                let result = v["data"]["result"].as_array();
                // A quantile over buckets that never moved is NaN: the panel would draw
                // nothing. At least one of its series must hold a number.
                let finite = |r: &Vec<serde_json::Value>| {
                    !expr.contains("histogram_quantile")
                        || r.iter()
                            .any(|s| s["value"][1].as_str().is_some_and(|x| x != "NaN"))
                };
                let ok =
                    v["status"] == "success" && result.is_some_and(|r| !r.is_empty() && finite(r));
                if !ok {
                    failures.push(format!(
                        "{} / {}: {expr}\n  -> {v}",
                        path.display(),
                        panel["title"]
                    ));
                }
            }
        }
    }
    assert!(checked >= 30, "only {checked} expressions found");
    assert!(
        failures.is_empty(),
        "{} of {checked} panel queries failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every alert rule loaded and evaluates without error.
    let (_, body) = http_get(prom_port, "/api/v1/rules").await.unwrap();
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let in_file = std::fs::read_to_string(root.join("grafana/alerts.yml"))
        .unwrap()
        .matches("- alert:")
        .count();
    assert!(in_file >= 12, "{in_file} alerts in grafana/alerts.yml");
    assert_eq!(loaded.len(), in_file, "{rules}");
    // ... and every series it selects exists in what the engine exports (an alert on a
    // misspelt name or label evaluates fine, to nothing, and never fires).
    let mut selectors = 0;
    for r in loaded {
        assert_ne!(r["health"], "err", "{r}");
        for sel in fraudgate_selectors(r["query"].as_str().unwrap()) {
            selectors += 1;
            let v = query(prom_port, &format!("count({sel})")).await;
            let selected = v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
            if !selected {
                failures.push(format!("alert {}: {sel} selects nothing", r["name"]));
            }
        }
    }
    assert!(
        selectors >= in_file,
        "only {selectors} selectors in the alerts"
    );
    assert!(
        failures.is_empty(),
        "alert selectors:\n{}",
        failures.join("\n")
    );
    // The failed reload is visible to the alert expression.
    let v = query(
        prom_port,
        "sum(increase(fraudgate_rule_reloads_total{result=\"failure\"}[10m])) > 0",
    )
    .await;
    assert!(!v["data"]["result"].as_array().unwrap().is_empty(), "{v}");
    let _ = prom.kill().await;
}
