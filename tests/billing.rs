//! Metrics and billing, black-box: known traffic through the mock upstream, then exact counts,
//! token sums and costs from `/metrics`, `done` frames and the admin view; budgets refuse the
//! right stream.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use muxgate::test_support::{cost_usd, count_prompt, count_prompt_tokens, count_tokens};
use serde_json::{json, Value};

/// The deepseek-v3.2 price from the seed: $0.10 in, $0.42 out per million tokens.
fn deepseek_cost(prompt: u64, completion: u64) -> f64 {
    cost_usd(prompt, completion, 0.10, 0.42)
}

#[tokio::test]
async fn metrics_count_exactly_what_went_through() {
    let h = Harness::start_with(|c| {
        let free = c.tiers.get_mut("free").unwrap();
        free.user_rpm = 1;
    })
    .await;
    let mut c = h.connect("alice").await;
    // The mock's usage: prompt = words in the messages, completion = chunks.
    for (id, n) in [("d5", 5), ("d7", 7), ("d9", 9)] {
        c.open(id, &format!("{id} [[mock chunks={n}]]")).await;
    }
    let records = c.collect(&["d5".into(), "d7".into(), "d9".into()]).await;
    let mut done_cost = 0.0;
    for (id, n) in [("d5", 5u64), ("d7", 7), ("d9", 9)] {
        let end = records[id].end.clone().unwrap();
        assert_eq!(
            end["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}),
            "{end}"
        );
        let cost = end["cost_usd"].as_f64().unwrap();
        assert!((cost - deepseek_cost(3, n)).abs() < 1e-15, "{end}");
        assert!(end.get("usage_estimated").is_none());
        done_cost += cost;
    }

    // Cancelled mid-way: billed for the prompt and what was generated, counted by tokenizer.
    let prompt = "cancel me [[mock chunks=100000 delay_ms=5]]";
    c.open("cx", prompt).await;
    let text = cancel_after(&mut c, "cx", 10).await;
    let messages = vec![json!({"role":"user","content":prompt})];
    let cx_prompt = count_prompt_tokens("deepseek-v3.2", &messages);
    let cx_completion = count_tokens("deepseek-v3.2", &text);
    assert!(cx_completion >= 10, "{text}");

    // Failed after retries, never generated anything.
    c.open("e", "[[mock fail=500 fail_times=100]]").await;
    assert_eq!(
        c.recv_until("error", Some("e")).await["code"],
        "upstream_error"
    );

    // A free user over their 1 request per minute.
    let mut f = h.connect_tier("fiona", "free").await;
    f.open("f1", "f1 [[mock chunks=2]]").await;
    f.collect(&["f1".into()]).await;
    f.open("f2", "[[mock chunks=2]]").await;
    assert_eq!(
        f.recv_until("error", Some("f2")).await["code"],
        "rate_limited"
    );

    let m = scrape_metrics(&h).await;
    let streams = |tier: &str, status: &str| {
        metric(&m, &format!("muxgate_streams_total{{model=\"deepseek-v3.2\",provider=\"mock\",tier=\"{tier}\",status=\"{status}\"}}"))
    };
    assert_eq!(streams("pro", "done"), 3.0);
    assert_eq!(streams("pro", "cancelled"), 1.0);
    assert_eq!(streams("pro", "upstream_error"), 1.0);
    assert_eq!(streams("free", "done"), 1.0);
    assert_eq!(
        metric(&m, "muxgate_streams_total{model=\"deepseek-v3.2\",provider=\"none\",tier=\"free\",status=\"rate_limited\"}"),
        1.0
    );
    let tokens = |tier: &str, kind: &str, estimated: bool| {
        metric(&m, &format!("muxgate_tokens_total{{model=\"deepseek-v3.2\",tier=\"{tier}\",kind=\"{kind}\",estimated=\"{estimated}\"}}"))
    };
    assert_eq!(tokens("pro", "prompt", false), 9.0);
    assert_eq!(tokens("pro", "completion", false), 21.0);
    assert_eq!(tokens("pro", "prompt", true), cx_prompt as f64);
    assert_eq!(tokens("pro", "completion", true), cx_completion as f64);
    let spend = metric(
        &m,
        "muxgate_spend_usd_total{model=\"deepseek-v3.2\",tier=\"pro\"}",
    );
    let expected_spend = done_cost + deepseek_cost(cx_prompt, cx_completion);
    assert!(
        (spend - expected_spend).abs() < 1e-12,
        "{spend} vs {expected_spend}"
    );
    assert_eq!(
        metric(
            &m,
            "muxgate_upstream_retries_total{provider=\"mock\",reason=\"http_5xx\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(&m, "muxgate_refusals_total{reason=\"user_rpm\"}"),
        1.0
    );
    assert_eq!(metric(&m, "muxgate_ws_connections"), 2.0);
    assert_eq!(metric(&m, "muxgate_ws_connections_opened_total"), 2.0);
    assert_eq!(metric(&m, "muxgate_live_streams"), 0.0);
    assert_eq!(
        metric(&m, "muxgate_circuit_breaker_state{provider=\"mock\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "muxgate_queue_depth{provider=\"mock\",tier=\"pro\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "muxgate_time_to_first_token_seconds_count{model=\"deepseek-v3.2\"}"
        ),
        5.0,
        "streams with text"
    );
    assert_eq!(metric(&m, "muxgate_gateway_overhead_seconds_count"), 5.0);
    assert!(metric(&m, "muxgate_ws_sent_frames_total") > 40.0);
    assert!(
        metric(&m, "muxgate_ws_sent_bytes_total")
            > metric(&m, "muxgate_ws_sent_frames_total") * 20.0
    );

    // The admin view has each user's spend.
    let users = h.admin("/admin/users").await;
    let alice = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "alice")
        .unwrap()
        .clone();
    assert!(
        (alice["spend_today_usd"].as_f64().unwrap() - expected_spend).abs() < 1e-9,
        "{users}"
    );
    assert_eq!(alice["connections"], 1);
}

#[tokio::test]
async fn a_user_budget_refuses_the_first_stream_past_it() {
    // Each stream costs (3 × 0.10 + 5 × 0.42) / 1e6 = $0.0000024: two fit under $0.000004, the
    // third finds the budget spent and never reaches the upstream.
    let h = Harness::start_with(|c| c.budgets.per_user_usd_per_day = Some(0.000004)).await;
    let mut c = h.connect("alice").await;
    for id in ["b1", "b2"] {
        c.open(id, &format!("{id} [[mock chunks=5]]")).await;
        let records = c.collect(&[id.to_string()]).await;
        assert_eq!(records[id].end_type(), "done");
    }
    c.open("b3", "b3 [[mock chunks=5]]").await;
    let e: Value = c.recv_until("error", Some("b3")).await;
    assert_eq!(e["code"], "budget_exceeded", "{e}");
    assert!(
        e["retry_after_ms"].as_u64().unwrap() > 0,
        "until midnight UTC: {e}"
    );
    assert_eq!(h.mock.stats().requests, 2);
    // Another user has their own budget.
    let mut b = h.connect("bob").await;
    b.open("x", "x [[mock chunks=5]]").await;
    assert_eq!(b.collect(&["x".into()]).await["x"].end_type(), "done");
    let m = scrape_metrics(&h).await;
    assert_eq!(metric(&m, "muxgate_refusals_total{reason=\"budget\"}"), 1.0);
}

#[tokio::test]
async fn a_tier_budget_covers_all_its_users() {
    let h = Harness::start_with(|c| {
        c.budgets
            .per_tier_usd_per_day
            .insert("pro".into(), 0.000004);
    })
    .await;
    let mut a = h.connect("alice").await;
    let mut b = h.connect("bob").await;
    a.open("a1", "a1 [[mock chunks=5]]").await;
    assert_eq!(a.collect(&["a1".into()]).await["a1"].end_type(), "done");
    b.open("b1", "b1 [[mock chunks=5]]").await;
    assert_eq!(b.collect(&["b1".into()]).await["b1"].end_type(), "done");
    a.open("a2", "a2 [[mock chunks=5]]").await;
    assert_eq!(
        a.recv_until("error", Some("a2")).await["code"],
        "budget_exceeded"
    );
}

/// Issue 15: the prompt counted for the reservation is merged for at most
/// `limits.prompt_count_bytes` (the tokenizer's work per request is bounded: counted here as
/// `muxgate_tokenizer_bytes_total`, not timed); the rest counts a token per byte. The bill is
/// the upstream's `usage` when it sends one, and without it the bounded count, which is never
/// below the exact one.
#[tokio::test]
async fn prompt_counting_is_bounded_and_never_under_counts() {
    const ALLOWANCE: usize = 4096;
    let h = Harness::start_with(|c| c.limits.prompt_count_bytes = ALLOWANCE).await;
    let mut c = h.connect("alice").await;
    // One 200 kB piece of one repeated character: the merges' worst case.
    let flood = "!".repeat(200_000);

    let prompt = format!("{flood} [[mock chunks=3]]");
    c.open("u", &prompt).await;
    let done = c.recv_until("done", Some("u")).await;
    // The mock's usage: prompt = words in the messages, completion = chunks.
    assert_eq!(
        done["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}),
        "{done}"
    );
    assert!(done.get("usage_estimated").is_none(), "{done}");
    let m = scrape_metrics(&h).await;
    let merged = metric(&m, "muxgate_tokenizer_bytes_total");
    let bounded = metric(&m, "muxgate_tokenizer_bounded_bytes_total");
    assert!(merged <= ALLOWANCE as f64, "{merged}");
    assert!(bounded >= (prompt.len() - ALLOWANCE) as f64, "{bounded}");

    // Cancelled: no usage, so the gateway bills its own count of the prompt.
    let prompt = format!("{flood} cancel me [[mock chunks=100000 delay_ms=5]]");
    c.open("cx", &prompt).await;
    let text = cancel_after(&mut c, "cx", 3).await;
    let messages = [json!({"role":"user","content":prompt})];
    let exact = count_prompt_tokens("deepseek-v3.2", &messages);
    let bounded_count = count_prompt("deepseek-v3.2", &messages, &Value::Null, ALLOWANCE);
    assert!(bounded_count.tokens > exact, "{bounded_count:?} vs {exact}");
    let m = scrape_metrics(&h).await;
    assert_eq!(
        metric(&m, "muxgate_tokens_total{model=\"deepseek-v3.2\",tier=\"pro\",kind=\"prompt\",estimated=\"true\"}"),
        bounded_count.tokens as f64
    );
    assert_eq!(
        metric(&m, "muxgate_tokens_total{model=\"deepseek-v3.2\",tier=\"pro\",kind=\"completion\",estimated=\"true\"}"),
        count_tokens("deepseek-v3.2", &text) as f64
    );
    // This prompt's allowance, and the completion, which is counted whole (it is the bill).
    let merged_now = metric(&m, "muxgate_tokenizer_bytes_total");
    assert!(
        merged_now <= merged + (ALLOWANCE + text.len()) as f64,
        "{merged_now} after {merged}"
    );
}

/// Reads stream `id` on `c`, cancels it after its `deltas`-th delta, and returns the text it
/// sent before its `cancelled` end.
async fn cancel_after(c: &mut common::Client, id: &str, deltas: usize) -> String {
    let mut text = String::new();
    let mut seen = 0;
    loop {
        let f = c.recv().await;
        if f["id"] != id {
            continue;
        }
        match f["type"].as_str().unwrap() {
            "delta" => {
                text.push_str(f["text"].as_str().unwrap());
                seen += 1;
                if seen == deltas {
                    c.send(json!({"type": "cancel", "id": id})).await;
                }
            }
            "error" => {
                assert_eq!(f["code"], "cancelled");
                return text;
            }
            _ => {}
        }
    }
}
