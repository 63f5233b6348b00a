//! What a hostile or merely slow client can cost the gateway: frames lost to a slow socket,
//! CPU spent counting tokens, memory pinned by refused opens, unauthenticated sockets and
//! finished streams. Each test runs the real gateway on loopback against the mock upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use muxgate::test_support;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// The text the mock sends for `prompt` in `n` chunks padded to `pad` bytes each.
fn padded(prompt: &str, n: usize, pad: usize) -> String {
    muxgate::mock::word_chunks(prompt, n)
        .iter()
        .map(|c| {
            let word = c.trim_end();
            format!("{word}{} ", ".".repeat(pad - word.len() - 1))
        })
        .collect()
}

/// The next frame of stream `id`, skipping others.
async fn next_of(c: &mut Client, id: &str) -> serde_json::Value {
    loop {
        let f = c.recv().await;
        if f["id"] == id {
            return f;
        }
    }
}

/// A client too slow for the write timeout is closed 4408; the frames the timed-out write held
/// are still in the log, so the resume from the last frame it read continues with no gap:
/// the whole text, no `not_found`.
#[tokio::test]
async fn a_slow_consumer_resumes_with_nothing_lost() {
    let h = Harness::start_with(|c| {
        c.session.stream_buffer_bytes = 64 * 1024;
        c.session.write_timeout_ms = 300;
        c.session.heartbeat_ms = 60_000;
    })
    .await;
    let n = 20_000;
    let prompt = format!("slow [[mock chunks={n} chunk_bytes=4096]]");
    let mut c = h.connect("alice").await;
    c.open("big", &prompt).await;
    let mut r = StreamRecord::default();
    while r.deltas == 0 {
        r.take(next_of(&mut c, "big").await);
    }
    // Stop reading until the gateway gives up on this socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.gw.user_stats("alice").map_or(0, |s| s.connections) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow reader was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Read what reached the socket before the drop.
    loop {
        match c.next_event().await {
            Event::Frame(f) if f["id"] == "big" => r.take(f),
            Event::Frame(_) => {}
            Event::Closed(code) => {
                assert!(matches!(code, None | Some(4408)), "{code:?}");
                break;
            }
        }
    }
    assert!(r.end.is_none(), "the drop came before the end");
    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"big","after":r.last_seq}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["big"]));
    while r.end.is_none() {
        let f = next_of(&mut c, "big").await;
        assert_ne!(f["type"], "error", "resume after {}: {f}", r.last_seq);
        r.take(f);
    }
    assert_eq!(r.end_type(), "done");
    assert_eq!(r.deltas, n as u64);
    assert!(r.text == padded("slow", n, 4096), "the exact text");
}

