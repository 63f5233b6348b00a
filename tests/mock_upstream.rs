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

    /// Every remaining event, and whether the body broke (`true`) or ended cleanly.
    async fn rest(&mut self) -> (Vec<String>, bool) {
        let mut events = Vec::new();
        loop {
            match self.next().await {
                Ok(Some(e)) => events.push(e),
                Ok(None) => return (events, false),
                Err(_) => return (events, true),
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
    let (events, broke) = SseReader::new(resp).rest().await;
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
        &chat_body("wait [[mock chunks=1 stall_ms=2000]]", true),
    )
    .await;
    let headers_after = started.elapsed();
    let mut reader = SseReader::new(resp);
    let role = reader.next().await.unwrap().unwrap();
    assert!(content_of(&role).is_none());
    let first = reader.next().await.unwrap().unwrap();
    assert!(content_of(&first).is_some());
    // The headers come before the stall ends, the first chunk after. (A stall of 300 ms and
    // headers within 250 ms: a loaded box can take that long to answer at all.)
    assert!(
        headers_after < Duration::from_millis(2_000),
        "{headers_after:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(2_000));
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

// ---- Issue 12: tool calls, reasoning, refusals, usage details, error shapes, logprobs ----

/// The JSON events of a complete stream (without `[DONE]`) and whether `[DONE]` ended it.
async fn stream_json(mock: &MockHandle, body: &Value) -> (Vec<Value>, bool) {
    let resp = post(mock, body).await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    let done = events.last().is_some_and(|e| e == "[DONE]");
    let json = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    (json, done)
}

async fn completion(mock: &MockHandle, body: &Value) -> Value {
    let resp = post(mock, body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The `error` object of an answer that must have this HTTP status.
async fn error_of(mock: &MockHandle, body: &Value, status: u16) -> Value {
    let resp = post(mock, body).await;
    assert_eq!(resp.status(), status);
    let mut body: Value = resp.json().await.unwrap();
    body["error"].take()
}

fn deltas(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .map(|c| &c["delta"])
        .collect()
}

fn joined(events: &[Value], field: &str) -> String {
    deltas(events)
        .iter()
        .filter_map(|d| d[field].as_str())
        .collect()
}

/// Tool calls merged from their fragments, by index, as `message.tool_calls` would say them.
fn merged_calls(events: &[Value]) -> Vec<Value> {
    let mut calls: Vec<Value> = Vec::new();
    for delta in deltas(events) {
        for fragment in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = fragment["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert_eq!(fragment["function"]["arguments"], "", "{fragment}");
                calls.push(json!({
                    "id": fragment["id"], "type": fragment["type"],
                    "function": {"name": fragment["function"]["name"], "arguments": ""},
                }));
            } else {
                assert!(fragment.get("id").is_none(), "{fragment}");
                let args = &mut calls[i]["function"]["arguments"];
                *args = format!(
                    "{}{}",
                    args.as_str().unwrap(),
                    fragment["function"]["arguments"].as_str().unwrap()
                )
                .into();
            }
        }
    }
    calls
}

fn finish_reason(events: &[Value]) -> Option<&str> {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .find_map(|c| c["finish_reason"].as_str())
}

fn answer_number(event: &Value) -> String {
    event["id"]
        .as_str()
        .unwrap()
        .strip_prefix("chatcmpl-mock-")
        .unwrap()
        .to_owned()
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                               "metric": {"type": "boolean"}, "note": {"type": "string"}},
                "required": ["city", "days", "metric"]}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                "required": ["zone"]}}}
    ])
}

fn tool_body(prompt: &str, stream: bool) -> Value {
    let mut body = chat_body(prompt, stream);
    body["tools"] = weather_tools();
    body
}

