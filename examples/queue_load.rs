//! The priority queue under load, end to end on loopback: the real gateway and mock upstream
//! in-process, one provider capped at a few upstream slots, and users of three tiers opening
//! more streams than it can run. Prints how long each tier waited for a slot.
//!
//! `cargo run --release --example queue_load [-- SLOTS FREE PRO ENTERPRISE]`
//! (default: 6 slots, 30 free, 20 pro, 10 enterprise streams of 25 chunks 20 ms apart).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use muxgate::{mock, Config, Gateway};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (slots, counts) = (
        arg(0, 6),
        [
            ("free", arg(1, 30)),
            ("pro", arg(2, 20)),
            ("enterprise", arg(3, 10)),
        ],
    );

    let mock = mock::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), None)
        .await
        .unwrap();
    let env = |name: &str| {
        (name == "MUXGATE_JWT_SECRET").then(|| "queue-load-secret-0123456789".to_string())
    };
    let mut config = Config::load_with_env(None, &env).unwrap();
    config.providers = vec![muxgate::config::ProviderConfig::catch_all(
        "mock",
        mock.base_url(),
        None,
    )];
    config.providers[0].max_concurrent = slots;
    config.session.max_streams = 1000;
    let aging = config.scheduler.aging_ms;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = Gateway::start(config).await.unwrap();
    tokio::spawn(muxgate::serve(listener, gw.clone(), std::future::pending()));
    println!(
        "provider cap {slots} slots, aging {aging} ms; streams: {counts:?}, 25 chunks x 20 ms each"
    );

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (tier, n) in counts {
        let token = gw
            .issue_token(&format!("{tier}-user"), tier, Duration::from_secs(600))
            .unwrap();
        let url = format!("ws://{addr}/v1/ws");
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            ws.send(Message::Text(
                json!({"type":"hello","token":token}).to_string().into(),
            ))
            .await
            .unwrap();
            for i in 0..n {
                let open = json!({"type":"open","id":format!("{tier}-{i}"),"model":"m",
                    "messages":[{"role":"user","content":"[[mock chunks=25 delay_ms=20]]"}]});
                ws.send(Message::Text(open.to_string().into()))
                    .await
                    .unwrap();
            }
            // (start time, max queue position seen) per stream
            let mut seen: HashMap<String, (Option<Duration>, u64)> = HashMap::new();
            let mut ended = 0;
            while ended < n {
                let Some(Ok(Message::Text(t))) = ws.next().await else {
                    panic!("socket closed")
                };
                let f: Value = serde_json::from_str(&t).unwrap();
                let Some(id) = f["id"].as_str() else { continue };
                let entry = seen.entry(id.to_string()).or_default();
                match f["type"].as_str().unwrap() {
                    "queued" => entry.1 = entry.1.max(f["position"].as_u64().unwrap()),
                    "start" => entry.0 = Some(t0.elapsed()),
                    "done" => ended += 1,
                    "error" => panic!("{f}"),
                    _ => {}
                }
            }
            (tier, seen)
        }));
    }
    let mut sample = tokio::time::interval(Duration::from_millis(250));
    let mut depth_samples = Vec::new();
    while !tasks.iter().all(|t| t.is_finished()) {
        sample.tick().await;
        let (active, queued, by_tier) =
            muxgate::test_support::provider_load(&gw, 0).expect("one provider");
        let mut by_tier: Vec<String> = by_tier.iter().map(|(t, n)| format!("{t}={n}")).collect();
        by_tier.sort();
        depth_samples.push(format!(
            "t={:>5} ms active={active} queued={queued:>2} [{}]",
            t0.elapsed().as_millis(),
            by_tier.join(" ")
        ));
    }
    println!("queue depth every 250 ms:");
    for line in depth_samples.iter().take(12) {
        println!("  {line}");
    }
    println!("time from open to start (the wait for an upstream slot):");
    println!(
        "{:<11} {:>7} {:>14} {:>14} {:>12}",
        "tier", "streams", "wait p50 (ms)", "wait max (ms)", "max position"
    );
    for task in tasks {
        let (tier, seen) = task.await.unwrap();
        let mut waits: Vec<u128> = seen.values().map(|(s, _)| s.unwrap().as_millis()).collect();
        waits.sort();
        let max_pos = seen.values().map(|(_, p)| *p).max().unwrap_or(0);
        println!(
            "{:<11} {:>7} {:>14} {:>14} {:>12}",
            tier,
            waits.len(),
            waits[waits.len() / 2],
            waits[waits.len() - 1],
            max_pos
        );
    }
    let stats = mock.stats();
    println!(
        "mock upstream: {} requests, {} completed",
        stats.requests, stats.completed
    );
}
