//! Black-box tests of the mock upstream over real loopback HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{expected, http_client, spawn_mock, wait_for_stats};
use muxgate::mock::{self, word_chunks, MockHandle, MockStatsSnapshot};
use serde_json::{json, Value};
use tokio::net::TcpListener;

fn chat_body(prompt: &str, stream: bool) -> Value {
    json!({
        "model": "mock-model",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    })
}

async fn post(handle: &MockHandle, body: &Value) -> reqwest::Response {
    http_client()
        .post(format!("{}/chat/completions", handle.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of a complete SSE body.
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

fn content_of(event: &str) -> Option<String> {
    let v: Value = serde_json::from_str(event).ok()?;
    v["choices"][0]["delta"]["content"]
        .as_str()
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
}

/// Reads a stream event by event, whatever the TCP segmentation.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// Next event, `Ok(None)` at a clean end, `Err` if the body broke.
    async fn next(&mut self) -> Result<Option<String>, reqwest::Error> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event = self.buffer[..end].to_owned();
                self.buffer.drain(..end + 2);
                return Ok(Some(event.strip_prefix("data: ").unwrap().to_owned()));
            }
            match self.response.chunk().await? {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return Ok(None),
            }
        }
    }
}

#[tokio::test]
async fn word_mode_stream_matches_word_chunks() {
    let mock = spawn_mock(None).await;
    let prompt = "Tell me a story about ferrets";
    let resp = post(
        &mock,
        &chat_body(&format!("{prompt} [[mock chunks=7]]"), true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let events = sse_events(&resp.text().await.unwrap());

    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let json_events: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = json_events[0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-mock-"), "{id}");
    for e in &json_events {
        assert_eq!(e["id"], id.as_str());
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], "mock-model");
        assert!(e["created"].as_u64().unwrap() > 1_600_000_000);
        assert!(e.get("usage").is_none());
    }
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks(prompt, 7));
    // role + 7 content + finish + [DONE]
    assert_eq!(events.len(), 10);
    let finish = &json_events[json_events.len() - 1]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert_eq!(finish["delta"], json!({}));

    wait_for_stats(&mock, "stream end", |s| {
        s.in_flight == 0 && s.completed == 1
    })
    .await;
    let stats = mock.stats();
    assert_eq!(
        (stats.requests, stats.chunks_sent, stats.aborted),
        (1, 7, 0)
    );
    assert_eq!(stats.last_request.unwrap()["model"], "mock-model");
}

#[tokio::test]
async fn usage_chunk_only_with_include_usage() {
    let mock = spawn_mock(None).await;
    let mut body = json!({
        "model": "m",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "count these words [[mock chunks=4]]"},
        ],
    });
    let events = sse_events(&post(&mock, &body).await.text().await.unwrap());
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "{events:?}"
    );

    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&post(&mock, &body).await.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    // Prompt words are counted on the raw text of all messages: 3 + 5.
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12})
    );
    let finish: Value = serde_json::from_str(&events[events.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn header_directives_override_the_message_block() {
    let mock = spawn_mock(None).await;
    let resp = http_client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .header("x-mock", "chunks=3 finish=content_filter")
        .json(&chat_body("hello [[mock chunks=9]]", true))
        .send()
        .await
        .unwrap();
    let events = sse_events(&resp.text().await.unwrap());
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks("hello", 3));
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "content_filter");
}

#[tokio::test]
async fn array_content_parts_are_joined() {
    let mock = spawn_mock(None).await;
    let body = json!({
        "model": "m",
        "stream": true,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hello"},
            {"type": "text", "text": "world [[mock chunks=5]]"},
        ]}],
    });
    let events = sse_events(&post(&mock, &body).await.text().await.unwrap());
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks("Hello\nworld", 5));
}