/// A prompt whose `name` is `bytes` long: short `content`, so the old size check (over
/// `content` only) counted it on an async worker. Runs of one repeated character are the
/// tokenizer's worst case; 4,000 bytes each, so that every run is merged (a longer piece counts
/// a token per byte, unmerged, since issue 15).
fn big_name_open(id: &str, bytes: usize) -> serde_json::Value {
    let mut name = format!("{} ", "a".repeat(3_999)).repeat(bytes / 4_000 + 1);
    name.truncate(bytes);
    json!({"type":"open","id":id,"model":"deepseek-v3.2",
        "messages":[{"role":"user","name":name,"content":"hi [[mock chunks=2]]"}]})
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(h: &Harness) -> String {
    reqwest::get(format!("http://{}/metrics", h.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Opens refused by a limit are refused before anything is spent on them: no tokenizer run,
/// no `Stream` registered (so nothing lingers for the resume window), and the client gets
/// the same `rate_limited` frame as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_opens_cost_no_tokenizer_and_no_stream() {
    let h = Harness::start_with(|c| {
        let free = c.tiers.get_mut("free").unwrap();
        free.user_rpm = 1;
    })
    .await;
    let mut c = h.connect_tier("bob", "free").await;
    c.open("ok", "fine [[mock chunks=3]]").await;
    let mut r = StreamRecord::default();
    while r.end.is_none() {
        r.take(next_of(&mut c, "ok").await);
    }
    assert_eq!(r.end_type(), "done");
    let counted = metric(&scrape(&h).await, "muxgate_tokenizer_bytes_total");
    assert!(counted > 0.0, "the admitted prompt was counted");
    for i in 0..20 {
        let id = format!("no{i}");
        c.send(big_name_open(&id, 1_000_000)).await;
        let f = next_of(&mut c, &id).await;
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["code"], "rate_limited", "{f}");
        assert!(f["retry_after_ms"].as_u64().unwrap() > 0, "{f}");
        assert!(
            test_support::stream_buffered_bytes(&h.gw, "bob", &id).is_none(),
            "a refused open registers no stream"
        );
    }
    let text = scrape(&h).await;
    assert_eq!(
        metric(&text, "muxgate_tokenizer_bytes_total"),
        counted,
        "refused opens were not tokenized"
    );
    assert_eq!(
        metric(&text, r#"muxgate_refusals_total{reason="user_rpm"}"#),
        20.0
    );
}

/// A client sending prompts with a huge `name` does not stall a healthy stream on another
/// socket: the tokenizer runs off the async workers, so the healthy connection keeps answering
/// heartbeats and its stream arrives whole while the hostile prompts are counted. On the old
/// code the prompts were counted on the async workers themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_prompts_do_not_stall_a_healthy_stream() {
    let h = Harness::start_with(|c| {
        // Silence for two heartbeats drops a client: 4 s, well above this machine's noise and
        // well below what counting a 1 MB prompt takes on an async worker in a debug build.
        c.session.heartbeat_ms = 2_000;
        c.tiers.get_mut("pro").unwrap().user_rpm = 10_000;
        // The whole 1 MB name through the tokenizer (the default allowance would count most of
        // it a token per byte, unmerged): what is tested is where the tokenizer runs.
        c.limits.prompt_count_bytes = 1 << 20;
    })
    .await;
    let mut healthy = h.connect("alice").await;
    healthy
        .open("calm", "calm [[mock chunks=150 delay_ms=20]]")
        .await;
    let mut r = StreamRecord::default();
    while r.deltas == 0 {
        r.take(next_of(&mut healthy, "calm").await);
    }
    // Reads (and so answers the gateway's pings) until told to stop; the stream may end
    // before the hostile prompts are all counted.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                event = healthy.next_event() => event,
                _ = &mut stopped => return Ok(r),
            };
            match event {
                Event::Frame(f) if f["id"] == "calm" => r.take(f),
                Event::Frame(_) => {}
                Event::Closed(code) => return Err(code),
            }
        }
    });
    // Two hostile sockets, so that on the old code both workers were busy tokenizing. They
    // read (and so answer pings) in the background: only their prompts are hostile.
    let mut hostile = Vec::new();
    for user in ["mallory", "trudy"] {
        let (tx, mut rx) = h.connect(user).await.ws.split();
        tokio::spawn(async move { while rx.next().await.is_some() {} });
        hostile.push(tx);
    }
    let before = metric(&scrape(&h).await, "muxgate_tokenizer_bytes_total");
    for round in 0..2 {
        for (k, tx) in hostile.iter_mut().enumerate() {
            let open = big_name_open(&format!("h{round}-{k}"), 1_000_000);
            tx.send(Message::Text(open.to_string().into()))
                .await
                .unwrap();
        }
    }
    // Wait until all four hostile prompts were counted (a debug build on a loaded box took
    // over 120 s for it: this only bounds the wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while metric(&scrape(&h).await, "muxgate_tokenizer_bytes_total") < before + 4_000_000.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hostile prompts never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reader may already have ended, with the close code.
    let _ = stop.send(());
    let r = reader
        .await
        .unwrap()
        .unwrap_or_else(|code| panic!("the healthy client was dropped ({code:?})"));
    assert_eq!(r.end_type(), "done");
    assert_eq!(r.text, expected("calm", 150));
}

