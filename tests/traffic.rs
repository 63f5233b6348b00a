//! Traffic control, black-box: priority queue, rate limits, circuit breaker, fallbacks, with the
//! real gateway and mock upstream at small caps.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use muxgate::config::OnLimit;
use serde_json::{json, Value};

/// The prompt of the mock's most recent request.
fn last_prompt(h: &Harness) -> String {
    let req = h.mock.stats().last_request.unwrap();
    req["messages"][0]["content"].as_str().unwrap().to_string()
}

/// Waits until the mock has seen `n` requests and returns the prompt of the n-th.
async fn nth_request_prompt(h: &Harness, n: u64) -> String {
    wait_for_mock(h, &format!("{n} requests"), |s| s.requests >= n).await;
    assert_eq!(
        h.mock.stats().requests,
        n,
        "one slot: request {n} is alone in flight"
    );
    last_prompt(h)
}

/// Reads `queued` frames on `c` until stream `id` reports `position`.
async fn expect_position(c: &mut Client, id: &str, position: u64) {
    loop {
        let f = c.recv().await;
        if f["type"] == "queued" && f["id"] == id {
            if f["position"] == position {
                return;
            }
        } else if f["id"] == id {
            panic!("{id} left the queue before reaching position {position}: {f}");
        }
    }
}

#[tokio::test]
async fn higher_tier_starts_first_and_positions_follow_the_queue() {
    let h = Harness::start_with(|c| c.providers[0].max_concurrent = 1).await;
    let mut free = h.connect_tier("fiona", "free").await;
    let mut pro = h.connect_tier("paul", "pro").await;
    free.open("hold", "hold [[mock chunks=100000 delay_ms=10]]")
        .await;
    free.recv_until("delta", Some("hold")).await;

    free.open("f1", "f1 [[mock chunks=100000 delay_ms=10]]")
        .await;
    expect_position(&mut free, "f1", 1).await;
    free.open("f2", "f2 [[mock chunks=100000 delay_ms=10]]")
        .await;
    expect_position(&mut free, "f2", 2).await;
    pro.open("p1", "p1 [[mock chunks=100000 delay_ms=10]]")
        .await;
    expect_position(&mut pro, "p1", 1).await;
    expect_position(&mut free, "f1", 2).await;
    expect_position(&mut free, "f2", 3).await;

    let providers = h.admin("/admin/providers").await;
    assert_eq!(providers["providers"][0]["queued"], 3);
    assert_eq!(providers["providers"][0]["queued_by_tier"]["free"], 2);

    // With one slot, the mock's n-th request tells who was served n-th.
    free.send(json!({"type":"cancel","id":"hold"})).await;
    assert_eq!(
        nth_request_prompt(&h, 2).await,
        "p1 [[mock chunks=100000 delay_ms=10]]"
    );
    pro.recv_until("start", Some("p1")).await;
    expect_position(&mut free, "f1", 1).await;
    pro.send(json!({"type":"cancel","id":"p1"})).await;
    assert!(nth_request_prompt(&h, 3).await.starts_with("f1 "));
    free.send(json!({"type":"cancel","id":"f1"})).await;
    assert!(nth_request_prompt(&h, 4).await.starts_with("f2 "));
    free.send(json!({"type":"cancel","id":"f2"})).await;
}

#[tokio::test]
async fn a_waiting_lower_tier_is_not_starved() {
    let h = Harness::start_with(|c| {
        c.providers[0].max_concurrent = 1;
        c.scheduler.aging_ms = 300;
    })
    .await;
    let mut free = h.connect_tier("fiona", "free").await;
    let mut pro = h.connect_tier("paul", "pro").await;
    free.open("hold", "hold [[mock chunks=100000 delay_ms=10]]")
        .await;
    free.recv_until("delta", Some("hold")).await;
    free.open("f", "f [[mock chunks=100000 delay_ms=10]]").await;
    expect_position(&mut free, "f", 1).await;
    // Past the 300 ms head start of one priority level, a new pro stream queues behind it.
    tokio::time::sleep(Duration::from_millis(450)).await;
    pro.open("late", "late [[mock chunks=5]]").await;
    expect_position(&mut pro, "late", 2).await;
    free.send(json!({"type":"cancel","id":"hold"})).await;
    assert!(nth_request_prompt(&h, 2).await.starts_with("f "));
    free.send(json!({"type":"cancel","id":"f"})).await;
    let records = pro.collect(&["late".into()]).await;
    assert_eq!(records["late"].text, expected("late", 5));
}

