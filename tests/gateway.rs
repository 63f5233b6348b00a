//! Black-box tests: the real gateway and mock upstream on loopback, real WebSocket clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn fifty_concurrent_streams_on_one_socket_get_exact_text() {
    let h = Harness::start_with(|c| c.session.max_streams = 64).await;
    let mut c = h.connect("alice").await;
    let ids = ids("t1", 50);
    for (i, id) in ids.iter().enumerate() {
        c.open(
            id,
            &format!("question {i} [[mock chunks={} delay_ms=2]]", 20 + i),
        )
        .await;
    }
    let records = c.collect(&ids).await;
    for (i, id) in ids.iter().enumerate() {
        let r = &records[id];
        assert_eq!(r.end_type(), "done", "{id}: {:?}", r.end);
        assert!(r.started, "{id} had a start frame");
        assert_eq!(r.text, expected(&format!("question {i}"), 20 + i), "{id}");
        let end = r.end.as_ref().unwrap();
        assert_eq!(end["finish_reason"], "stop");
        assert_eq!(end["usage"]["completion_tokens"], 20 + i as u64, "{end}");
        assert!(
            end["cost_usd"].as_f64().unwrap() > 0.0,
            "priced model: {end}"
        );
    }
    let stats = h.mock.stats();
    assert_eq!(stats.requests, 50);
    assert_eq!(stats.completed, 50);
    let users = h.gw.user_stats("alice").unwrap();
    assert_eq!(users.connections_total, 1);
}

#[tokio::test]
async fn streams_progress_concurrently_not_in_turn() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let ids = ids("c", 8);
    for id in &ids {
        c.open(id, "[[mock chunks=10 delay_ms=40]]").await;
    }
    // If streams ran one after another, the first would end before the others sent anything.
    let mut started = std::collections::HashSet::new();
    loop {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "delta" => {
                started.insert(f["id"].as_str().unwrap().to_string());
            }
            "done" | "error" => break,
            _ => {}
        }
    }
    assert_eq!(
        started.len(),
        ids.len(),
        "every stream sent text before the first ended"
    );
}

#[tokio::test]
async fn cancel_aborts_the_upstream_request() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    cancel_mid_stream(&h, &mut c, "s1").await;
    assert!(h.mock.stats().chunks_sent < 1000);
    // The connection lives on, and the id can be used again.
    c.open("s1", "again [[mock chunks=3]]").await;
    let records = c.collect(&["s1".to_string()]).await;
    assert_eq!(records["s1"].text, expected("again", 3));
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let h = Harness::start_with(|c| {
        c.session.max_streams = 2;
        c.session.max_frame_bytes = 4096;
    })
    .await;
    let mut c = h.connect("alice").await;

    c.send_text("{not json").await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{e}"
    );
    assert!(e["id"].is_null());

    c.send(json!({"type":"subscribe","id":"x"})).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("subscribe"), "{e}");

    for bad_id in ["", "has space", "slash/id", &"x".repeat(65)] {
        c.open(bad_id, "hi").await;
        let e = c.recv().await;
        assert_eq!(e["code"], "bad_request", "id {bad_id:?}: {e}");
    }

    c.send_text(&format!(
        r#"{{"type":"ping","ts":1,"pad":"{}"}}"#,
        "x".repeat(5000)
    ))
    .await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    assert!(
        e["message"].as_str().unwrap().contains("max_frame_bytes"),
        "{e}"
    );

    c.send(json!({"type":"open","id":"m1","model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}],"params":{"stream":false}})).await;
    let e = c.recv().await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("m1"), Some("bad_request")),
        "{e}"
    );

    c.send(json!({"type":"open","id":"m2","model":"deepseek-v3.2","messages":[]}))
        .await;
    assert_eq!(c.recv().await["code"], "bad_request");

    c.send(json!({"type":"cancel","id":"nope"})).await;
    let e = c.recv().await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("nope"), Some("not_found")),
        "{e}"
    );

    c.send(json!({"type":"hello","token":"x"})).await;
    assert_eq!(c.recv().await["code"], "bad_request");

    c.open("d1", "[[mock chunks=200 delay_ms=20]]").await;
    c.open("d1", "[[mock chunks=2]]").await;
    let e = c.recv_until("error", Some("d1")).await;
    assert_eq!(e["code"], "duplicate_id");
    c.open("d2", "[[mock chunks=200 delay_ms=20]]").await;
    c.open("d3", "[[mock chunks=2]]").await;
    let e = c.recv_until("error", Some("d3")).await;
    assert_eq!(e["code"], "too_many_streams", "{e}");

    c.send(json!({"type":"ping","ts":42})).await;
    let pong = c.recv_until("pong", None).await;
    assert_eq!(pong["ts"], 42);
    // The live streams were not disturbed by any of it.
    c.send(json!({"type":"cancel","id":"d1"})).await;
    c.send(json!({"type":"cancel","id":"d2"})).await;
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let f = c.recv().await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "cancelled", "{f}");
            ended.push(f["id"].as_str().unwrap().to_string());
        }
    }
    ended.sort();
    assert_eq!(ended, vec!["d1", "d2"]);
}

