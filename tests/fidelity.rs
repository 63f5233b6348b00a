//! The whole answer, black-box (issue 12): tool calls, reasoning, refusals, logprobs, upstream
//! errors and usage details from the real mock upstream through the real gateway to a
//! WebSocket client, and the request reaching the upstream unchanged.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use muxgate::mock;
use muxgate::test_support::{cost_usd, count_prompt_tokens, count_tokens, count_tools_tokens};
use serde_json::{json, Value};

/// Every frame of one stream, in order, up to and including its end.
async fn frames_of(c: &mut Client, id: &str) -> (Vec<Value>, Value) {
    let mut deltas = Vec::new();
    loop {
        let f = c.recv().await;
        if f["id"] != id {
            continue;
        }
        match f["type"].as_str().unwrap() {
            "delta" => {
                assert_eq!(f["seq"], deltas.len() as u64 + 1, "seq in order: {f}");
                assert!(f["text"].is_string(), "text always present: {f}");
                deltas.push(f);
            }
            "done" | "error" => return (deltas, f),
            _ => {}
        }
    }
}

/// The answer's tool calls: fragments merged by `index`, in index order, as
/// `(id, type, name, arguments)`.
fn merged_calls(deltas: &[Value]) -> Vec<(String, String, String, String)> {
    let mut calls: BTreeMap<u64, (String, String, String, String)> = BTreeMap::new();
    for d in deltas {
        for frag in d["tool_calls"].as_array().into_iter().flatten() {
            let call = calls.entry(frag["index"].as_u64().unwrap()).or_default();
            if let Some(id) = frag["id"].as_str() {
                call.0.push_str(id);
            }
            if let Some(t) = frag["type"].as_str() {
                call.1.push_str(t);
            }
            if let Some(name) = frag["function"]["name"].as_str() {
                call.2.push_str(name);
            }
            if let Some(args) = frag["function"]["arguments"].as_str() {
                call.3.push_str(args);
            }
        }
    }
    calls.into_values().collect()
}

/// The concatenation of one string part (`text`, `reasoning`, `refusal`) over the deltas.
fn joined(deltas: &[Value], part: &str) -> String {
    deltas.iter().filter_map(|d| d[part].as_str()).collect()
}

fn weather_tool() -> Value {
    json!({"type":"function","function":{"name":"get_weather","description":"Current weather",
        "parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},
            "required":["city","days"]}}})
}

fn time_tool() -> Value {
    json!({"type":"function","function":{"name":"get_time",
        "parameters":{"type":"object","properties":{"zone":{"type":"string"},"dst":{"type":"boolean"}},
            "required":["zone","dst"]}}})
}

fn open_with_tools(id: &str, prompt: &str, tools: Value) -> Value {
    json!({"type":"open","id":id,"model":"deepseek-v3.2",
        "messages":[{"role":"user","content":prompt}],
        "params":{"tools":tools,"tool_choice":"auto","parallel_tool_calls":true}})
}

#[tokio::test]
async fn a_tool_call_only_answer_arrives_complete() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.send(open_with_tools(
        "t",
        "What is the weather in Hanoi [[mock tools=1 fingerprint=fp_t1]]",
        json!([weather_tool()]),
    ))
    .await;
    let (deltas, done) = frames_of(&mut c, "t").await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "tool_calls");
    assert_eq!(joined(&deltas, "text"), "", "no content");
    let first = &deltas[0]["tool_calls"][0];
    assert_eq!(first["function"]["name"], "get_weather", "{first}");
    assert_eq!(first["type"], "function");
    assert!(deltas.len() > 2, "the arguments came in several fragments");
    let completion_id = done["completion_id"].as_str().unwrap();
    let n = completion_id.strip_prefix("chatcmpl-mock-").unwrap();
    assert_eq!(done["system_fingerprint"], "fp_t1");
    let calls = merged_calls(&deltas);
    assert_eq!(
        calls,
        vec![(
            format!("call_{n}_0"),
            "function".into(),
            "get_weather".into(),
            r#"{"city":"Hanoi","days":1}"#.into()
        )]
    );
    let usage = &done["usage"];
    assert_eq!(usage["completion_tokens"], deltas.len() as u64);
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + deltas.len() as u64
    );
    assert_eq!(h.mock.stats().requests, 1);
}