#[tokio::test]
async fn fail_429_twice_then_success() {
    let mock = spawn_mock(None).await;
    let body = chat_body(
        "retry me [[mock chunks=2 fail=429 fail_times=2 retry_after_ms=1500]]",
        true,
    );
    for attempt in 1..=2 {
        let resp = post(&mock, &body).await;
        assert_eq!(resp.status(), 429, "attempt {attempt}");
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["retry-after-ms"], "1500");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "rate_limit_error");
        assert!(err["error"]["message"].as_str().unwrap().contains("429"));
    }
    let resp = post(&mock, &body).await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let stats = mock.stats();
    assert_eq!((stats.requests, stats.errors_injected), (3, 2));
}

#[tokio::test]
async fn fail_defaults_and_shared_key() {
    let mock = spawn_mock(None).await;
    // Default retry_after_ms is 100: Retry-After rounds up to 1 second.
    let resp = post(
        &mock,
        &chat_body("x [[mock chunks=1 fail=503 key=shared]]", false),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["retry-after-ms"], "100");
    // Same key, different prompt: the single failure is used up.
    let resp = post(
        &mock,
        &chat_body("y [[mock chunks=1 fail=503 key=shared]]", false),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // 500 carries no retry headers.
    let resp = post(&mock, &chat_body("z [[mock chunks=1 fail=500]]", false)).await;
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "server_error"
    );
}

#[tokio::test]
async fn cut_breaks_the_stream_after_k_chunks() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("cut me [[mock chunks=10 cut=3 delay_ms=5]]", true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    let mut events = Vec::new();
    let broke = loop {
        match reader.next().await {
            Ok(Some(e)) => events.push(e),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(broke, "the body should end with an error: {events:?}");
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks("cut me", 3));
    assert!(!events
        .iter()
        .any(|e| e == "[DONE]" || e.contains("\"finish_reason\":\"")));
    wait_for_stats(&mock, "cut stream to close", |s| s.in_flight == 0).await;
    let stats = mock.stats();
    assert_eq!((stats.cut, stats.aborted, stats.completed), (1, 0, 0));
    assert_eq!(stats.chunks_sent, 3);
}

#[tokio::test]
async fn cut_beyond_the_answer_drops_finish_and_done() {
    let mock = spawn_mock(None).await;
    let resp = post(&mock, &chat_body("short [[mock chunks=2 cut=50]]", true)).await;
    let mut reader = SseReader::new(resp);
    let mut contents = Vec::new();
    let broke = loop {
        match reader.next().await {
            Ok(Some(e)) => {
                assert!(e != "[DONE]" && !e.contains("\"finish_reason\":\""), "{e}");
                contents.extend(content_of(&e));
            }
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(broke);
    assert_eq!(contents, word_chunks("short", 2));
    wait_for_stats(&mock, "cut", |s| s.cut == 1 && s.in_flight == 0).await;
}

#[tokio::test]
async fn dropping_the_response_counts_aborted() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("slow [[mock chunks=100000 delay_ms=5]]", true),
    )
    .await;
    let mut reader = SseReader::new(resp);
    let mut seen = 0;
    while seen < 2 {
        let event = reader.next().await.unwrap().unwrap();
        if content_of(&event).is_some() {
            seen += 1;
        }
    }
    assert_eq!(mock.stats().in_flight, 1);
    drop(reader);
    wait_for_stats(&mock, "abort to be noticed", |s| s.in_flight == 0).await;
    let stats = mock.stats();
    assert_eq!((stats.aborted, stats.cut, stats.completed), (1, 0, 0));
    assert!(stats.chunks_sent < 100_000);
}

#[tokio::test]
async fn slow_reader_back_pressures_the_mock() {
    let mock = spawn_mock(None).await;
    let n = 200_000;
    let resp = post(
        &mock,
        &chat_body(&format!("bulk [[mock chunks={n} chunk_bytes=1024]]"), true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // Headers are in; the body is not read while the mock fills the buffers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled_at = mock.stats().chunks_sent;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = mock.stats().chunks_sent;
    assert!(later < n as u64 / 4, "chunks_sent={later}");
    assert_eq!(
        stalled_at, later,
        "the mock kept producing while nobody read"
    );
    drop(resp);
    wait_for_stats(&mock, "abort", |s| s.in_flight == 0 && s.aborted == 1).await;
}

#[tokio::test]
async fn chunk_bytes_pads_each_chunk() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("pad [[mock chunks=3 chunk_bytes=32]]", true),
    )
    .await;
    let events = sse_events(&resp.text().await.unwrap());
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents.len(), 3);
    for (chunk, plain) in contents.iter().zip(word_chunks("pad", 3)) {
        assert_eq!(chunk.len(), 32, "{chunk:?}");
        assert!(chunk.starts_with(plain.trim_end()));
        assert!(chunk.ends_with(". "));
    }
}