#[tokio::test]
async fn unknown_model_is_bad_request() {
    let h = Harness::start_with(|c| {
        c.providers[0].models = vec!["deepseek-v3.2".into()];
    })
    .await;
    let mut c = h.connect("alice").await;
    c.send(
        json!({"type":"open","id":"a","model":"gpt-9","messages":[{"role":"user","content":"hi"}]}),
    )
    .await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("gpt-9"), "{e}");
}

#[tokio::test]
async fn repeated_abuse_closes_with_4400() {
    let h = Harness::start_with(|c| c.session.max_bad_frames_per_minute = 3).await;
    let mut c = h.connect("alice").await;
    for _ in 0..4 {
        c.send_text("garbage").await;
    }
    let mut errors = 0;
    loop {
        match c.next_event().await {
            Event::Frame(f) => {
                assert_eq!(f["code"], "bad_request");
                errors += 1;
            }
            Event::Closed(code) => {
                assert_eq!(code, Some(4400));
                break;
            }
        }
    }
    assert_eq!(errors, 4);
}

#[tokio::test]
async fn handshake_refusals_close_4401() {
    let h = Harness::start_with(|c| c.session.hello_timeout_ms = 300).await;

    let mut c = h.connect_raw().await;
    c.open("a", "hi").await;
    let m = c.expect_unauthorized_close().await;
    assert!(m.contains("hello"), "{m}");

    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":"not-a-jwt"})).await;
    c.expect_unauthorized_close().await;

    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"alice","tier":"pro","exp": muxgate::test_support::unix_now() - 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":expired})).await;
    let m = c.expect_unauthorized_close().await;
    assert!(m.contains("expired"), "{m}");

    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"alice","tier":"pro","exp": muxgate::test_support::unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-entirely"),
    )
    .unwrap();
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":forged})).await;
    c.expect_unauthorized_close().await;

    // No hello at all.
    let mut c = h.connect_raw().await;
    let m = c.expect_unauthorized_close().await;
    assert!(m.contains("no `hello`"), "{m}");
}

#[tokio::test]
async fn origin_allow_list() {
    let h = Harness::start_with(|c| {
        c.allowed_origins = vec!["https://chat.example.com".into()];
        c.server.public_origins = vec!["https://gw.example".into()];
    })
    .await;
    let url = h.ws_url();
    let refused =
        tokio_tungstenite::connect_async(request_with_origin(&url, "https://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("foreign origin was not refused: {:?}", other.map(|_| ())),
    }
    tokio_tungstenite::connect_async(request_with_origin(&url, "https://chat.example.com"))
        .await
        .unwrap();
    tokio_tungstenite::connect_async(request_with_origin(&url, "https://gw.example"))
        .await
        .unwrap();
    // In production, `Origin` equal to `Host` proves nothing (DNS rebinding): only the
    // configured public origins count as the gateway's own.
    let same = format!("http://{}", h.addr);
    match tokio_tungstenite::connect_async(request_with_origin(&url, &same)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("Origin == Host was let through: {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn subprotocol_is_accepted_when_offered() {
    let h = Harness::start().await;
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(h.ws_url())
            .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "muxgate.v1".parse().unwrap());
    let (_, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "muxgate.v1");
}

#[tokio::test]
async fn retry_succeeds_after_two_429s() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open(
        "r",
        "retry me [[mock chunks=5 fail=429 fail_times=2 retry_after_ms=30]]",
    )
    .await;
    let records = c.collect(&["r".into()]).await;
    assert_eq!(records["r"].end_type(), "done", "{:?}", records["r"].end);
    assert_eq!(records["r"].text, expected("retry me", 5));
    let s = h.mock.stats();
    assert_eq!((s.requests, s.errors_injected, s.completed), (3, 2, 1));
}

#[tokio::test]
async fn gives_up_after_repeated_500s() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open("r", "[[mock chunks=5 fail=500 fail_times=100]]")
        .await;
    let records = c.collect(&["r".into()]).await;
    let r = &records["r"];
    assert_eq!(r.error_code(), "upstream_error", "{:?}", r.end);
    assert!(r.end.as_ref().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("500"));
    assert_eq!(r.deltas, 0);
    assert_eq!(h.mock.stats().requests, 3, "max_attempts = 3");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open("r", "[[mock chunks=5 fail=400 fail_times=100]]")
        .await;
    let records = c.collect(&["r".into()]).await;
    assert_eq!(records["r"].error_code(), "upstream_error");
    assert_eq!(h.mock.stats().requests, 1);
}

