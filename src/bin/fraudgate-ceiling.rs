//! The ceiling of the end-to-end benchmark: a bare async-nats responder that only decodes
//! the transaction JSON and encodes a fixed decision, on the same subjects as fraudgate.
//! Whatever fraudgate adds (windows, rules, dedupe, workers, metrics) is measured against it.
//!
//! `fraudgate-ceiling --nats-url nats://127.0.0.1:4222`

use bytes::Bytes;
use futures::StreamExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fixed_decision(id: &str) -> Bytes {
    let id = serde_json::to_string(id).unwrap_or_else(|_| "\"\"".into());
    Bytes::from(format!(
        r#"{{"id":{id},"action":"approve","score":0,"decided_by":"default","rules":[],"rules_version":"ceiling","engine_us":0}}"#
    ))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut url = "nats://127.0.0.1:4222".to_string();
    while let Some(a) = args.next() {
        if a == "--nats-url" {
            url = args.next().unwrap_or(url);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let client = async_nats::connect(url).await?;
            let mut check = client
                .queue_subscribe("fraud.check", "fraudgate".into())
                .await?;
            let mut txn = client
                .queue_subscribe("fraud.txn", "fraudgate".into())
                .await?;
            client.flush().await?;
            eprintln!("fraudgate-ceiling is taking transactions");
            let c = client.clone();
            let checks = tokio::spawn(async move {
                while let Some(m) = check.next().await {
                    let Ok(t) = fraudgate::Transaction::from_json(&m.payload) else {
                        continue;
                    };
                    if let Some(reply) = m.reply {
                        let _ = c.publish(reply, fixed_decision(&t.id)).await;
                    }
                }
            });
            let c = client.clone();
            let stream = tokio::spawn(async move {
                while let Some(m) = txn.next().await {
                    let Ok(t) = fraudgate::Transaction::from_json(&m.payload) else {
                        continue;
                    };
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", t.id.as_str());
                    let _ = c
                        .publish_with_headers("fraud.decision.approve", h, fixed_decision(&t.id))
                        .await;
                }
            });
            tokio::signal::ctrl_c().await?;
            checks.abort();
            stream.abort();
            Ok(())
        })
}