#[tokio::test]
async fn two_parallel_tool_calls() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.send(open_with_tools(
        "p",
        "Weather and time in Lima [[mock tools=2]]",
        json!([weather_tool(), time_tool()]),
    ))
    .await;
    let (deltas, done) = frames_of(&mut c, "p").await;
    assert_eq!(done["finish_reason"], "tool_calls", "{done}");
    let n = done["completion_id"]
        .as_str()
        .unwrap()
        .strip_prefix("chatcmpl-mock-")
        .unwrap()
        .to_string();
    let calls = merged_calls(&deltas);
    assert_eq!(
        calls,
        vec![
            (
                format!("call_{n}_0"),
                "function".into(),
                "get_weather".into(),
                r#"{"city":"Lima","days":1}"#.into()
            ),
            (
                format!("call_{n}_1"),
                "function".into(),
                "get_time".into(),
                r#"{"dst":true,"zone":"Lima"}"#.into()
            ),
        ]
    );
    for (_, _, _, args) in &calls {
        serde_json::from_str::<Value>(args).expect("merged arguments are JSON");
    }
}

#[tokio::test]
async fn reasoning_longer_than_the_first_token_timeout_is_not_timed_out() {
    let h = Harness::start_with(|c| c.providers[0].first_token_timeout_ms = 300).await;
    let mut c = h.connect("alice").await;
    // 20 reasoning chunks 50 ms apart: a second of thinking before the first content.
    let prompt = "think first [[mock reasoning=20 chunks=3 delay_ms=50]]";
    c.open("r", prompt).await;
    let (deltas, done) = frames_of(&mut c, "r").await;
    assert_eq!(done["type"], "done", "no timeout: {done}");
    assert_eq!(
        joined(&deltas, "reasoning"),
        mock::reasoning_chunks(20).concat()
    );
    assert_eq!(joined(&deltas, "text"), expected(prompt, 3));
    assert_eq!(deltas.len(), 23, "one delta per part");
    assert!(deltas[..20].iter().all(|d| d["text"] == ""));
    assert_eq!(
        done["usage"]["completion_tokens_details"]["reasoning_tokens"],
        20
    );
    let stats = h.mock.stats();
    assert_eq!(stats.requests, 1, "not retried (and not paid twice)");
    assert_eq!(stats.aborted, 0);
}

#[tokio::test]
async fn reasoning_under_its_other_name_and_a_refusal() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open(
        "r",
        "why [[mock reasoning=4 reasoning_field=reasoning chunks=2]]",
    )
    .await;
    let (deltas, done) = frames_of(&mut c, "r").await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(
        joined(&deltas, "reasoning"),
        mock::reasoning_chunks(4).concat()
    );

    c.open("no", "something bad [[mock refusal=1 delay_ms=0]]")
        .await;
    let (deltas, done) = frames_of(&mut c, "no").await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(joined(&deltas, "refusal").trim_end(), mock::REFUSAL_TEXT);
    assert_eq!(joined(&deltas, "text"), "");
    assert!(
        deltas.iter().all(|d| d.get("reasoning").is_none()
            && d.get("tool_calls").is_none()
            && d.get("logprobs").is_none()),
        "absent parts are omitted, never null"
    );
}

#[tokio::test]
async fn an_upstream_400_reaches_the_client_with_its_status_and_code() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open(
        "big",
        "too long [[mock fail=400 fail_code=context_length_exceeded fail_type=invalid_request_error fail_param=messages]]",
    )
    .await;
    let e = c.recv_until("error", Some("big")).await;
    assert_eq!(e["code"], "upstream_error", "{e}");
    assert_eq!(e["status"], 400);
    assert_eq!(
        e["upstream"],
        json!({"type":"invalid_request_error","code":"context_length_exceeded","param":"messages"})
    );
    assert_eq!(h.mock.stats().requests, 1, "a 400 is not retried");

    // A 503 without a code: the status, the mock's default type and code, no param.
    c.open(
        "busy",
        "x [[mock fail=503 fail_times=100 retry_after_ms=1]]",
    )
    .await;
    let e = c.recv_until("error", Some("busy")).await;
    assert_eq!(e["status"], 503, "{e}");
    assert_eq!(
        e["upstream"],
        json!({"type":"server_error","code":"mock_injected_failure"})
    );
    assert!(!e.to_string().contains(API_KEY));
}