#[tokio::test]
async fn tool_calls_stream_in_fragments_and_match_the_non_stream_answer() {
    let mock = spawn_mock(None).await;
    let prompt = "Weather in Lisbon please";
    let block = format!("{prompt} [[mock tools=3 chunks=2]]");
    let resp = post(&mock, &tool_body(&block, true)).await;
    let raw = resp.text().await.unwrap();
    let events: Vec<Value> = sse_events(&raw)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(raw.ends_with("data: [DONE]\n\n"));
    let n = answer_number(&events[0]);
    // OpenAI's key order on the first fragment of a call.
    assert!(raw.contains(&format!(
        "\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"call_{n}_0\",\"type\":\"function\",\
         \"function\":{{\"name\":\"get_weather\",\"arguments\":\"\"}}}}]}}"
    )));
    let ds = deltas(&events);
    // role, 2 content chunks first, then only tool-call fragments, then the finish.
    assert_eq!(ds[0], &json!({"role": "assistant", "content": ""}));
    let contents: Vec<&str> = ds[1..3]
        .iter()
        .map(|d| d["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, word_chunks(prompt, 2));
    let fragments = &ds[3..ds.len() - 1];
    for d in fragments {
        let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["tool_calls"], "{d}");
        assert_eq!(d["tool_calls"].as_array().unwrap().len(), 1);
    }
    for i in 0..3 {
        let pieces = fragments
            .iter()
            .filter(|d| d["tool_calls"][0]["index"] == i)
            .count();
        assert!(pieces >= 3, "call {i} has {pieces} fragments");
    }
    assert_eq!(ds[ds.len() - 1], &json!({}));
    assert_eq!(finish_reason(&events), Some("tool_calls"));

    let calls = merged_calls(&events);
    let names: Vec<&str> = calls
        .iter()
        .map(|c| c["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get_weather", "get_time", "get_weather"]);
    for (i, call) in calls.iter().enumerate() {
        assert_eq!(call["id"], format!("call_{n}_{i}"));
        assert_eq!(call["type"], "function");
    }
    let args: Vec<Value> = calls
        .iter()
        .map(|c| serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(
        args[0],
        json!({"city": "please", "days": 1, "metric": true})
    );
    assert_eq!(args[1], json!({"zone": "please"}));

    let answer = completion(&mock, &tool_body(&block, false)).await;
    let m = answer["id"]
        .as_str()
        .unwrap()
        .strip_prefix("chatcmpl-mock-")
        .unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], expected(prompt, 2));
    let whole = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(whole.len(), 3);
    for (i, (streamed, whole)) in calls.iter().zip(whole).enumerate() {
        assert_eq!(whole["id"], format!("call_{m}_{i}"));
        assert_eq!(whole["type"], "function");
        assert_eq!(whole["function"], streamed["function"], "call {i}");
    }
    // Completion tokens count every part: 2 content chunks plus the fragments.
    let stats = mock.stats();
    assert_eq!(stats.tool_requests, 2);
    assert_eq!(stats.chunks_sent, 2 + fragments.len() as u64);
}

#[tokio::test]
async fn tools_without_content_is_a_tool_call_only_answer() {
    let mock = spawn_mock(None).await;
    let body = chat_body("Find it [[mock tools=2]]", true);
    let (events, done) = stream_json(&mock, &body).await;
    assert!(done);
    assert_eq!(joined(&events, "content"), "");
    let calls = merged_calls(&events);
    let names: Vec<&str> = calls
        .iter()
        .map(|c| c["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tool_0", "tool_1"]);
    for (i, call) in calls.iter().enumerate() {
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"index": i, "query": "Find it"}));
    }
    assert_eq!(finish_reason(&events), Some("tool_calls"));

    let answer = completion(&mock, &chat_body("Find it [[mock tools=2]]", false)).await;
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(message["tool_calls"][1]["function"], calls[1]["function"]);
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    // 2 calls × (head + 4 pieces of the 29 characters of `{"index":N,"query":"Find it"}`).
    assert_eq!(answer["usage"]["completion_tokens"], 10);
    assert_eq!(mock.stats().tool_requests, 0);
}