#[tokio::test]
async fn cut_mid_stream_ends_in_upstream_error_without_duplicates() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open("cut", "cut me [[mock chunks=20 cut=5]]").await;
    let records = c.collect(&["cut".into()]).await;
    let r = &records["cut"];
    assert_eq!(r.error_code(), "upstream_error", "{:?}", r.end);
    assert_eq!(r.text, mock_prefix("cut me", 20, 5));
    assert_eq!(r.last_seq, 5);
    let s = h.mock.stats();
    assert_eq!(
        (s.requests, s.cut),
        (1, 1),
        "never retried after text went out"
    );
}

fn mock_prefix(prompt: &str, n: usize, k: usize) -> String {
    muxgate::mock::word_chunks(prompt, n)[..k].concat()
}

#[tokio::test]
async fn resume_after_a_drop_has_no_gap_and_no_duplicate() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open("t1:7", "resume [[mock chunks=60 delay_ms=5]]").await;
    c.open("t1:8", "second [[mock chunks=40 delay_ms=5]]").await;
    let mut first = StreamRecord::default();
    let mut second = StreamRecord::default();
    while first.last_seq < 10 {
        let f = c.recv().await;
        match f["id"].as_str() {
            Some("t1:7") => first.take(f),
            Some("t1:8") => second.take(f),
            _ => {}
        }
    }
    drop(c); // the socket dies without a close handshake
    tokio::time::sleep(Duration::from_millis(100)).await;

    let resume = json!([{"id":"t1:7","after":first.last_seq},{"id":"t1:8","after":second.last_seq},{"id":"ghost","after":0}]);
    let (mut c, welcome) = h.connect_resume("alice", resume).await;
    let mut resumed: Vec<String> = serde_json::from_value(welcome["resumed"].clone()).unwrap();
    resumed.sort();
    assert_eq!(resumed, vec!["t1:7", "t1:8"]);
    let mut ghost_seen = false;
    while first.end.is_none() || second.end.is_none() {
        let f = c.recv().await;
        match f["id"].as_str() {
            Some("t1:7") => first.take(f),
            Some("t1:8") => second.take(f),
            Some("ghost") => {
                assert_eq!(f["code"], "not_found");
                ghost_seen = true;
            }
            _ => {}
        }
    }
    assert!(ghost_seen);
    assert_eq!(first.text, expected("resume", 60));
    assert_eq!(second.text, expected("second", 40));
    assert_eq!(first.end_type(), "done");
    assert_eq!(
        h.mock.stats().requests,
        2,
        "resume never re-asks the upstream"
    );
}

/// Three streams run to their end on a socket that dropped; a new connection says `hello`
/// (with `extra` fields) resuming them all from the start, and the replay is read message by
/// message: the `welcome`, then every message as received.
async fn replay_of_three_finished_streams(extra: Value) -> (Value, Vec<Value>) {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let ids = ids("b", 3);
    for id in &ids {
        c.open(id, &format!("{id} [[mock chunks=20]]")).await;
    }
    c.recv_until("start", None).await;
    drop(c);
    wait_for_mock(&h, "all three completed", |s| s.completed == 3).await;
    let mut c = h.connect_raw().await;
    let resume: Vec<Value> = ids.iter().map(|id| json!({"id": id, "after": 0})).collect();
    let mut hello = json!({"type":"hello","token":h.token("alice","pro"),"resume":resume});
    for (k, v) in extra.as_object().unwrap() {
        hello[k] = v.clone();
    }
    c.send(hello).await;
    let welcome = c.recv_message().await;
    let mut messages = Vec::new();
    let mut ended = 0;
    while ended < 3 {
        let m = c.recv_message().await;
        let frames = m.as_array().cloned().unwrap_or_else(|| vec![m.clone()]);
        ended += frames.iter().filter(|f| f["type"] == "done").count();
        messages.push(m);
    }
    (welcome, messages)
}