#[tokio::test]
async fn an_error_event_mid_stream_carries_the_upstreams_code() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.open(
        "ev",
        "x [[mock chunks=5 error_event=2 fail_code=overloaded_error fail_type=server_error]]",
    )
    .await;
    let (deltas, e) = frames_of(&mut c, "ev").await;
    assert_eq!(deltas.len(), 2);
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "upstream_error", "{e}");
    assert!(e.get("status").is_none(), "the HTTP answer was a 200: {e}");
    assert_eq!(
        e["upstream"],
        json!({"type":"server_error","code":"overloaded_error"})
    );
    assert_eq!(h.mock.stats().requests, 1, "parts went out: not retried");
}

#[tokio::test]
async fn a_cut_after_a_tool_call_fragment_is_not_retried_and_the_estimate_counts_it() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let tools = json!([weather_tool()]);
    let prompt = "Weather in Oslo [[mock tools=1 cut=3 delay_ms=0]]";
    c.send(open_with_tools("cut", prompt, tools.clone())).await;
    let (deltas, e) = frames_of(&mut c, "cut").await;
    assert_eq!(deltas.len(), 3, "the fragments before the cut");
    assert_eq!(
        deltas[0]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(e["code"], "upstream_error", "{e}");
    let stats = h.mock.stats();
    assert_eq!(
        stats.requests, 1,
        "a tool-call fragment went out: never retried"
    );
    assert_eq!(stats.cut, 1);

    // No usage came: the estimate counts the tool definitions in the prompt, and the
    // function name and argument pieces that went out.
    let messages = vec![json!({"role":"user","content":prompt})];
    let prompt_tokens = count_prompt_tokens("deepseek-v3.2", &messages)
        + count_tools_tokens("deepseek-v3.2", &tools);
    let (_, _, name, args) = &merged_calls(&deltas)[0];
    let completion_tokens = count_tokens("deepseek-v3.2", &format!("{name}{args}"));
    assert!(completion_tokens > 0);
    let m = scrape_metrics(&h).await;
    let tokens = |kind: &str| {
        metric(&m, &format!("muxgate_tokens_total{{model=\"deepseek-v3.2\",tier=\"pro\",kind=\"{kind}\",estimated=\"true\"}}"))
    };
    assert_eq!(tokens("prompt"), prompt_tokens as f64);
    assert_eq!(tokens("completion"), completion_tokens as f64);
}

#[tokio::test]
async fn resume_in_the_middle_of_a_tool_call_replays_its_fragments_exactly() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    // Three calls of an undefined tool: ~7 fragments each, 40 ms apart.
    c.open(
        "rt",
        "Look this up for me please, it matters [[mock tools=3 delay_ms=40]]",
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let f = c.recv().await;
        if f["type"] == "delta" && f["id"] == "rt" {
            seen.push(f);
        }
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"rt","after":1}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["rt"]));
    let mut deltas = vec![seen[0].clone()];
    let done = loop {
        let f = c.recv().await;
        if f["id"] != "rt" {
            continue;
        }
        match f["type"].as_str().unwrap() {
            "delta" => {
                assert_eq!(f["seq"], deltas.len() as u64 + 1, "{f}");
                deltas.push(f);
            }
            "done" => break f,
            other => panic!("{other}: {f}"),
        }
    };
    assert_eq!(
        &deltas[..4],
        &seen[..],
        "the replay is the frames as first sent"
    );
    assert_eq!(done["finish_reason"], "tool_calls");
    let calls = merged_calls(&deltas);
    assert_eq!(calls.len(), 3);
    let n = done["completion_id"]
        .as_str()
        .unwrap()
        .strip_prefix("chatcmpl-mock-")
        .unwrap()
        .to_string();
    for (i, (id, _, name, args)) in calls.iter().enumerate() {
        assert_eq!(id, &format!("call_{n}_{i}"));
        assert_eq!(name, &format!("tool_{i}"));
        let args: Value = serde_json::from_str(args).expect("JSON after merging");
        assert_eq!(args["index"], i as u64);
        assert_eq!(args["query"], "Look this up for me please, it matters");
    }
    assert_eq!(
        h.mock.stats().requests,
        1,
        "resume never re-asks the upstream"
    );
}

#[tokio::test]
async fn a_v1_client_reading_only_text_gets_exact_text() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let prompt = "plain reader [[mock reasoning=6 chunks=9 cached=1]]";
    c.open("v1", prompt).await;
    let records = c.collect(&["v1".into()]).await;
    let r = &records["v1"];
    assert_eq!(r.end_type(), "done");
    assert_eq!(r.text, expected(prompt, 9));
    assert_eq!(r.deltas, 15, "reasoning deltas carry text \"\"");
}