#[tokio::test]
async fn automatic_tool_use_round_trip() {
    let mock = spawn_mock(None).await;
    let question = "What is the weather in Lisbon?";
    let (events, _) = stream_json(&mock, &tool_body(question, true)).await;
    assert_eq!(joined(&events, "content"), "");
    let calls = merged_calls(&events);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Lisbon", "days": 1, "metric": true}));
    assert_eq!(finish_reason(&events), Some("tool_calls"));

    // The SDK runs the tool and sends its result back.
    let result = "Lisbon: 23 C, sunny";
    let mut follow_up = tool_body(question, true);
    follow_up["messages"] = json!([
        {"role": "user", "content": question},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": result}
    ]);
    let (events, done) = stream_json(&mock, &follow_up).await;
    assert!(done);
    assert!(merged_calls(&events).is_empty());
    let prose = joined(&events, "content");
    assert!(
        prose.starts_with(&format!("The tool returned: “{result}”. ")),
        "{prose}"
    );
    assert_eq!(finish_reason(&events), Some("stop"));
    follow_up["stream"] = json!(false);
    let answer = completion(&mock, &follow_up).await;
    assert_eq!(answer["choices"][0]["message"]["content"], prose.as_str());
    assert!(answer["choices"][0]["message"].get("tool_calls").is_none());

    // tool_choice: a named function, "required", and "none".
    let mut named = tool_body(question, false);
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let answer = completion(&mock, &named).await;
    let call = &answer["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_time");
    assert_eq!(call["function"]["arguments"], r#"{"zone":"Lisbon"}"#);
    let mut required = tool_body(question, false);
    required["tool_choice"] = json!("required");
    let answer = completion(&mock, &required).await;
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let mut none = tool_body(question, false);
    none["tool_choice"] = json!("none");
    let answer = completion(&mock, &none).await;
    assert!(answer["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("You asked: "));
    assert_eq!(mock.stats().tool_requests, 6);
}

#[tokio::test]
async fn reasoning_comes_first_and_is_counted() {
    let mock = spawn_mock(None).await;
    let mut body = chat_body("think [[mock reasoning=3 chunks=2]]", true);
    body["stream_options"] = json!({"include_usage": true});
    let (events, _) = stream_json(&mock, &body).await;
    let ds = deltas(&events);
    let reasoning: Vec<&str> = ds[1..4]
        .iter()
        .map(|d| d["reasoning_content"].as_str().unwrap())
        .collect();
    assert_eq!(reasoning, mock::reasoning_chunks(3));
    assert_eq!(mock::reasoning_chunks(3).concat(), "Let me think ");
    assert_eq!(ds[4]["content"], word_chunks("think", 2)[0].as_str());
    assert!(ds.iter().all(|d| d.get("reasoning").is_none()));
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage,
        &json!({"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9,
                "completion_tokens_details": {"reasoning_tokens": 3}})
    );

    body["messages"][0]["content"] = json!("think [[mock reasoning=2 reasoning_field=reasoning]]");
    body["max_tokens"] = json!(4);
    let (events, _) = stream_json(&mock, &body).await;
    assert_eq!(joined(&events, "reasoning"), "Let me ");
    assert_eq!(joined(&events, "reasoning_content"), "");
    assert_eq!(finish_reason(&events), Some("length"));

    let answer = completion(
        &mock,
        &chat_body("think [[mock reasoning=4 chunks=1]]", false),
    )
    .await;
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me think this ");
    assert_eq!(message["content"], expected("think", 1));
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
}

#[tokio::test]
async fn a_reasoning_phase_is_paced_by_delay_ms() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("slow [[mock reasoning=4 chunks=1 delay_ms=60]]", true),
    )
    .await;
    let started = Instant::now();
    let mut reader = SseReader::new(resp);
    let mut first_reasoning = None;
    let mut first_content = None;
    while let Some(e) = reader.next().await.unwrap() {
        if e.contains("\"reasoning_content\"") {
            first_reasoning.get_or_insert(started.elapsed());
        }
        if content_of(&e).is_some() {
            first_content.get_or_insert(started.elapsed());
        }
    }
    let (reasoning, content) = (first_reasoning.unwrap(), first_content.unwrap());
    // 4 reasoning chunks, then the content: 4 gaps of 60 ms after the first reasoning chunk.
    assert!(
        content - reasoning >= Duration::from_millis(4 * 60 - 10),
        "{reasoning:?} {content:?}"
    );
}