#[tokio::test]
async fn cancel_while_queued_leaves_at_once() {
    let h = Harness::start_with(|c| c.providers[0].max_concurrent = 1).await;
    let mut c = h.connect_tier("fiona", "free").await;
    c.open("hold", "[[mock chunks=100000 delay_ms=10]]").await;
    c.recv_until("delta", Some("hold")).await;
    c.open("q1", "[[mock chunks=3]]").await;
    c.open("q2", "[[mock chunks=3]]").await;
    expect_position(&mut c, "q2", 2).await;
    c.send(json!({"type":"cancel","id":"q1"})).await;
    let (mut cancelled, mut moved_up) = (false, false);
    while !(cancelled && moved_up) {
        let f = c.recv().await;
        match (f["type"].as_str().unwrap(), f["id"].as_str()) {
            ("error", Some("q1")) => {
                assert_eq!(f["code"], "cancelled");
                cancelled = true;
            }
            ("queued", Some("q2")) => {
                assert_eq!(f["position"], 1);
                moved_up = true;
            }
            _ => {}
        }
    }
    assert_eq!(
        h.mock.stats().requests,
        1,
        "the cancelled stream never reached the upstream"
    );
    c.send(json!({"type":"cancel","id":"hold"})).await;
    let records = c.collect(&["q2".into()]).await;
    assert_eq!(records["q2"].end_type(), "done");
}

#[tokio::test]
async fn full_queue_and_queue_timeout_are_overloaded() {
    let h = Harness::start_with(|c| {
        c.providers[0].max_concurrent = 1;
        c.scheduler.queue_max_len = 1;
        c.scheduler.queue_max_wait_ms = 300;
    })
    .await;
    let mut c = h.connect_tier("fiona", "free").await;
    c.open("hold", "[[mock chunks=100000 delay_ms=10]]").await;
    c.recv_until("delta", Some("hold")).await;
    c.open("waits", "[[mock chunks=3]]").await;
    expect_position(&mut c, "waits", 1).await;
    c.open("full", "[[mock chunks=3]]").await;
    let e = c.recv_until("error", Some("full")).await;
    assert_eq!(e["code"], "overloaded");
    assert!(e["message"].as_str().unwrap().contains("queue full"), "{e}");
    let e = c.recv_until("error", Some("waits")).await;
    assert_eq!(e["code"], "overloaded");
    assert!(e["message"].as_str().unwrap().contains("300 ms"), "{e}");
    c.send(json!({"type":"cancel","id":"hold"})).await;
}

#[tokio::test]
async fn user_rpm_is_exact_and_its_retry_after_is_honest() {
    let h = Harness::start_with(|c| {
        c.session.max_streams = 500;
        let free = c.tiers.get_mut("free").unwrap();
        free.user_rpm = 120;
        free.rpm = 10_000;
        free.tpm = 10_000_000;
    })
    .await;
    let mut c = h.connect_tier("fiona", "free").await;
    // The user's bucket is made full at the first open, after this instant, and refills one
    // request every 500 ms (120 a minute). The gateway's clock cannot be held still from out
    // here, and on a loaded machine the 120 streams below can take longer than one refill: by
    // any instant, at most 120 + (time since `started`) / 500 ms opens may have been admitted.
    let started = std::time::Instant::now();
    let refills = || (started.elapsed().as_millis() / 500) as usize;
    let ids = ids("r", 120);
    for id in &ids {
        c.open(id, "[[mock chunks=1]]").await;
    }
    let records = c.collect(&ids).await;
    assert!(
        records.values().all(|r| r.end_type() == "done"),
        "all 120 admitted"
    );
    // One more open until one is refused: each admitted one must be a refill.
    let mut extra = 0;
    let (over, e) = loop {
        let id = format!("over{extra}");
        c.open(&id, "[[mock chunks=1]]").await;
        let end = c
            .collect(std::slice::from_ref(&id))
            .await
            .remove(&id)
            .unwrap();
        match end.end_type() {
            "done" => {
                extra += 1;
                let refilled = refills();
                assert!(
                    extra <= refilled,
                    "{} admitted within {} ms: at most 120 + {refilled}",
                    120 + extra,
                    started.elapsed().as_millis()
                );
            }
            _ => break (id, end.end.unwrap()),
        }
    };
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert!(e["message"].as_str().unwrap().contains("user_rpm"), "{e}");
    // 120 a minute refill one every 500 ms; some of that has passed already.
    let retry_after = e["retry_after_ms"].as_u64().unwrap();
    assert!((1..=500).contains(&retry_after), "{e}");
    tokio::time::sleep(Duration::from_millis(retry_after)).await;
    c.open(&over, "again [[mock chunks=2]]").await;
    let records = c.collect(std::slice::from_ref(&over)).await;
    assert_eq!(
        records[&over].end_type(),
        "done",
        "{:?}",
        records[&over].end
    );
    assert_eq!(
        h.mock.stats().requests,
        120 + extra as u64 + 1,
        "refused streams never reach the upstream"
    );
}