/// The frames of `messages`, arrays flattened, checked whole per stream.
fn check_three_replayed(messages: &[Value]) {
    let mut records: std::collections::HashMap<String, StreamRecord> = Default::default();
    for m in messages {
        let frames = m.as_array().cloned().unwrap_or_else(|| vec![m.clone()]);
        for f in frames {
            assert!(
                f.is_object(),
                "a frame is an object, never a nested array: {f}"
            );
            let id = f["id"].as_str().unwrap().to_string();
            records.entry(id).or_default().take(f);
        }
    }
    for id in ids("b", 3) {
        let r = &records[&id];
        assert_eq!(r.end_type(), "done", "{id}");
        assert_eq!(r.text, expected(&id, 20), "{id}");
    }
}

#[tokio::test]
async fn a_batch_hello_gets_the_replay_in_arrays_of_frames_in_order() {
    let (welcome, messages) = replay_of_three_finished_streams(json!({"batch": true})).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["batch"], true, "{welcome}");
    check_three_replayed(&messages);
    // 63 frames were ready when the writer started: a handful of messages, not one per frame
    let arrays: Vec<usize> = messages
        .iter()
        .filter_map(|m| m.as_array().map(Vec::len))
        .collect();
    assert!(arrays.iter().any(|&n| n > 1), "{messages:?}");
    assert!(
        arrays.iter().all(|&n| n > 1),
        "an array holds 2 frames or more"
    );
    assert!(messages.len() < 63, "{} messages", messages.len());
}

#[tokio::test]
async fn a_hello_without_batch_gets_one_frame_per_message_as_in_v1() {
    for extra in [json!({}), json!({"batch": false})] {
        let (welcome, messages) = replay_of_three_finished_streams(extra).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert!(welcome.get("batch").is_none(), "{welcome}");
        assert!(messages.iter().all(Value::is_object), "{messages:?}");
        check_three_replayed(&messages);
    }
}

#[tokio::test]
async fn a_finished_stream_can_still_be_resumed_within_the_window() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open("f", "quick [[mock chunks=5]]").await;
    let first = c.recv_until("delta", Some("f")).await;
    assert_eq!(first["seq"], 1);
    drop(c);
    wait_for_mock(&h, "completed", |s| s.completed == 1).await;
    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"f","after":1}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["f"]));
    let mut r = StreamRecord {
        last_seq: 1,
        text: mock_prefix("quick", 5, 1),
        ..Default::default()
    };
    while r.end.is_none() {
        r.take(c.recv().await);
    }
    assert_eq!(r.text, expected("quick", 5));
}

#[tokio::test]
async fn another_user_cannot_resume_a_stream() {
    let h = Harness::start().await;
    let mut alice = h.connect("alice").await;
    alice
        .open("secret", "private [[mock chunks=30 delay_ms=10]]")
        .await;
    alice.recv_until("delta", Some("secret")).await;
    drop(alice);

    let (mut bob, welcome) = h
        .connect_resume("bob", json!([{"id":"secret","after":0}]))
        .await;
    assert_eq!(welcome["resumed"], json!([]));
    let e = bob.recv().await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("secret"), Some("not_found")),
        "{e}"
    );
    bob.send(json!({"type":"cancel","id":"secret"})).await;
    assert_eq!(
        bob.recv().await["code"],
        "not_found",
        "bob cannot cancel it either"
    );

    let (mut alice, welcome) = h
        .connect_resume("alice", json!([{"id":"secret","after":0}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["secret"]));
    let records = alice.collect(&["secret".into()]).await;
    assert_eq!(records["secret"].text, expected("private", 30));
}