#[tokio::test]
async fn refusal_is_sent_in_refusal_pieces() {
    let mock = spawn_mock(None).await;
    let (events, done) =
        stream_json(&mock, &chat_body("bad [[mock refusal=1 delay_ms=0]]", true)).await;
    assert!(done);
    assert_eq!(joined(&events, "refusal").trim_end(), mock::REFUSAL_TEXT);
    assert_eq!(joined(&events, "content"), "");
    let refusal_chunks = deltas(&events)
        .iter()
        .filter(|d| d.get("refusal").is_some())
        .count();
    assert_eq!(
        refusal_chunks,
        mock::REFUSAL_TEXT.split_whitespace().count()
    );
    assert_eq!(finish_reason(&events), Some("stop"));
    let answer = completion(&mock, &chat_body("bad [[mock refusal=1]]", false)).await;
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(
        message["refusal"].as_str().unwrap().trim_end(),
        mock::REFUSAL_TEXT
    );
}

#[tokio::test]
async fn cached_tokens_are_reported_up_to_the_prompt() {
    let mock = spawn_mock(None).await;
    // Prompt tokens count the raw text, block included: 8 words.
    for (cached, want) in [(2, 2), (100, 8)] {
        let prompt = format!("one two three four five [[mock chunks=1 cached={cached}]]");
        let answer = completion(&mock, &chat_body(&prompt, false)).await;
        assert_eq!(
            answer["usage"],
            json!({"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9,
                   "prompt_tokens_details": {"cached_tokens": want}})
        );
        let mut body = chat_body(&prompt, true);
        body["stream_options"] = json!({"include_usage": true});
        let (events, _) = stream_json(&mock, &body).await;
        assert_eq!(events.last().unwrap()["usage"], answer["usage"]);
    }
}

#[tokio::test]
async fn fail_body_is_shaped_by_directives() {
    let mock = spawn_mock(None).await;
    let prompt = "huge [[mock fail=400 fail_code=context_length_exceeded fail_param=messages]]";
    assert_eq!(
        error_of(&mock, &chat_body(prompt, true), 400).await,
        json!({"message": "mock: injected failure 400 (1 of 1)",
            "type": "invalid_request_error", "param": "messages",
            "code": "context_length_exceeded"})
    );
    let prompt = "x [[mock fail=503 fail_type=overloaded_error]]";
    let error = error_of(&mock, &chat_body(prompt, false), 503).await;
    assert_eq!(error["type"], "overloaded_error");
    assert_eq!(error["code"], "mock_injected_failure");
    assert_eq!(error["param"], Value::Null);
}

#[tokio::test]
async fn error_event_ends_the_stream_after_k_parts() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("oops [[mock chunks=5 error_event=2]]", true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (events, broke) = SseReader::new(resp).rest().await;
    assert!(!broke);
    // role, 2 content chunks, the error event, then a clean end: no finish, no [DONE].
    assert_eq!(events.len(), 4, "{events:?}");
    let contents: Vec<String> = events.iter().filter_map(|e| content_of(e)).collect();
    assert_eq!(contents, word_chunks("oops", 2));
    let error: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(
        error,
        json!({"error": {"message": "mock: error event after 2 parts", "type": "server_error",
            "param": null, "code": "mock_stream_error"}})
    );
    wait_for_stats(&mock, "error event", |s| s.in_flight == 0).await;
    let stats = mock.stats();
    assert_eq!(
        (
            stats.error_events,
            stats.completed,
            stats.aborted,
            stats.cut
        ),
        (1, 0, 0, 0)
    );

    let (events, done) = stream_json(
        &mock,
        &chat_body(
            "x [[mock tools=1 error_event=1 fail_code=overloaded fail_type=t]]",
            true,
        ),
    )
    .await;
    assert!(!done);
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
        0
    );
    assert_eq!(events[2]["error"]["code"], "overloaded");
    assert_eq!(events[2]["error"]["type"], "t");

    let error = error_of(
        &mock,
        &chat_body("x [[mock chunks=3 error_event=1]]", false),
        500,
    )
    .await;
    assert_eq!(error["code"], "mock_stream_error");
    assert_eq!(mock.stats().error_events, 3);
}