#[tokio::test]
async fn usage_details_and_the_cached_input_price_are_exact() {
    let h = Harness::start_with(|c| {
        c.pricing.get_mut("deepseek-v3.2").unwrap().cached_input = Some(0.025);
    })
    .await;
    let mut c = h.connect("alice").await;
    // Six words of prompt (the mock counts the raw text), two of them reported cached; two
    // reasoning chunks and four content chunks.
    let prompt = "cache me [[mock chunks=4 reasoning=2 cached=2]]";
    c.open("u", prompt).await;
    let (_, done) = frames_of(&mut c, "u").await;
    assert_eq!(
        done["usage"],
        json!({"prompt_tokens":6,"completion_tokens":6,"total_tokens":12,
            "prompt_tokens_details":{"cached_tokens":2},
            "completion_tokens_details":{"reasoning_tokens":2}})
    );
    assert!(done.get("usage_estimated").is_none());
    let cost = done["cost_usd"].as_f64().unwrap();
    let want = (2.0 * 0.025 + 4.0 * 0.10 + 6.0 * 0.42) / 1e6;
    assert!((cost - want).abs() < 1e-18, "{cost} vs {want}");
    assert!(
        (cost - cost_usd(6, 6, 0.10, 0.42)).abs() > 1e-9,
        "the cached price made a difference"
    );
}

#[tokio::test]
async fn the_request_reaches_the_upstream_unchanged() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let messages = json!([
        {"role":"system","content":"You are terse."},
        {"role":"user","content":[
            {"type":"text","text":"What is in this picture, and the weather there?"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"low"}},
            {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}}
        ]},
        {"role":"assistant","content":null,"tool_calls":[
            {"id":"call_x","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\",\"days\":1}"}}
        ]},
        {"role":"tool","tool_call_id":"call_x","content":"18°C, \"light\" rain\n"}
    ]);
    let params = json!({
        "tools":[weather_tool()],
        "tool_choice":{"type":"function","function":{"name":"get_weather"}},
        "parallel_tool_calls":false,
        "logprobs":true,
        "top_logprobs":2,
        "modalities":["text"],
        "prediction":{"type":"content","content":"It rains"},
        "store":false,
        "metadata":{"app":"fidelity","ünï":"🎉"},
        "service_tier":"auto",
        "response_format":{"type":"text"},
        "n":1,
        "temperature":0.25
    });
    c.send(json!({"type":"open","id":"req","model":"deepseek-v3.2","messages":messages,"params":params}))
        .await;
    let (deltas, done) = frames_of(&mut c, "req").await;
    assert_eq!(done["type"], "done", "{done}");
    let sent = h.mock.stats().last_request.unwrap();
    assert_eq!(sent["messages"].to_string(), messages.to_string());
    assert_eq!(sent["messages"], messages);
    for (key, value) in params.as_object().unwrap() {
        assert_eq!(sent[key].to_string(), value.to_string(), "{key}");
    }
    // After a tool result the mock answers in prose quoting it; logprobs came with each chunk.
    let text = joined(&deltas, "text");
    assert!(text.contains("18°C, \"light\" rain"), "{text}");
    let content: Vec<&Value> = deltas.iter().filter(|d| d["text"] != "").collect();
    assert!(!content.is_empty());
    for d in content {
        assert_eq!(d["logprobs"]["content"][0]["token"], d["text"], "{d}");
    }
}

#[tokio::test]
async fn n_other_than_one_is_refused() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    c.send(json!({"type":"open","id":"n2","model":"deepseek-v3.2",
        "messages":[{"role":"user","content":"hi"}],"params":{"n":2}}))
        .await;
    let e = c.recv_until("error", Some("n2")).await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(
        e["message"],
        "n > 1 is not supported: one stream is one choice"
    );
    c.send(json!({"type":"open","id":"n1","model":"deepseek-v3.2",
        "messages":[{"role":"user","content":"hi [[mock chunks=2]]"}],"params":{"n":1}}))
        .await;
    assert_eq!(
        c.recv_until("done", Some("n1")).await["finish_reason"],
        "stop"
    );
    assert_eq!(
        h.mock.stats().requests,
        1,
        "the refused open never reached it"
    );
}