#[tokio::test]
async fn a_waiting_tier_waits_instead_of_refusing() {
    let h = Harness::start_with(|c| {
        c.session.max_streams = 500;
        let pro = c.tiers.get_mut("pro").unwrap();
        pro.user_rpm = 120;
        pro.tpm = 10_000_000;
        pro.on_limit = OnLimit::Wait;
        pro.max_wait_ms = 2_000;
    })
    .await;
    let mut c = h.connect_tier("paul", "pro").await;
    let ids = ids("w", 122);
    for id in &ids {
        c.open(id, "[[mock chunks=1]]").await;
    }
    let records = c.collect(&ids).await;
    assert!(
        records.values().all(|r| r.end_type() == "done"),
        "the two over the limit waited"
    );
    assert_eq!(h.mock.stats().requests, 122);
}

#[tokio::test]
async fn unused_token_reservations_come_back() {
    let h = Harness::start_with(|c| {
        let free = c.tiers.get_mut("free").unwrap();
        free.tpm = 3_000;
        c.limits.default_max_tokens = 1_000;
    })
    .await;
    let mut c = h.connect_tier("fiona", "free").await;
    c.open("a", "a [[mock chunks=5 delay_ms=50]]").await;
    c.open("b", "b [[mock chunks=5 delay_ms=50]]").await;
    c.recv_until("delta", Some("b")).await;
    c.open("c", "c [[mock chunks=5]]").await;
    let e = c.recv_until("error", Some("c")).await;
    assert_eq!(
        e["code"], "rate_limited",
        "two reservations of ~1000 leave too little: {e}"
    );
    assert!(e["message"].as_str().unwrap().contains("tier_tpm"), "{e}");
    // The refill alone (50 tokens/s) would take ~20 s; the returned reservations take none.
    let mut done = 0;
    while done < 2 {
        let f = c.recv().await;
        if f["type"] == "done" {
            done += 1;
        }
        assert_ne!(f["type"], "error", "{f}");
    }
    let available = muxgate::test_support::tier_tokens_available(&h.gw, "free").unwrap();
    assert!(
        available > 2_900.0,
        "used ~10 tokens each, the rest came back: {available}"
    );
    c.open("c", "c [[mock chunks=5]]").await;
    let records = c.collect(&["c".into()]).await;
    assert_eq!(records["c"].end_type(), "done");
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_recovers() {
    let h = Harness::start_with(|c| {
        c.retry.max_attempts = 1;
        c.breaker.failure_threshold = 2;
        // Long enough that the checks below run while it is open, on a loaded box too (with
        // 400 ms it had half-opened before `/readyz` was asked).
        c.breaker.open_ms = 3_000;
    })
    .await;
    let mut c = h.connect("alice").await;
    for id in ["e1", "e2"] {
        c.open(id, &format!("{id} [[mock fail=503 fail_times=100]]"))
            .await;
        let e = c.recv_until("error", Some(id)).await;
        assert_eq!(e["code"], "upstream_error");
    }
    let providers = h.admin("/admin/providers").await;
    assert_eq!(providers["providers"][0]["breaker"], "open");
    let ready = reqwest::get(format!("http://{}/readyz", h.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "the only provider is open-circuit");
    c.open("fast", "[[mock chunks=3]]").await;
    let e = c.recv_until("error", Some("fast")).await;
    assert_eq!(e["code"], "upstream_error");
    assert!(
        e["message"].as_str().unwrap().contains("circuit open"),
        "{e}"
    );
    assert!(e["retry_after_ms"].as_u64().unwrap() <= 3_000);
    assert_eq!(
        h.mock.stats().requests,
        2,
        "failed fast: the upstream was not called"
    );

    tokio::time::sleep(Duration::from_millis(3_050)).await;
    c.open("probe", "probe [[mock chunks=3]]").await;
    let records = c.collect(&["probe".into()]).await;
    assert_eq!(records["probe"].text, expected("probe", 3));
    let providers = h.admin("/admin/providers").await;
    assert_eq!(providers["providers"][0]["breaker"], "closed");
    let ready = reqwest::get(format!("http://{}/readyz", h.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

async fn fallback_harness() -> Harness {
    Harness::start_with(|c| {
        let mut down = muxgate::config::ProviderConfig::catch_all(
            "down",
            "http://127.0.0.1:9/v1".into(),
            None,
        );
        down.models = vec!["gpt-4.1".into()];
        down.connect_timeout_ms = 500;
        c.providers[0].models = vec!["deepseek-v3.2".into()];
        c.providers.insert(0, down);
        c.fallbacks
            .insert("gpt-4.1".into(), vec!["deepseek-v3.2".into()]);
        c.breaker.failure_threshold = 3;
    })
    .await
}

#[tokio::test]
async fn a_fallback_serves_when_the_primary_is_down() {
    let h = fallback_harness().await;
    let mut c = h.connect("alice").await;
    c.send(json!({"type":"open","id":"fb","model":"gpt-4.1","messages":[{"role":"user","content":"fb [[mock chunks=4]]"}]}))
        .await;
    let records = c.collect(&["fb".into()]).await;
    let r = &records["fb"];
    assert_eq!(r.end_type(), "done", "{:?}", r.end);
    assert_eq!(r.text, expected("fb", 4));
    let end: &Value = r.end.as_ref().unwrap();
    assert_eq!(
        end["model"], "deepseek-v3.2",
        "done says which model answered: {end}"
    );
    // Three failed attempts opened the primary's breaker: the next stream skips it at once.
    let providers = h.admin("/admin/providers").await;
    assert_eq!(providers["providers"][0]["breaker"], "open", "{providers}");
    c.send(json!({"type":"open","id":"fb2","model":"gpt-4.1","messages":[{"role":"user","content":"fb2 [[mock chunks=2]]"}]}))
        .await;
    let records = c.collect(&["fb2".into()]).await;
    assert_eq!(records["fb2"].text, expected("fb2", 2));
    assert_eq!(h.mock.stats().requests, 2);
}

#[tokio::test]
async fn too_many_connections_per_user() {
    let h = Harness::start_with(|c| c.tiers.get_mut("free").unwrap().max_connections = 2).await;
    let _a = h.connect_tier("fiona", "free").await;
    let _b = h.connect_tier("fiona", "free").await;
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":h.token("fiona", "free")}))
        .await;
    c.expect_too_many_connections().await;
    // Another user is not affected.
    h.connect_tier("gina", "free").await;
}

#[tokio::test]
async fn first_token_timeout_is_retried_then_reported() {
    let h = Harness::start_with(|c| {
        c.providers[0].first_token_timeout_ms = 200;
        c.retry.max_attempts = 2;
    })
    .await;
    let mut c = h.connect("alice").await;
    c.open("slow", "[[mock chunks=3 stall_ms=5000]]").await;
    let e = c.recv_until("error", Some("slow")).await;
    assert_eq!(e["code"], "upstream_timeout", "{e}");
    wait_for_mock(&h, "both attempts aborted", |s| {
        s.requests == 2 && s.aborted == 2
    })
    .await;
}

/// The idle timeout counts from the last event, not from the first token: a stream whose
/// chunks each come well within it lives far past it (the relay moves its timer only when it
/// fires early, so this is what catches a timer that is not moved on).
#[tokio::test]
async fn steady_chunks_outlive_the_idle_timeout_many_times() {
    let h = Harness::start_with(|c| c.providers[0].idle_timeout_ms = 250).await;
    let mut c = h.connect("alice").await;
    c.open("steady", "steady [[mock chunks=10 delay_ms=100]]")
        .await;
    let records = c.collect(&["steady".into()]).await;
    let r = &records["steady"];
    assert_eq!(r.end_type(), "done", "{:?}", r.end);
    assert_eq!(r.text, expected("steady", 10));
}

#[tokio::test]
async fn silence_mid_stream_is_an_idle_timeout_without_retry() {
    let h = Harness::start_with(|c| c.providers[0].idle_timeout_ms = 200).await;
    let mut c = h.connect("alice").await;
    c.open("idle", "idle [[mock chunks=3 delay_ms=2000]]").await;
    let mut r = StreamRecord::default();
    while r.end.is_none() {
        r.take(c.recv().await);
    }
    assert_eq!(r.error_code(), "upstream_timeout", "{:?}", r.end);
    assert_eq!(r.text, muxgate::mock::word_chunks("idle", 3)[0]);
    assert_eq!(h.mock.stats().requests, 1, "text went out: no retry");
}
