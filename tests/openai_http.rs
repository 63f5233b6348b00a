//! The OpenAI-compatible HTTP front end, black-box: the real gateway and mock upstream on
//! loopback, requests from reqwest and raw TCP.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use muxgate::mock;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn url(h: &Harness, path: &str) -> String {
    format!("http://{}{path}", h.addr)
}

fn chat(prompt: &str, stream: bool) -> Value {
    json!({
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

async fn post(h: &Harness, token: &str, body: &Value) -> reqwest::Response {
    http_client()
        .post(url(h, "/v1/chat/completions"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A chat completion request written on a raw socket, for tests of what the socket sees.
async fn raw_post(h: &Harness, token: &str, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp
}

/// The `data:` payloads of an SSE body, `[DONE]` included, checking every event's framing.
fn events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "{body:?}");
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn streaming_answer_is_openai_chunks_in_exact_bytes() {
    let h = Harness::start().await;
    let prompt = "tell me about streams [[mock chunks=4]]";
    let res = post(&h, &h.token("ann", "pro"), &chat(prompt, true)).await;
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    let id = headers["x-request-id"].to_str().unwrap().to_string();
    let body = res.text().await.unwrap();
    let events = events(&body);
    let chunks = mock::word_chunks(prompt, 4);
    assert_eq!(events.len(), chunks.len() + 3, "{body}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    let created = first["created"].as_u64().unwrap();
    let head = format!(
        r#"{{"id":"chatcmpl-{id}","object":"chat.completion.chunk","created":{created},"model":"gpt-4.1","#
    );
    for (i, text) in chunks.iter().enumerate() {
        let role = if i == 0 { r#""role":"assistant","# } else { "" };
        let content = serde_json::to_string(text).unwrap();
        assert_eq!(
            events[i],
            format!(
                r#"{head}"choices":[{{"index":0,"delta":{{{role}"content":{content}}},"finish_reason":null}}]}}"#
            )
        );
    }
    let n = chunks.len();
    assert_eq!(
        events[n],
        format!(r#"{head}"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}"#)
    );
    let usage_chunk = &events[n + 1];
    assert!(
        usage_chunk.starts_with(&format!(r#"{head}"choices":[],"usage":{{"#)),
        "{usage_chunk}"
    );
    let usage: Value = serde_json::from_str(usage_chunk).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4, "{usage_chunk}");
    assert_eq!(events[n + 2], "[DONE]");
    // The id is the gateway's stream id, registered under the user like a WebSocket's.
    assert!(
        muxgate::test_support::stream_buffered_bytes(&h.gw, "ann", &id).is_some(),
        "{id}"
    );
}

#[tokio::test]
async fn non_streaming_answer_is_one_completion() {
    let h = Harness::start().await;
    let prompt = "one whole answer please [[mock chunks=5]]";
    let res = post(&h, &h.token("bea", "pro"), &chat(prompt, false)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], format!("chatcmpl-{id}"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4.1");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": expected(prompt, 5), "refusal": null}, "finish_reason": "stop"}])
    );
    assert_eq!(body["usage"]["completion_tokens"], 5, "{body}");
    assert!(
        h.mock.stats().last_request.unwrap()["stream"] == true,
        "upstream streamed"
    );
}

#[tokio::test]
async fn bad_token_and_bad_body_answer_in_openai_error_shape() {
    let h = Harness::start().await;
    for token in [None, Some("not-a-jwt")] {
        let mut req = http_client()
            .post(url(&h, "/v1/chat/completions"))
            .json(&chat("x", true));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()["x-should-retry"], "false");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error", "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let token = h.token("cai", "pro");
    let cases: [(&[u8], &str); 4] = [
        (b"{not json", "not JSON"),
        (br#"{"model":"gpt-4.1","messages":[]}"#, "`messages`"),
        (
            br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"x"}],"stream":1}"#,
            "`stream`",
        ),
        (
            br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"x"}],"bogus_param":1}"#,
            "bogus_param",
        ),
    ];
    for (body, says) in cases {
        let res = http_client()
            .post(url(&h, "/v1/chat/completions"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    // Bounded like a frame: one byte over max_frame_bytes is refused before it is read whole.
    let big = "x".repeat(h.gw.config().session.max_frame_bytes + 1);
    let res = http_client()
        .post(url(&h, "/v1/chat/completions"))
        .bearer_auth(&token)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(h.mock.stats().requests, 0, "nothing went upstream");
}

#[tokio::test]
async fn rate_limit_is_429_with_retry_headers() {
    let h = Harness::start_with(|c| {
        c.tiers.get_mut("free").unwrap().user_rpm = 2;
    })
    .await;
    let token = h.token("dan", "free");
    for _ in 0..2 {
        let res = post(&h, &token, &chat("ok [[mock chunks=1]]", false)).await;
        assert_eq!(res.status(), 200);
    }
    let res = post(&h, &token, &chat("one too many", true)).await;
    assert_eq!(res.status(), 429);
    let hd = res.headers().clone();
    assert_eq!(hd["x-should-retry"], "true");
    let ms: u64 = hd["retry-after-ms"].to_str().unwrap().parse().unwrap();
    let secs: u64 = hd["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(ms > 0 && secs == ms.div_ceil(1000), "{hd:?}");
    assert!(hd.contains_key("x-request-id"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["muxgate_code"], "rate_limited", "{body}");
    assert_eq!(h.mock.stats().requests, 2);
}

/// The HTTP status is the upstream's, as the `error` frame a WebSocket client gets for the
/// same answer carries it (`status`, spec of issue 12), else 502.
#[tokio::test]
async fn upstream_status_becomes_the_http_status() {
    // The breaker stays closed: each request sees the upstream's own failure.
    let h = Harness::start_with(|c| c.breaker.failure_threshold = 1000).await;
    let token = h.token("eve", "pro");
    let mut ws = h.connect("eve").await;
    for (id, directive) in [
        ("e500", "fail=500 fail_times=100"),
        ("e400", "fail=400 fail_times=100"),
    ] {
        let prompt = format!("[[mock {directive}]]");
        ws.open(id, &prompt).await;
        let frame = ws.recv_until("error", Some(id)).await;
        let status = frame["status"]
            .as_u64()
            .filter(|s| (400..=599).contains(s))
            .unwrap_or(502);
        for stream in [true, false] {
            let res = post(&h, &token, &chat(&prompt, stream)).await;
            assert_eq!(
                res.status(),
                status as u16,
                "{directive} stream={stream} {frame}"
            );
            // The gateway already retried: only a named wait (its circuit is open) says yes.
            let retry = frame.get("retry_after_ms").is_some().to_string();
            assert_eq!(res.headers()["x-should-retry"], retry.as_str(), "{frame}");
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["error"]["muxgate_code"], "upstream_error", "{body}");
            // The same failure (the mock numbers its injected failures in the message).
            let said = frame["message"]
                .as_str()
                .unwrap()
                .split(" (")
                .next()
                .unwrap();
            assert!(
                body["error"]["message"].as_str().unwrap().starts_with(said),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn error_after_the_first_event_is_an_error_event() {
    let h = Harness::start().await;
    let res = post(
        &h,
        &h.token("fay", "pro"),
        &chat("cut me [[mock chunks=6 cut=3]]", true),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    let (before, error) = body.split_once("event: error\ndata: ").expect(&body);
    assert_eq!(before.matches("data: ").count(), 3, "{body}");
    assert!(!body.contains("[DONE]"));
    assert!(error.ends_with("}}\n\n"), "{body}");
    let error: Value = serde_json::from_str(error.trim_end()).unwrap();
    assert_eq!(error["error"]["muxgate_code"], "upstream_error", "{error}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream() {
    let h = Harness::start().await;
    let token = h.token("gus", "pro");
    // Mid-stream: the body is dropped after its first bytes.
    let mut res = post(
        &h,
        &token,
        &chat("slow [[mock chunks=200 delay_ms=50]]", true),
    )
    .await;
    assert_eq!(res.status(), 200);
    let first = res.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(res);
    wait_for_mock(&h, "one aborted upstream request", |s| {
        s.aborted == 1 && s.in_flight == 0
    })
    .await;

    // Before the answer: a non-streaming request whose client hangs up while it waits.
    let tcp = raw_post(
        &h,
        &token,
        &chat("slow too [[mock chunks=200 delay_ms=50]]", false),
    )
    .await;
    wait_for_mock(&h, "the second request upstream", |s| s.requests == 2).await;
    drop(tcp);
    wait_for_mock(&h, "two aborted upstream requests", |s| {
        s.aborted == 2 && s.in_flight == 0
    })
    .await;
    let stats = h.gw.user_stats("gus").unwrap();
    assert_eq!(stats.live_streams, 0, "both streams ended");
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let h = Harness::start_with(|c| {
        c.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let preflight = |origin: &str| {
        http_client()
            .request(reqwest::Method::OPTIONS, url(&h, "/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-stainless-os",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    let hd = ok.headers();
    assert_eq!(hd["access-control-allow-origin"], "https://app.example");
    let allowed = hd["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("x-stainless-os"),
        "{allowed}"
    );
    assert!(hd["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let no = preflight("https://evil.example").await.unwrap();
    assert!(!no.headers().contains_key("access-control-allow-origin"));

    // The answer itself: readable by the allowed origin, with its ids and retry hints exposed.
    let res = http_client()
        .post(url(&h, "/v1/chat/completions"))
        .bearer_auth(h.token("hal", "pro"))
        .header("origin", "https://app.example")
        .json(&chat("hi [[mock chunks=1]]", false))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after-ms"),
        "{exposed}"
    );
    // Another origin's page spends nothing: refused before a stream opens.
    let res = http_client()
        .post(url(&h, "/v1/chat/completions"))
        .bearer_auth(h.token("hal", "pro"))
        .header("origin", "https://evil.example")
        .json(&chat("hi [[mock chunks=1]]", false))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(h.mock.stats().requests, 1);
}

#[tokio::test]
async fn models_lists_what_the_gateway_routes() {
    let h = Harness::start_with(|c| {
        c.providers[0].models = vec!["gpt-4.1".into(), "local-llama".into()];
        c.fallbacks
            .insert("gpt-4.1".into(), vec!["local-llama".into()]);
    })
    .await;
    let res = http_client()
        .get(url(&h, "/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http_client()
        .get(url(&h, "/v1/models"))
        .bearer_auth(h.token("ida", "pro"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"object": "list", "data": [
            {"id": "gpt-4.1", "object": "model", "created": 0, "owned_by": "mock"},
            {"id": "local-llama", "object": "model", "created": 0, "owned_by": "mock"},
        ]}),
        "priced models no provider serves are not listed"
    );
}

/// The mock answer through a raw socket: the body ends right after `[DONE]` (the openai 6.x
/// line reads until the body ends), and the connection stays usable.
#[tokio::test]
async fn the_body_closes_right_after_done() {
    let h = Harness::start().await;
    let mut tcp = raw_post(
        &h,
        &h.token("jo", "pro"),
        &chat("short [[mock chunks=2]]", true),
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Chunked transfer: the last chunk `0\r\n\r\n` comes with no wait after `[DONE]`.
    while !got.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the body ends")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: [DONE]\n\n\r\n0\r\n\r\n") || text.contains("data: [DONE]\n\n"),
        "{text}"
    );
}