#[tokio::test]
async fn unresumed_streams_are_aborted_after_the_window() {
    let h = Harness::start_with(|c| c.session.resume_window_ms = 200).await;
    let mut c = h.connect("alice").await;
    c.open("s", "[[mock chunks=1000 delay_ms=20]]").await;
    c.recv_until("delta", Some("s")).await;
    drop(c);
    wait_for_mock(&h, "aborted after the resume window", |s| {
        s.aborted == 1 && s.in_flight == 0
    })
    .await;
    // Once the stream's window is over too, the user has nothing left and is forgotten. The
    // mock sees the abort a moment before the stream's task has unregistered it: wait, bounded.
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while h.gw.user_stats("alice").map_or(0, |s| s.live_streams) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aborted stream still counts as live"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn api_key_goes_upstream_and_never_into_a_frame() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let mut frames = Vec::new();
    c.open("k", "key [[mock chunks=5]]").await;
    c.open("e", "[[mock fail=500 fail_times=100]]").await;
    let mut ended = 0;
    while ended < 2 {
        let f = c.recv().await;
        if f["type"] == "done" || f["type"] == "error" {
            ended += 1;
        }
        frames.push(f.to_string());
    }
    assert_eq!(
        h.mock.stats().last_authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert!(
        frames.iter().all(|f| !f.contains(API_KEY)),
        "key leaked: {frames:?}"
    );

    // A wrong key: the upstream refuses, the client learns why, the key is not in the text.
    let h = Harness::start_with(|c| c.providers[0].api_key = Some("sk-wrong-key-123".into())).await;
    let mut c = h.connect("alice").await;
    c.open("w", "hi").await;
    let e = c.recv_until("error", Some("w")).await;
    assert_eq!(e["code"], "upstream_error");
    assert!(e["message"].as_str().unwrap().contains("401"), "{e}");
    assert!(!e.to_string().contains("sk-wrong-key-123"));
}

/// A small replay log (64 KiB) and no heartbeat drops, so only the write timeout decides
/// whether a client that stops reading is kept.
async fn slow_reader_harness(write_timeout_ms: u64) -> Harness {
    Harness::start_with(|c| {
        c.session.stream_buffer_bytes = 64 * 1024;
        c.session.write_timeout_ms = write_timeout_ms;
        c.session.heartbeat_ms = 60_000;
    })
    .await
}

#[tokio::test]
async fn a_slow_reader_backpressures_the_upstream_and_loses_nothing() {
    let h = slow_reader_harness(60_000).await;
    let mut c = h.connect("alice").await;
    let n = 20_000;
    c.open("big", &format!("big [[mock chunks={n} chunk_bytes=4096]]"))
        .await;
    c.recv_until("delta", Some("big")).await;
    // Stop reading. The socket buffers fill, then the stream's log, then the gateway stops
    // reading the upstream: the mock cannot send everything. Filling them takes a loaded box
    // more than the 2 s this test once slept: wait until no chunk went out for 1.5 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut sent_while_stalled, mut still) = (u64::MAX, 0);
    while still < 3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent = h.mock.stats().chunks_sent;
        still = if sent == sent_while_stalled {
            still + 1
        } else {
            0
        };
        sent_while_stalled = sent;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream never paused: {sent} chunks sent"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent_later = h.mock.stats().chunks_sent;
    assert!(
        sent_while_stalled < n as u64 / 2,
        "upstream ran ahead of a stalled client: {sent_while_stalled}"
    );
    assert_eq!(
        sent_while_stalled, sent_later,
        "the upstream is paused, not trickling"
    );
    let buffered = muxgate::test_support::stream_buffered_bytes(&h.gw, "alice", "big").unwrap();
    assert!(
        buffered <= 64 * 1024 + 8192,
        "replay log stays near its cap: {buffered}"
    );
    // Read again: every chunk arrives, in order, once.
    let mut r = StreamRecord {
        last_seq: 1,
        deltas: 1,
        ..Default::default()
    };
    while r.end.is_none() {
        let f = c.recv().await;
        if f["id"] == "big" {
            r.take(f);
        }
    }
    assert_eq!(r.end_type(), "done");
    assert_eq!(r.deltas, n as u64);
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let h = Harness::start_with(|c| c.session.heartbeat_ms = 100).await;
    let c = h.connect("alice").await;
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A user with nothing left (no connection, no stream) is forgotten by the hub.
    let connections = h.gw.user_stats("alice").map_or(0, |s| s.connections);
    assert_eq!(connections, 0);
    drop(c);
}

#[tokio::test]
async fn shutdown_sends_goaway_and_lets_streams_finish() {
    let mut h = Harness::start_with(|c| c.drain_timeout_ms = 5_000).await;
    let mut c = h.connect("alice").await;
    c.open("s", "drain [[mock chunks=30 delay_ms=10]]").await;
    c.recv_until("delta", Some("s")).await;
    h.shutdown();
    let mut r = StreamRecord {
        last_seq: 1,
        text: mock_prefix("drain", 30, 1),
        ..Default::default()
    };
    let mut goaway = false;
    loop {
        match c.next_event().await {
            Event::Frame(f) if f["type"] == "goaway" => {
                assert_eq!(f["reason"], "shutdown");
                goaway = true;
                c.open("late", "[[mock chunks=2]]").await;
            }
            Event::Frame(f) if f["id"] == "late" => {
                assert_eq!(f["code"], "overloaded", "{f}");
            }
            Event::Frame(f) => r.take(f),
            Event::Closed(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
        }
    }
    assert!(goaway);
    assert_eq!(r.text, expected("drain", 30));
    h.server.take().unwrap().await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_aborts_streams_past_the_drain_timeout() {
    let mut h = Harness::start_with(|c| c.drain_timeout_ms = 200).await;
    let mut c = h.connect("alice").await;
    c.open("long", "[[mock chunks=10000 delay_ms=20]]").await;
    c.recv_until("delta", Some("long")).await;
    h.shutdown();
    let end = c.recv_until("error", Some("long")).await;
    assert_eq!(end["code"], "internal", "{end}");
    h.server.take().unwrap().await.unwrap().unwrap();
    wait_for_mock(&h, "upstream aborted", |s| s.aborted == 1).await;
}

#[tokio::test]
async fn admin_view_counts_connections() {
    let h = Harness::start().await;
    let _a = h.connect("alice").await;
    let _b = h.connect("alice").await;
    let url = format!("http://{}/admin/users/alice", h.addr);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 401, "no admin token, no admin view");
    let v = h.admin("/admin/users/alice").await;
    assert_eq!(
        (v["connections"].as_u64(), v["connections_total"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
}

#[tokio::test]
async fn an_operator_goaway_moves_streams_to_a_new_connection() {
    let h = Harness::start().await;
    let mut old = h.connect("alice").await;
    old.open("m", "move [[mock chunks=80 delay_ms=10]]").await;
    let mut r = StreamRecord::default();
    while r.last_seq < 5 {
        let f = old.recv().await;
        if f["id"] == "m" {
            r.take(f);
        }
    }
    let told = h.admin_post("/admin/users/alice/goaway").await;
    assert_eq!(told["connections"], 1);
    loop {
        let f = old.recv().await;
        if f["type"] == "goaway" {
            assert_eq!(f["reason"], "rebalance");
            break;
        }
        r.take(f);
    }
    old.open("late", "[[mock chunks=2]]").await;
    let (mut new, welcome) = h
        .connect_resume("alice", json!([{"id":"m","after":r.last_seq}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["m"]));
    // The old socket may still deliver what it had; then it closes. Like the shim, the client
    // keeps frames by seq, so nothing is lost or repeated.
    loop {
        match old.next_event().await {
            Event::Frame(f) if f["id"] == "late" => assert_eq!(f["code"], "overloaded"),
            Event::Frame(f) => r.take(f),
            Event::Closed(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
        }
    }
    while r.end.is_none() {
        let f = new.recv().await;
        if f["seq"].as_u64().is_some_and(|s| s <= r.last_seq) {
            continue;
        }
        r.take(f);
    }
    assert_eq!(r.text, expected("move", 80));
    assert_eq!(h.gw.user_stats("alice").unwrap().connections, 1);
}

#[tokio::test]
async fn a_reader_too_slow_for_the_write_timeout_is_closed_4408_and_can_resume() {
    let h = slow_reader_harness(300).await;
    let mut c = h.connect("alice").await;
    c.open("big", "slow [[mock chunks=20000 chunk_bytes=4096]]")
        .await;
    c.recv_until("delta", Some("big")).await;
    // Stop reading until the gateway gives up on this socket (once the buffers are full,
    // which took a loaded box over 10 s: this only bounds the wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while h.gw.user_stats("alice").map_or(0, |s| s.connections) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow reader was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was written before the drop is still readable. The close frame (4408) goes out only
    // if the socket takes it: a reader this slow usually just sees the connection end.
    let mut r = StreamRecord {
        last_seq: 1,
        deltas: 1,
        ..Default::default()
    };
    loop {
        match c.next_event().await {
            Event::Frame(f) => r.take(f),
            Event::Closed(code) => {
                assert!(matches!(code, None | Some(4408)), "{code:?}");
                break;
            }
        }
    }
    // The stream waited for a resume: the frames the timed-out write held were never counted
    // as written, so it continues with no gap.
    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"big","after":r.last_seq}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["big"]));
    loop {
        let f = c.recv().await;
        if f["id"] != "big" {
            continue;
        }
        assert_ne!(f["type"], "error", "{f}");
        r.take(f);
        if r.end.is_some() {
            assert_eq!(r.deltas, 20_000);
            break;
        }
    }
}

/// The binary's way of serving (`muxgate::serve_on`): each connection, its streams and their
/// upstream reads on one worker thread. Streams on several connections, so on both workers,
/// arrive exact; a stream resumed on a connection served by the other worker loses nothing.
#[tokio::test]
async fn streams_on_worker_threads_are_exact_and_resume_across_workers() {
    let h = Harness::start_on_workers(2, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(h.connect("alice").await);
    }
    for (n, c) in clients.iter_mut().enumerate() {
        for j in 0..4 {
            c.open(
                &format!("t{n}:{j}"),
                &format!("q{n}-{j} [[mock chunks=30 delay_ms=2]]"),
            )
            .await;
        }
    }
    for (n, c) in clients.iter_mut().enumerate() {
        let ids: Vec<String> = (0..4).map(|j| format!("t{n}:{j}")).collect();
        let records = c.collect(&ids).await;
        for (j, id) in ids.iter().enumerate() {
            let r = &records[id];
            assert_eq!(r.end_type(), "done", "{id}: {:?}", r.end);
            assert_eq!(r.text, expected(&format!("q{n}-{j}"), 30), "{id}");
        }
    }

    // Connections go to the workers in turn: this is the fourth (worker 1), the resume below
    // the fifth (worker 0), so the stream's task stays on one worker and its frames go out
    // through the other's writer.
    let mut c = h.connect("bob").await;
    c.open("r:1", "resume [[mock chunks=60 delay_ms=5]]").await;
    let mut record = StreamRecord::default();
    while record.last_seq < 10 {
        let f = c.recv().await;
        if f["id"] == "r:1" {
            record.take(f);
        }
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resume = json!([{"id":"r:1","after":record.last_seq}]);
    let (mut c, welcome) = h.connect_resume("bob", resume).await;
    assert_eq!(welcome["resumed"], json!(["r:1"]));
    while record.end.is_none() {
        let f = c.recv().await;
        if f["id"] == "r:1" {
            record.take(f);
        }
    }
    assert_eq!(record.end_type(), "done");
    assert_eq!(record.text, expected("resume", 60));
    assert_eq!(
        h.mock.stats().requests,
        13,
        "resume never re-asks the upstream"
    );
}

/// Reads `c` until stream `id` has sent `last_seq >= n`, into `r`.
async fn read_until_seq(c: &mut Client, id: &str, r: &mut StreamRecord, n: u64) {
    while r.last_seq < n {
        let f = c.recv().await;
        if f["id"] == id {
            r.take(f);
        }
    }
}

#[tokio::test]
async fn a_resume_frame_on_a_live_connection_takes_over_a_dropped_connections_streams() {
    let h = Harness::start_with(|c| c.tiers.get_mut("pro").unwrap().max_connections = 3).await;
    let mut leader = h.connect("alice").await;
    // The warm standby: authenticated before the leader's socket dies, resumes nothing yet.
    let (mut standby, welcome) = h.connect_resume("alice", json!([])).await;
    assert_eq!(welcome["limits"]["max_connections"], 3, "{welcome}");
    leader
        .open("w1", "warm [[mock chunks=60 delay_ms=5]]")
        .await;
    leader
        .open("w2", "standby [[mock chunks=40 delay_ms=5]]")
        .await;
    let mut first = StreamRecord::default();
    let mut second = StreamRecord::default();
    while first.last_seq < 10 || second.last_seq < 3 {
        let f = leader.recv().await;
        match f["id"].as_str() {
            Some("w1") => first.take(f),
            Some("w2") => second.take(f),
            _ => {}
        }
    }
    drop(leader); // the socket dies without a close handshake
    standby
        .send(json!({"type":"resume","resume":[
            {"id":"w1","after":first.last_seq},
            {"id":"w2","after":second.last_seq},
            {"id":"ghost","after":0}]}))
        .await;
    // `resumed` comes before any frame of the replay.
    let answer = standby.recv().await;
    assert_eq!(answer["type"], "resumed", "{answer}");
    let mut resumed: Vec<String> = serde_json::from_value(answer["resumed"].clone()).unwrap();
    resumed.sort();
    assert_eq!(resumed, vec!["w1", "w2"]);
    let mut ghost_seen = false;
    while first.end.is_none() || second.end.is_none() {
        let f = standby.recv().await;
        match f["id"].as_str() {
            Some("w1") => first.take(f),
            Some("w2") => second.take(f),
            Some("ghost") => {
                assert_eq!(
                    (f["type"].as_str(), f["code"].as_str()),
                    (Some("error"), Some("not_found")),
                    "{f}"
                );
                ghost_seen = true;
            }
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert!(ghost_seen);
    assert_eq!(first.text, expected("warm", 60));
    assert_eq!(second.text, expected("standby", 40));
    assert_eq!((first.end_type(), second.end_type()), ("done", "done"));
    assert_eq!(
        h.mock.stats().requests,
        2,
        "resume never re-asks the upstream"
    );
    // The connection goes on as before: a new stream on it runs as usual.
    standby.open("w3", "after [[mock chunks=5]]").await;
    let records = standby.collect(&["w3".to_string()]).await;
    assert_eq!(records["w3"].text, expected("after", 5));
}

#[tokio::test]
async fn a_resume_frame_of_unknown_ids_answers_resumed_empty_then_not_found() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.send(json!({"type":"resume","resume":[{"id":"nope","after":4}]}))
        .await;
    let answer = c.recv().await;
    assert_eq!(answer, json!({"type":"resumed","resumed":[]}));
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_str(), e["code"].as_str()),
        (Some("error"), Some("nope"), Some("not_found")),
        "{e}"
    );
    // Another user's stream is not found either, exactly as for `hello.resume`.
    let mut bob = h.connect("bob").await;
    bob.open("bobs", "private [[mock chunks=30 delay_ms=5]]")
        .await;
    bob.recv_until("delta", Some("bobs")).await;
    c.send(json!({"type":"resume","resume":[{"id":"bobs"}]}))
        .await;
    assert_eq!(c.recv().await, json!({"type":"resumed","resumed":[]}));
    let e = c.recv().await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("bobs"), Some("not_found")),
        "{e}"
    );
    // ... and stays where it was.
    bob.recv_until("done", Some("bobs")).await;
    // A malformed `resume` is a bad frame, and the connection survives it.
    c.send(json!({"type":"resume"})).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request", "{e}");
    c.send(json!({"type":"ping","ts":1})).await;
    assert_eq!(c.recv().await["type"], "pong");
}

#[tokio::test]
async fn a_resume_frame_moves_a_stream_attached_to_another_live_connection() {
    let h = Harness::start().await;
    let mut old = h.connect("alice").await;
    let mut new = h.connect("alice").await;
    old.open("mv", "moving [[mock chunks=80 delay_ms=10]]")
        .await;
    let mut r = StreamRecord::default();
    read_until_seq(&mut old, "mv", &mut r, 5).await;
    new.send(json!({"type":"resume","resume":[{"id":"mv","after":r.last_seq}]}))
        .await;
    assert_eq!(new.recv().await, json!({"type":"resumed","resumed":["mv"]}));
    // The new connection carries it from `after` on; the old one may still deliver what it
    // had pulled before the move (kept by seq, as the shim does), and never its end.
    while r.end.is_none() {
        let f = new.recv().await;
        if f["seq"].as_u64().is_some_and(|s| s <= r.last_seq) {
            continue;
        }
        r.take(f);
    }
    assert_eq!(r.text, expected("moving", 80));
    assert_eq!(r.end_type(), "done");
    old.send(json!({"type":"ping","ts":"after"})).await;
    loop {
        let f = old.recv().await;
        if f["type"] == "pong" {
            break;
        }
        assert_ne!(
            f["type"], "done",
            "the old connection got the end of a moved stream: {f}"
        );
    }
    assert_eq!(h.gw.user_stats("alice").unwrap().connections, 2);
}