#[tokio::test]
async fn cut_can_fall_right_after_a_tool_call_fragment() {
    let mock = spawn_mock(None).await;
    let resp = post(
        &mock,
        &chat_body("x [[mock tools=1 reasoning=1 cut=3]]", true),
    )
    .await;
    let (events, broke) = SseReader::new(resp).rest().await;
    let events: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(broke);
    // role, reasoning, the call's head fragment, its first arguments piece: then the cut.
    assert_eq!(events.len(), 4, "{events:?}");
    let last = &events[3]["choices"][0];
    assert_eq!(
        last["delta"]["tool_calls"][0]["function"]["arguments"],
        "{\"index\""
    );
    assert_eq!(last["finish_reason"], Value::Null);
    wait_for_stats(&mock, "cut", |s| s.cut == 1 && s.in_flight == 0).await;
    assert_eq!(mock.stats().chunks_sent, 3);
}

#[tokio::test]
async fn logprobs_ride_on_every_content_chunk() {
    let mock = spawn_mock(None).await;
    let mut body = chat_body("lp [[mock chunks=3]]", true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (events, _) = stream_json(&mock, &body).await;
    let chunks = word_chunks("lp", 3);
    let with_logprobs: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0])
        .filter(|c| c.get("logprobs").is_some())
        .collect();
    assert_eq!(with_logprobs.len(), 3);
    for (k, choice) in with_logprobs.iter().enumerate() {
        let entries = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(choice["delta"]["content"], chunks[k].as_str());
        assert_eq!(entry["token"], chunks[k].as_str());
        assert_eq!(entry["bytes"], json!(chunks[k].as_bytes()));
        assert_eq!(entry["logprob"], -0.125 * (1 + k) as f64);
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(entry["top_logprobs"][0]["token"], chunks[k].as_str());
    }
    body["stream"] = json!(false);
    let answer = completion(&mock, &body).await;
    let entries = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let tokens: Vec<&str> = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, chunks);
    // Without `logprobs`, no chunk carries the key.
    let (events, _) = stream_json(&mock, &chat_body("lp [[mock chunks=3]]", true)).await;
    assert!(events.iter().all(|e| e["choices"]
        .get(0)
        .is_none_or(|c| c.get("logprobs").is_none())));
}

#[tokio::test]
async fn modern_request_fields_are_accepted() {
    let mock = spawn_mock(None).await;
    let body = json!({
        "model": "m", "stream": true, "n": 1, "seed": 7, "temperature": 0.2,
        "tools": weather_tools(), "tool_choice": "auto", "parallel_tool_calls": true,
        "logprobs": false, "top_logprobs": 0, "modalities": ["text"], "store": false,
        "metadata": {"k": "v"}, "service_tier": "auto", "response_format": {"type": "text"},
        "prediction": {"type": "content", "content": "x"},
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "hi [[mock chunks=2]]"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}
        ]
    });
    let (events, done) = stream_json(&mock, &body).await;
    assert!(done);
    // Word mode never calls a tool on its own.
    assert_eq!(joined(&events, "content"), expected("hi", 2));
    assert!(merged_calls(&events).is_empty());

    for (bad, needle) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "nope",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": {"a": 1}}), "tools"),
    ] {
        let mut body = tool_body("q", true);
        for (k, v) in bad.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = post(&mock, &body).await;
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert!(
            err["error"]["message"].as_str().unwrap().contains(needle),
            "{err}"
        );
    }
    // Exclusive directives are refused even when header and block each give one.
    let resp = http_client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .header("x-mock", "refusal=1")
        .json(&chat_body("q [[mock tools=1]]", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn fingerprint_rides_on_every_chunk_and_the_answer() {
    let mock = spawn_mock(None).await;
    let mut body = chat_body("fp [[mock chunks=2 fingerprint=fp_4a2b]]", true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&mock, &body).await;
    let raw = resp.text().await.unwrap();
    let events = sse_events(&raw);
    // role, 2 content, finish, usage, then [DONE]: every chunk says it, in OpenAI's key order.
    assert_eq!(events.len(), 6);
    for e in &events[..5] {
        assert!(
            e.contains("\"model\":\"mock-model\",\"system_fingerprint\":\"fp_4a2b\",\"choices\":"),
            "{e}"
        );
    }
    body["stream"] = json!(false);
    let answer = completion(&mock, &body).await;
    assert_eq!(answer["system_fingerprint"], "fp_4a2b");
    let (events, _) = stream_json(&mock, &chat_body("fp [[mock chunks=1]]", true)).await;
    assert!(events.iter().all(|e| e.get("system_fingerprint").is_none()));
}