#[tokio::test]
async fn api_key_is_enforced() {
    let mock = spawn_mock(Some("sk-test")).await;
    let url = format!("{}/chat/completions", mock.base_url());
    let body = chat_body("hi [[mock chunks=1]]", false);

    let resp = http_client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert_eq!(mock.stats().last_authorization, None);

    let resp = http_client()
        .post(&url)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        mock.stats().last_authorization.as_deref(),
        Some("Bearer wrong")
    );

    let resp = http_client()
        .post(&url)
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stats = mock.stats();
    assert_eq!(stats.last_authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.last_request.unwrap(), body);
}

#[tokio::test]
async fn bad_requests_get_400() {
    let mock = spawn_mock(None).await;
    let url = format!("{}/chat/completions", mock.base_url());
    let cases = [
        (chat_body("x [[mock chunks=abc]]", true), None, "chunks"),
        (chat_body("x [[mock bogus=1]]", true), None, "bogus"),
        (chat_body("x [[mock chunks=3", true), None, "unterminated"),
        (chat_body("x", true), Some("nope"), "key=value"),
        (json!({"messages": []}), None, "model"),
        (json!({"model": "m"}), None, "messages"),
        (
            json!({"model": "m", "messages": [], "max_tokens": -1}),
            None,
            "max_tokens",
        ),
    ];
    for (body, header, needle) in cases {
        let mut req = http_client().post(&url).json(&body);
        if let Some(h) = header {
            req = req.header("x-mock", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle}"
        );
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
    let resp = http_client()
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let stats = mock.stats();
    assert_eq!(stats.requests, 8);
    assert_eq!(stats.last_request, None);
}

#[tokio::test]
async fn max_tokens_truncates_with_length() {
    let mock = spawn_mock(None).await;
    let mut body = chat_body("long [[mock chunks=10]]", true);
    body["max_tokens"] = json!(4);
    let events = sse_events(&post(&mock, &body).await.text().await.unwrap());
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks("long", 4));
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");

    let mut body = chat_body("long [[mock chunks=10]]", false);
    body["max_completion_tokens"] = json!(2);
    let v: Value = post(&mock, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], expected("long", 2));
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn non_stream_returns_one_completion() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("whole answer please [[mock chunks=5]]", false),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "mock-model");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        expected("whole answer please", 5)
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10})
    );
    let stats = mock.stats();
    assert_eq!(
        (stats.completed, stats.in_flight, stats.chunks_sent),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn non_stream_cut_breaks_the_body() {
    let mock = spawn_mock(None).await;
    let resp = post(&mock, &chat_body("x [[mock chunks=5 cut=2]]", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    assert_eq!(mock.stats().cut, 1);
}

#[tokio::test]
async fn prose_mode_is_a_deterministic_demo_answer() {
    let mock = spawn_mock(None).await;
    let body = chat_body("What is muxgate? [[mock delay_ms=0]]", true);
    let first = sse_events(&post(&mock, &body).await.text().await.unwrap());
    let second = sse_events(&post(&mock, &body).await.text().await.unwrap());
    let text = |events: &[String]| -> String {
        events
            .iter()
            .filter_map(|e| content_of(e))
            .collect::<String>()
    };
    let answer = text(&first);
    assert_eq!(answer, text(&second));
    assert!(
        answer.starts_with("You asked: “What is muxgate?”. "),
        "{answer}"
    );
    assert!(answer.contains("simulated provider"), "{answer}");
    assert!(answer.contains("WebSocket"), "{answer}");
    assert!(first.iter().filter(|e| content_of(e).is_some()).count() > 20);

    let v: Value = post(&mock, &chat_body("What is muxgate?", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], answer.as_str());
}

#[tokio::test]
async fn stall_delays_the_first_chunk() {
    let mock = spawn_mock(None).await;
    let started = Instant::now();
    let resp = post(
        &mock,
        &chat_body("wait [[mock chunks=1 stall_ms=300]]", true),
    )
    .await;
    let headers_after = started.elapsed();
    let mut reader = SseReader::new(resp);
    let role = reader.next().await.unwrap().unwrap();
    assert!(content_of(&role).is_none());
    let first = reader.next().await.unwrap().unwrap();
    assert!(content_of(&first).is_some());
    assert!(
        headers_after < Duration::from_millis(250),
        "{headers_after:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn reset_zeroes_counters_and_failure_keys() {
    let mock = spawn_mock(None).await;
    let body = chat_body("flaky [[mock chunks=1 fail=500]]", false);
    assert_eq!(post(&mock, &body).await.status(), 500);
    assert_eq!(post(&mock, &body).await.status(), 200);

    let stats: MockStatsSnapshot = http_client()
        .get(format!("http://{}/mock/stats", mock.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, mock.stats());
    assert_eq!(
        (stats.requests, stats.errors_injected, stats.completed),
        (2, 1, 1)
    );

    let resp = http_client()
        .post(format!("http://{}/mock/reset", mock.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stats = mock.stats();
    assert_eq!(
        (stats.requests, stats.errors_injected, stats.completed),
        (0, 0, 0)
    );
    assert_eq!(stats.last_request, None);
    // The failure counter is forgotten too: the same request fails again.
    assert_eq!(post(&mock, &body).await.status(), 500);
}

#[tokio::test]
async fn healthz_cors_and_unknown_routes() {
    let mock = spawn_mock(Some("k")).await;
    let resp = http_client()
        .get(format!("http://{}/healthz", mock.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");

    let resp = http_client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/chat/completions", mock.base_url()),
        )
        .header("origin", "http://127.0.0.1:9999")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-mock",
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");

    let resp = http_client()
        .get(format!("http://{}/nope", mock.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(mock.stats().requests, 0);
}

#[tokio::test]
async fn many_concurrent_streams_complete() {
    let mock = spawn_mock(None).await;
    let client = http_client();
    let url = format!("{}/chat/completions", mock.base_url());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let prompt = format!("stream {i}");
                let body = chat_body(&format!("{prompt} [[mock chunks=20 delay_ms=1]]"), true);
                let text = client.post(&url).json(&body).send().await?.text().await?;
                let contents: Vec<String> = sse_events(&text)
                    .iter()
                    .filter_map(|e| content_of(e))
                    .collect();
                assert_eq!(contents, word_chunks(&prompt, 20));
                Ok::<_, reqwest::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    wait_for_stats(&mock, "all streams to close", |s| s.in_flight == 0).await;
    let stats = mock.stats();
    assert_eq!(
        (stats.completed, stats.aborted, stats.chunks_sent),
        (200, 0, 4000)
    );
}

#[tokio::test]
async fn run_serves_until_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = mock::MockState::new(None);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mock::run(listener, state.clone(), async {
        let _ = rx.await;
    }));
    let resp = http_client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(state.stats().requests, 0);
}