/// Before `hello`, a socket can make the gateway read no more than `max_hello_bytes`: a 30 MB
/// first frame (under the WebSocket layer's own limit of 8 × `max_frame_bytes`) is not read,
/// so the client's send never completes, and the socket gets `unauthorized` and 4401 when the
/// hello timeout runs out. On the old code the gateway read and buffered the whole frame first.
#[tokio::test]
async fn an_unauthenticated_socket_cannot_make_the_gateway_buffer_a_big_frame() {
    let h = Harness::start_with(|c| {
        c.session.max_frame_bytes = 4 << 20;
        c.session.hello_timeout_ms = 1_000;
    })
    .await;
    let (mut tx, mut rx) = h.connect_raw().await.ws.split();
    let sender = tokio::spawn(async move {
        let frame = "x".repeat(30_000_000);
        tx.send(Message::Text(frame.into())).await
    });
    let mut error = None;
    let code = loop {
        match tokio::time::timeout(FRAME_WAIT, rx.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                error = Some(serde_json::from_str::<serde_json::Value>(&t).unwrap())
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(code, Some(4401));
    let error = error.expect("an error frame before the close");
    assert_eq!(error["code"], "unauthorized");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("max_hello_bytes (65536)"),
        "{error}"
    );
    assert!(
        !sender.is_finished(),
        "the gateway stopped reading: the 30 MB frame could not be sent"
    );
    sender.abort();
    // A proper hello on a new socket is unaffected, and so are large frames after it.
    let mut c = h.connect("alice").await;
    c.send_text(&format!(
        r#"{{"type":"ping","ts":"{}"}}"#,
        "p".repeat(2 << 20)
    ))
    .await;
    assert_eq!(c.recv().await["type"], "pong");
}

/// `welcome.resumed` lists only the streams that were attached and will replay: a stream
/// whose frames after `after` were already dropped is left out and gets `not_found` (on the
/// old code it was listed, then refused).
#[tokio::test]
async fn welcome_does_not_list_a_stream_it_cannot_replay() {
    let h = Harness::start_with(|c| c.session.stream_buffer_bytes = 16 * 1024).await;
    let mut c = h.connect("alice").await;
    c.open("long", "long [[mock chunks=100 chunk_bytes=1024]]")
        .await;
    let mut r = StreamRecord::default();
    while r.end.is_none() {
        r.take(next_of(&mut c, "long").await);
    }
    assert_eq!(r.end_type(), "done");
    c.close().await;
    // The first frames were written and trimmed long ago: no replay from 0.
    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"long","after":0}]))
        .await;
    assert_eq!(welcome["resumed"], json!([]), "{welcome}");
    let f = next_of(&mut c, "long").await;
    assert_eq!(f["code"], "not_found", "{f}");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("no longer be replayed"),
        "{f}"
    );
}

/// Finished streams kept for a resume count against `retained_bytes_per_user`: past it the
/// oldest are forgotten early, the newest stay resumable.
#[tokio::test]
async fn finished_streams_pin_no_more_than_the_user_budget() {
    let budget = 24 * 1024;
    let h = Harness::start_with(|c| c.session.retained_bytes_per_user = budget).await;
    let mut c = h.connect("alice").await;
    for i in 0..6 {
        let id = format!("s{i}");
        c.open(
            &id,
            &format!("answer {i} [[mock chunks=10 chunk_bytes=1024]]"),
        )
        .await;
        let mut r = StreamRecord::default();
        while r.end.is_none() {
            r.take(next_of(&mut c, &id).await);
        }
        assert_eq!(r.end_type(), "done");
    }
    // Each log holds ~10.5 KiB: two fit in 24 KiB.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.gw.user_stats("alice").unwrap().live_streams > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(test_support::retained_bytes(&h.gw, "alice") <= budget);
    c.close().await;
    let resume = json!([{"id":"s0","after":0},{"id":"s5","after":0}]);
    let (mut c, welcome) = h.connect_resume("alice", resume).await;
    assert_eq!(welcome["resumed"], json!(["s5"]), "{welcome}");
    let f = next_of(&mut c, "s0").await;
    assert_eq!(f["code"], "not_found", "{f}");
}

/// Users who leave leave nothing behind in the hub: its map of users only holds users with a
/// connection or a stream.
#[tokio::test]
async fn users_who_leave_are_pruned_from_the_hub() {
    let h = Harness::start().await;
    for i in 0..30 {
        let c = h.connect(&format!("visitor{i}")).await;
        c.close().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while test_support::tracked_users(&h.gw) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} users still tracked",
            test_support::tracked_users(&h.gw)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.admin("/admin/users").await["users"], json!([]));
}
