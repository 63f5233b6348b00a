//! Logs: one span per connection and per stream with user, stream id and model, and never a
//! token, an API key or prompt text, whatever happens to the streams.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn logs_have_spans_and_no_secrets() {
    let captured = captured_logs();

    let h = Harness::start_with(|c| c.retry.max_attempts = 2).await;
    let token = h.token("alice", "pro");
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":token})).await;
    c.recv_until("welcome", None).await;
    let secret_prompt = "PROMPT-SECRET-41f7";
    c.open("ok", &format!("{secret_prompt} [[mock chunks=5]]"))
        .await;
    c.open(
        "fail",
        &format!("{secret_prompt} [[mock fail=500 fail_times=9]]"),
    )
    .await;
    c.open("cut", &format!("{secret_prompt} [[mock chunks=9 cut=2]]"))
        .await;
    c.open("bad", "[[mock chunks=1]]").await;
    c.send(json!({"type":"cancel","id":"bad"})).await;
    c.send_text(&format!(
        "{{\"type\":\"open\",\"broken\":\"{secret_prompt}\""
    ))
    .await;
    c.collect(&["ok".into(), "fail".into(), "cut".into(), "bad".into()])
        .await;
    c.close().await;
    // A refused token is not logged either.
    let mut bad = h.connect_raw().await;
    bad.send(json!({"type":"hello","token":format!("{token}x")}))
        .await;
    let _ = bad.next_event().await;
    wait_for_mock(&h, "all requests", |s| s.in_flight == 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.is_empty());
    for secret in [API_KEY, secret_prompt, token.as_str(), SECRET] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    let ended: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "stream ended")
        .collect();
    assert_eq!(ended.len(), 4, "one line per stream");
    // Each line says how its stream ended, field by field.
    let ended_as = |id: &str| {
        ended
            .iter()
            .find(|l| {
                l["spans"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == "stream" && s["stream"] == id)
            })
            .unwrap_or_else(|| panic!("no `stream ended` for {id}: {ended:?}"))["fields"]
            .clone()
    };
    assert!(
        ended.iter().all(|l| l["target"] == "muxgate::session"),
        "log filters still match it: {ended:?}"
    );
    let ok = ended_as("ok");
    assert_eq!(ok["outcome"], "done", "{ok}");
    assert_eq!(ok["finish_reason"], "stop", "{ok}");
    assert_eq!(ok["model"], "deepseek-v3.2", "{ok}");
    assert!(ok["completion_tokens"].as_u64().unwrap() >= 5, "{ok}");
    assert!(ok["prompt_tokens"].as_u64().unwrap() > 0, "{ok}");
    assert!(ok["completion_id"].is_string(), "{ok}");
    let fail = ended_as("fail");
    assert_eq!(fail["outcome"], "failed", "{fail}");
    assert_eq!(fail["code"], "upstream_error", "{fail}");
    assert_eq!(fail["status"], 500, "{fail}");
    assert!(
        fail["error"].as_str().unwrap().contains("HTTP 500"),
        "{fail}"
    );
    assert_eq!(ended_as("cut")["outcome"], "failed");
    let bad = ended_as("bad");
    assert_eq!(bad["outcome"], "cancelled", "{bad}");
    assert_eq!(bad["reason"], "Client", "{bad}");
    // The failures a relay logs after its loop (`cut` breaks mid-stream, `fail` is retried)
    // are in the stream's span too, though the loop itself runs outside it.
    let failures: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["fields"]["message"] == "upstream failed"
                || l["fields"]["message"] == "retrying upstream"
        })
        .collect();
    assert!(failures.len() >= 3, "{failures:?}");
    for line in ended.iter().chain(&failures) {
        let spans = line["spans"].as_array().unwrap();
        assert!(
            spans
                .iter()
                .any(|s| s["name"] == "conn" && s["user"] == "alice" && s["tier"] == "pro"),
            "{line}"
        );
        assert!(
            spans.iter().any(|s| s["name"] == "stream"
                && s["model"] == "deepseek-v3.2"
                && s["stream"].is_string()),
            "{line}"
        );
    }
}
